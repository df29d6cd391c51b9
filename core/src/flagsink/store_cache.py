"""The caching layer every store is used through (after the LaunchDarkly SDK's
``CachingStoreWrapper``).

:class:`CachedStore` wraps a :class:`~flagsink.store.StoreBackend`:

- ``ttl`` seconds of caching (default 15). ``0`` disables the cache: every read goes to
  the backend. A negative TTL caches forever: this process never re-reads an item it has
  seen, so changes written by *other* processes are never noticed (only use it when this
  process is the only writer).
- Concurrent misses for one key (or one ``all(namespace)``) cause one backend read: the
  other callers wait for that read and share its result (single flight).
- Writes go to the backend, then the cache keeps the item the backend says is stored (which
  may be a newer one written by someone else).
- Tombstones (``deleted: true``) are hidden: :meth:`get` returns None and :meth:`all`
  leaves them out.

Items returned are shared with the cache: do not modify them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

from flagsink.store import Item, StoreBackend

__all__ = ["CachedStore"]

T = TypeVar("T")


class _Flight:
    """One backend read in progress; late callers wait on it."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


def _live(item: Item | None) -> Item | None:
    if item is None or item.get("deleted"):
        return None
    return item


class CachedStore:
    """A store backend behind a TTL cache with single-flight reads. Thread-safe."""

    def __init__(self, backend: StoreBackend[Any], ttl: float = 15.0) -> None:
        self.backend = backend
        self.ttl = float(ttl)
        self._lock = threading.Lock()
        # (namespace, key) -> (item or None, expires at)
        self._items: dict[tuple[str, str], tuple[Item | None, float]] = {}
        # namespace -> (items by key, tombstones included; expires at)
        self._alls: dict[str, tuple[dict[str, Item], float]] = {}
        self._flights: dict[Hashable, _Flight] = {}
        # Bumped by every write; a read that started before a write does not fill the cache.
        self._generation = 0
        self._initialized = False
        self._initialized_checked = -math.inf  # expiry of a cached "not initialized"

    # -- cache helpers --------------------------------------------------------------------

    @property
    def caching(self) -> bool:
        return self.ttl != 0

    def _expiry(self) -> float:
        return math.inf if self.ttl < 0 else time.monotonic() + self.ttl

    def _single_flight(self, key: Hashable, read: Callable[[], T], fill: Callable[[T], None]) -> T:
        """Run ``read`` once for concurrent callers of ``key``; the leader calls ``fill``
        with the result (under the lock) unless a write happened meanwhile."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
                generation = self._generation
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            result: T = flight.result
            return result
        try:
            result = read()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.result = result
            with self._lock:
                if self.caching and generation == self._generation:
                    fill(result)
            return result
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    # -- reads ----------------------------------------------------------------------------

    def _raw_get(self, namespace: str, key: str) -> Item | None:
        if self.caching:
            now = time.monotonic()
            with self._lock:
                cached = self._items.get((namespace, key))
                if cached is not None and cached[1] > now:
                    return cached[0]
                whole = self._alls.get(namespace)
                if whole is not None and whole[1] > now:
                    return whole[0].get(key)

        def fill(item: Item | None) -> None:
            self._items[(namespace, key)] = (item, self._expiry())

        return self._single_flight(
            ("item", namespace, key), lambda: self.backend.get_item(namespace, key), fill
        )

    def get(self, namespace: str, key: str) -> Item | None:
        """The item, or None if absent or deleted."""
        return _live(self._raw_get(namespace, key))

    def _raw_all(self, namespace: str) -> dict[str, Item]:
        if self.caching:
            now = time.monotonic()
            with self._lock:
                whole = self._alls.get(namespace)
                if whole is not None and whole[1] > now:
                    return whole[0]

        def fill(items: dict[str, Item]) -> None:
            expires = self._expiry()
            self._alls[namespace] = (items, expires)
            for key, item in items.items():
                self._items[(namespace, key)] = (item, expires)

        return self._single_flight(
            ("all", namespace), lambda: dict(self.backend.all_items(namespace)), fill
        )

    def all(self, namespace: str) -> dict[str, Item]:
        """Every live item of ``namespace`` by key (tombstones left out)."""
        return {key: item for key, item in self._raw_all(namespace).items() if _live(item)}

    def initialized(self) -> bool:
        """True once the store holds a full data set (cached once true; a false answer is
        cached for the TTL)."""
        if self._initialized:
            return True
        now = time.monotonic()
        if self.caching and self._initialized_checked > now:
            return False
        answer = self.backend.is_initialized()
        with self._lock:
            if answer:
                self._initialized = True
            elif self.caching:
                self._initialized_checked = self._expiry()
        return answer

    # -- writes ---------------------------------------------------------------------------

    def init(self, data: Mapping[str, Mapping[str, Item]]) -> None:
        """Replace everything in the backend with ``data`` (namespace -> key -> item)."""
        self.backend.init_items(data)
        with self._lock:
            self._generation += 1
            self._items.clear()
            self._alls.clear()
            self._initialized = True
            if self.caching:
                expires = self._expiry()
                for namespace, items in data.items():
                    copy = {key: dict(item) for key, item in items.items()}
                    self._alls[namespace] = (copy, expires)
                    for key, item in copy.items():
                        self._items[(namespace, key)] = (item, expires)

    def upsert(self, namespace: str, item: Item) -> bool:
        """Store ``item`` if its version is newer than the stored one's.

        :returns: True if the backend now holds ``item`` (an item of the same version and
            content already stored counts as applied), False if a newer or equal version
            with other content was kept.
        """
        stored = self.backend.upsert_item(namespace, item)
        key = str(item["key"])
        with self._lock:
            self._generation += 1
            if self.caching:
                self._items[(namespace, key)] = (stored, self._expiry())
            else:
                self._items.pop((namespace, key), None)
            self._alls.pop(namespace, None)
        return stored is item or (
            int(stored["version"]) == int(item["version"]) and dict(stored) == dict(item)
        )

    def delete(self, namespace: str, key: str, version: int) -> bool:
        """Mark ``key`` deleted at ``version`` (a tombstone); False if a newer or equal
        version is stored."""
        return self.upsert(namespace, {"key": key, "version": version, "deleted": True})

    def invalidate(self) -> None:
        """Forget everything cached (the next reads go to the backend)."""
        with self._lock:
            self._generation += 1
            self._items.clear()
            self._alls.clear()

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()
