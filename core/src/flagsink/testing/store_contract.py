"""The store contract: pytest checks every flag store plugin must pass.

Subclass :class:`StoreContract` in a test module named ``test_*.py`` and provide two
fixtures, against the real server::

    class TestDynamoDBContract(StoreContract):
        @pytest.fixture
        def new_backend(self, dynamodb_table):      # factory: overrides -> a new backend
            return lambda **overrides: DynamoDBStore(
                **{"table": dynamodb_table, "endpointUrl": ..., **overrides}
            )

        @pytest.fixture
        def invalid_settings(self):                 # option sets that must be rejected
            return [{"table": ""}, {"unknownKey": 1}]

Every call of ``new_backend()`` returns a new client of the *same* data (the same table):
the TTL checks write through one instance and read through another. Each check starts by
calling ``init_items`` (which replaces everything), so the data may be shared between tests.
Set ``starts_uninitialized = True`` when each test gets a fresh, never initialized store.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from pydantic import ValidationError

from flagsink.exporter import SettingsError
from flagsink.store import FLAGS, SEGMENTS, Item, StoreBackend, StoreError
from flagsink.store_cache import CachedStore
from flagsink.testing.memory import wait_until

__all__ = ["CountingBackend", "StoreContract"]

NewBackend = Callable[..., StoreBackend[Any]]


def flag(key: str, version: int, **extra: Any) -> Item:
    """A flag item as GO Feature Flag writes them."""
    return {
        "key": key,
        "version": version,
        "variations": {"on": True, "off": False},
        "defaultRule": {"variation": "off"},
        **extra,
    }


class CountingBackend(StoreBackend[Any]):
    """Wraps a backend and counts its reads; ``read_delay`` widens race windows."""

    kind = "counting"

    def __init__(self, inner: StoreBackend[Any], read_delay: float = 0.0) -> None:
        super().__init__(inner.settings)
        self.inner = inner
        self.read_delay = read_delay
        self.gets = 0
        self.alls = 0
        self._lock = threading.Lock()

    def init_items(self, data: Mapping[str, Mapping[str, Item]]) -> None:
        self.inner.init_items(data)

    def get_item(self, namespace: str, key: str) -> Item | None:
        with self._lock:
            self.gets += 1
        if self.read_delay:
            time.sleep(self.read_delay)
        return self.inner.get_item(namespace, key)

    def all_items(self, namespace: str) -> dict[str, Item]:
        with self._lock:
            self.alls += 1
        if self.read_delay:
            time.sleep(self.read_delay)
        return self.inner.all_items(namespace)

    def upsert_item(self, namespace: str, item: Item) -> Item:
        return self.inner.upsert_item(namespace, item)

    def is_initialized(self) -> bool:
        return self.inner.is_initialized()

    def close(self) -> None:
        self.inner.close()


class StoreContract:
    """Checks shared by every store backend, and CachedStore's behaviour over it."""

    timeout = 30.0
    starts_uninitialized = False
    threads = 8
    upserts_per_thread = 25

    @pytest.fixture
    def backends(self, new_backend: NewBackend) -> Iterator[Callable[..., StoreBackend[Any]]]:
        """``new_backend``, closing what it made at teardown."""
        made: list[StoreBackend[Any]] = []

        def make(**overrides: Any) -> StoreBackend[Any]:
            backend = new_backend(**overrides)
            made.append(backend)
            return backend

        yield make
        for backend in made:
            backend.close()

    # -- backend operations ---------------------------------------------------------------

    def test_init_replaces_everything(self, backends: NewBackend) -> None:
        store = backends()
        if self.starts_uninitialized:
            assert not store.is_initialized()
        store.init_items(
            {
                FLAGS: {"a": flag("a", 1), "b": flag("b", 2)},
                SEGMENTS: {"s": {"key": "s", "version": 1}},
            }
        )
        assert store.is_initialized()
        assert backends().is_initialized(), "another client must see the store initialized"
        assert store.get_item(FLAGS, "a") == flag("a", 1)
        assert set(store.all_items(FLAGS)) == {"a", "b"}
        assert set(store.all_items(SEGMENTS)) == {"s"}

        store.init_items({FLAGS: {"b": flag("b", 1), "c": flag("c", 5)}, SEGMENTS: {}})
        assert store.get_item(FLAGS, "a") is None, "init must remove items absent from data"
        assert store.all_items(FLAGS) == {"b": flag("b", 1), "c": flag("c", 5)}
        assert store.all_items(SEGMENTS) == {}
        assert store.is_initialized()

    def test_get_missing_key_and_namespace(self, backends: NewBackend) -> None:
        store = backends()
        store.init_items({FLAGS: {}})
        assert store.get_item(FLAGS, "nope") is None
        assert store.all_items(FLAGS) == {}
        assert store.all_items(SEGMENTS) == {}

    def test_item_bodies_round_trip(self, backends: NewBackend) -> None:
        store = backends()
        body = flag(
            "nested",
            3,
            targeting=[{"query": 'country eq "fr"', "percentage": {"on": 12.5, "off": 87.5}}],
            metadata={"description": "ünïcödé", "list": [1, 2.5, None, True, "x"]},
            trackEvents=False,
        )
        store.init_items({FLAGS: {"nested": body}})
        assert backends().get_item(FLAGS, "nested") == body
        assert backends().all_items(FLAGS) == {"nested": body}

    def test_upsert_applies_only_newer_versions(self, backends: NewBackend) -> None:
        store = backends()
        store.init_items({FLAGS: {"a": flag("a", 5)}})
        assert store.upsert_item(FLAGS, flag("a", 4, note="older")) == flag("a", 5)
        assert store.upsert_item(FLAGS, flag("a", 5, note="same")) == flag("a", 5)
        assert store.get_item(FLAGS, "a") == flag("a", 5)
        newer = flag("a", 6, note="newer")
        assert store.upsert_item(FLAGS, newer) == newer
        assert store.get_item(FLAGS, "a") == newer
        fresh = flag("new", 1)
        assert store.upsert_item(FLAGS, fresh) == fresh
        assert set(store.all_items(FLAGS)) == {"a", "new"}
        assert store.upsert_item(SEGMENTS, {"key": "a", "version": 1}) == {"key": "a", "version": 1}
        assert store.get_item(FLAGS, "a") == newer, "namespaces are separate"

    def test_delete_leaves_a_tombstone(self, backends: NewBackend) -> None:
        store = backends()
        store.init_items({FLAGS: {"a": flag("a", 1), "b": flag("b", 1)}})
        cached = CachedStore(store, ttl=0)
        assert cached.delete(FLAGS, "a", 3)
        # The backend keeps the tombstone; the cached store hides it.
        assert store.get_item(FLAGS, "a") == {"key": "a", "version": 3, "deleted": True}
        assert store.all_items(FLAGS)["a"]["deleted"] is True
        assert cached.get(FLAGS, "a") is None
        assert set(cached.all(FLAGS)) == {"b"}
        # An older upsert cannot bring it back; a newer one can.
        assert not cached.upsert(FLAGS, flag("a", 2))
        assert cached.get(FLAGS, "a") is None
        assert not cached.delete(FLAGS, "a", 2)
        assert cached.upsert(FLAGS, flag("a", 4))
        assert cached.get(FLAGS, "a") == flag("a", 4)

    def test_concurrent_upserts_end_with_the_max_version(self, backends: NewBackend) -> None:
        backends().init_items({FLAGS: {}})
        versions = [
            [random.randint(1, 10_000) for _ in range(self.upserts_per_thread)]
            for _ in range(self.threads)
        ]
        start = threading.Barrier(self.threads)
        errors: list[BaseException] = []

        def writer(mine: list[int]) -> None:
            store = backends()  # one client per thread, as separate processes would have
            try:
                start.wait()
                for version in mine:
                    stored = store.upsert_item(FLAGS, flag("race", version))
                    assert int(stored["version"]) >= version
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        workers = [threading.Thread(target=writer, args=(v,)) for v in versions]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(self.timeout)
        assert not errors, errors
        top = max(max(v) for v in versions)
        assert backends().get_item(FLAGS, "race") == flag("race", top)

    def test_invalid_settings_are_rejected(
        self, new_backend: NewBackend, invalid_settings: list[dict[str, Any]]
    ) -> None:
        assert invalid_settings, "list at least one invalid option set"
        for options in invalid_settings:
            with pytest.raises((ValidationError, SettingsError, StoreError, ValueError)):
                new_backend(**options).close()

    # -- CachedStore over the backend -----------------------------------------------------

    def test_cached_store_operations(self, backends: NewBackend) -> None:
        cached = CachedStore(backends(), ttl=60)
        cached.init({FLAGS: {"a": flag("a", 1)}, SEGMENTS: {}})
        assert cached.initialized()
        assert cached.get(FLAGS, "a") == flag("a", 1)
        assert cached.upsert(FLAGS, flag("a", 2))
        assert cached.get(FLAGS, "a") == flag("a", 2), "a write updates the cache"
        assert not cached.upsert(FLAGS, flag("a", 1))
        assert cached.get(FLAGS, "a") == flag("a", 2)
        assert cached.upsert(FLAGS, flag("b", 1))
        assert set(cached.all(FLAGS)) == {"a", "b"}
        assert cached.delete(FLAGS, "b", 2)
        assert set(cached.all(FLAGS)) == {"a"}
        assert backends().get_item(FLAGS, "a") == flag("a", 2), "writes reach the backend"

    def test_cached_write_keeps_what_the_backend_stored(self, backends: NewBackend) -> None:
        cached = CachedStore(backends(), ttl=-1)
        cached.init({FLAGS: {"a": flag("a", 1)}})
        backends().upsert_item(FLAGS, flag("a", 9))  # another process wrote a newer one
        assert not cached.upsert(FLAGS, flag("a", 2))
        assert cached.get(FLAGS, "a") == flag("a", 9)

    def test_ttl_zero_reads_the_backend_every_time(self, backends: NewBackend) -> None:
        counting = CountingBackend(backends())
        cached = CachedStore(counting, ttl=0)
        cached.init({FLAGS: {"a": flag("a", 1)}})
        for _ in range(3):
            assert cached.get(FLAGS, "a") == flag("a", 1)
            assert set(cached.all(FLAGS)) == {"a"}
        assert (counting.gets, counting.alls) == (3, 3)
        backends().upsert_item(FLAGS, flag("a", 2))
        assert cached.get(FLAGS, "a") == flag("a", 2), "no cache: changes are seen at once"

    def test_positive_ttl_sees_other_writers_after_the_ttl(self, backends: NewBackend) -> None:
        ttl = 0.2
        counting = CountingBackend(backends())
        cached = CachedStore(counting, ttl=ttl)
        backends().init_items({FLAGS: {"a": flag("a", 1)}})
        filled = time.monotonic()
        assert cached.get(FLAGS, "a") == flag("a", 1)
        assert set(cached.all(FLAGS)) == {"a"}
        backends().upsert_item(FLAGS, flag("a", 2))
        backends().upsert_item(FLAGS, flag("b", 1))
        stale_get = cached.get(FLAGS, "a")
        stale_all = set(cached.all(FLAGS))
        if time.monotonic() - filled < ttl:  # still within the TTL: the cache answered
            assert stale_get == flag("a", 1)
            assert stale_all == {"a"}
            assert counting.gets == 1
        assert wait_until(lambda: cached.get(FLAGS, "a") == flag("a", 2), self.timeout)
        assert time.monotonic() - filled >= ttl
        assert wait_until(lambda: set(cached.all(FLAGS)) == {"a", "b"}, self.timeout)

    def test_negative_ttl_never_rereads(self, backends: NewBackend) -> None:
        counting = CountingBackend(backends())
        cached = CachedStore(counting, ttl=-1)
        backends().init_items({FLAGS: {"a": flag("a", 1)}})
        assert cached.get(FLAGS, "a") == flag("a", 1)
        assert set(cached.all(FLAGS)) == {"a"}
        backends().upsert_item(FLAGS, flag("a", 2))
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert cached.get(FLAGS, "a") == flag("a", 1)
            assert set(cached.all(FLAGS)) == {"a"}
        assert (counting.gets, counting.alls) == (1, 1)

    @pytest.mark.parametrize("ttl", [15.0, -1.0])
    def test_concurrent_misses_cause_one_read(self, backends: NewBackend, ttl: float) -> None:
        backends().init_items({FLAGS: {"a": flag("a", 1)}})
        counting = CountingBackend(backends(), read_delay=0.1)
        cached = CachedStore(counting, ttl=ttl)
        callers = 20
        start = threading.Barrier(callers)
        results: list[Any] = []
        lock = threading.Lock()

        def reader(use_all: bool) -> None:
            start.wait()
            got: Any = set(cached.all(FLAGS)) if use_all else cached.get(FLAGS, "a")
            with lock:
                results.append(got)

        for use_all in (False, True):
            results.clear()
            workers = [threading.Thread(target=reader, args=(use_all,)) for _ in range(callers)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(self.timeout)
            want: Any = {"a"} if use_all else flag("a", 1)
            assert results == [want] * callers
        assert (counting.gets, counting.alls) == (1, 1)

    def test_read_errors_reach_every_waiting_caller(self, backends: NewBackend) -> None:
        class Failing(CountingBackend):
            def get_item(self, namespace: str, key: str) -> Item | None:
                super().get_item(namespace, key)
                raise StoreError("backend unreachable")

        failing = Failing(backends(), read_delay=0.05)
        cached = CachedStore(failing, ttl=15)
        errors: list[BaseException] = []
        start = threading.Barrier(5)

        def reader() -> None:
            start.wait()
            try:
                cached.get(FLAGS, "a")
            except StoreError as exc:
                errors.append(exc)

        workers = [threading.Thread(target=reader) for _ in range(5)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(self.timeout)
        assert len(errors) == 5
        with pytest.raises(StoreError):  # errors are not cached
            cached.get(FLAGS, "a")
