"""Flag stores: versioned items (flags, segments) in namespaces, after the LaunchDarkly SDK's
persistent feature stores.

A plugin implements :class:`StoreBackend` (raw items, tombstones included); applications
and the relay use :class:`CachedStore`, which adds the TTL cache and hides tombstones.

An item is a JSON object with at least ``key`` (str) and ``version`` (int). A deleted item
is kept as a tombstone ``{"key": k, "version": v, "deleted": true}`` so an older upsert
arriving later cannot bring it back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

__all__ = [
    "FLAGS",
    "NAMESPACES",
    "SEGMENTS",
    "Item",
    "StoreBackend",
    "StoreError",
    "StoreSettings",
    "is_newer",
    "tombstone",
]

FLAGS = "flags"
SEGMENTS = "segments"
NAMESPACES = (FLAGS, SEGMENTS)

Item = dict[str, Any]


class StoreError(Exception):
    """The store cannot be used (missing table, wrong schema, unreachable backend); the
    message names the resource and says what to do."""


class StoreSettings(BaseModel):
    """Base of every store's settings: camelCase keys, unknown keys rejected, a description
    per field (the docs tables are generated from them)."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        hide_input_in_errors=True,
    )


def tombstone(key: str, version: int) -> Item:
    """The item that records ``key`` as deleted at ``version``."""
    return {"key": key, "version": version, "deleted": True}


def is_newer(candidate: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """True when ``candidate`` should replace ``current`` (strictly higher version)."""
    return current is None or int(candidate["version"]) > int(current["version"])


SettingsT = TypeVar("SettingsT", bound=StoreSettings)


class StoreBackend(ABC, Generic[SettingsT]):
    """What a store plugin implements. Every method may be called from several threads.

    Items returned may be tombstones (``deleted: true``); :class:`CachedStore` hides them.
    """

    kind: ClassVar[str]
    settings_model: ClassVar[type[StoreSettings]] = StoreSettings

    def __init__(self, settings: SettingsT | None = None, /, **options: Any) -> None:
        """Build from a settings model, or from keyword options validated into one."""
        if settings is None:
            settings = self.settings_model.model_validate(options)  # type: ignore[assignment]
        elif options:
            raise TypeError("pass either a settings model or keyword options, not both")
        self.settings: SettingsT = settings  # type: ignore[assignment]

    @abstractmethod
    def init_items(self, data: Mapping[str, Mapping[str, Item]]) -> None:
        """Replace everything: afterwards each namespace holds exactly ``data[namespace]``
        (items absent from ``data`` are removed), and :meth:`is_initialized` is true."""

    @abstractmethod
    def get_item(self, namespace: str, key: str) -> Item | None:
        """The stored item (possibly a tombstone), or None."""

    @abstractmethod
    def all_items(self, namespace: str) -> dict[str, Item]:
        """Every stored item of ``namespace`` by key, tombstones included."""

    @abstractmethod
    def upsert_item(self, namespace: str, item: Item) -> Item:
        """Store ``item`` only if its version is higher than the stored one's (atomically:
        concurrent writers from several processes can never make a key go backwards).

        :returns: the item stored afterwards (``item`` itself, or the newer one kept).
        """

    @abstractmethod
    def is_initialized(self) -> bool:
        """True once :meth:`init_items` has completed (by this or another process)."""

    def close(self) -> None:
        """Release clients and connections."""
