"""An in-memory :class:`~flagsink.store.StoreBackend`, for tests and examples."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any

from flagsink.store import Item, StoreBackend, StoreSettings, is_newer

__all__ = ["MemoryData", "MemoryStore"]


class MemoryData:
    """The state behind one or more :class:`MemoryStore` instances (as a table is shared by
    several clients)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.namespaces: dict[str, dict[str, Item]] = {}
        self.initialized = False


class MemoryStore(StoreBackend[StoreSettings]):
    """Keeps items in memory; thread-safe. Instances built with the same ``data`` share it.

    Items are copied in and out, as a real backend would serialize them.
    """

    kind = "memory"
    settings_model = StoreSettings

    def __init__(
        self,
        settings: StoreSettings | None = None,
        /,
        *,
        data: MemoryData | None = None,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        self.data = data if data is not None else MemoryData()

    def init_items(self, data: Mapping[str, Mapping[str, Item]]) -> None:
        fresh = {
            namespace: {str(key): copy.deepcopy(dict(item)) for key, item in items.items()}
            for namespace, items in data.items()
        }
        with self.data.lock:
            self.data.namespaces = fresh
            self.data.initialized = True

    def get_item(self, namespace: str, key: str) -> Item | None:
        with self.data.lock:
            item = self.data.namespaces.get(namespace, {}).get(key)
            return copy.deepcopy(item) if item is not None else None

    def all_items(self, namespace: str) -> dict[str, Item]:
        with self.data.lock:
            return copy.deepcopy(self.data.namespaces.get(namespace, {}))

    def upsert_item(self, namespace: str, item: Item) -> Item:
        key = str(item["key"])
        with self.data.lock:
            items = self.data.namespaces.setdefault(namespace, {})
            current = items.get(key)
            if is_newer(item, current):
                items[key] = copy.deepcopy(dict(item))
                return item
            assert current is not None
            return copy.deepcopy(current)

    def is_initialized(self) -> bool:
        with self.data.lock:
            return self.data.initialized
