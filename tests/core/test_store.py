"""The in-memory store passes the store contract; CachedStore details."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flagsink.store import FLAGS
from flagsink.store_cache import CachedStore
from flagsink.testing import MemoryData, MemoryStore
from flagsink.testing.store_contract import CountingBackend, StoreContract


class TestMemoryStoreContract(StoreContract):
    starts_uninitialized = True

    @pytest.fixture
    def new_backend(self) -> Callable[..., MemoryStore]:
        data = MemoryData()
        return lambda **overrides: MemoryStore(data=data, **overrides)

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [{"unknownKey": 1}]


def test_init_fills_the_cache() -> None:
    counting = CountingBackend(MemoryStore())
    cached = CachedStore(counting, ttl=-1)
    cached.init({FLAGS: {"a": {"key": "a", "version": 1}}})
    assert cached.get(FLAGS, "a") == {"key": "a", "version": 1}
    assert cached.all(FLAGS) == {"a": {"key": "a", "version": 1}}
    assert (counting.gets, counting.alls) == (0, 0)


def test_initialized_is_cached_once_true() -> None:
    data = MemoryData()
    counting = CountingBackend(MemoryStore(data=data))
    cached = CachedStore(counting, ttl=0)
    assert not cached.initialized()
    MemoryStore(data=data).init_items({})
    assert cached.initialized()
    data.initialized = False
    assert cached.initialized()


def test_all_fills_item_cache_and_invalidate_forgets() -> None:
    counting = CountingBackend(MemoryStore())
    counting.init_items({FLAGS: {"a": {"key": "a", "version": 1}}})
    cached = CachedStore(counting, ttl=-1)
    assert set(cached.all(FLAGS)) == {"a"}
    assert cached.get(FLAGS, "a") == {"key": "a", "version": 1}
    assert counting.gets == 0
    cached.invalidate()
    assert cached.get(FLAGS, "a") == {"key": "a", "version": 1}
    assert counting.gets == 1


def test_settings_and_options_are_exclusive() -> None:
    with pytest.raises(TypeError):
        MemoryStore(MemoryStore.settings_model(), unknown=1)
