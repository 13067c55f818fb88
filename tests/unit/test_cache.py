"""ppml.cache.LRUCache: least recently used out first, expiry, weights."""

from __future__ import annotations

import pytest

from ppml.cache import LRUCache


def test_the_least_recently_used_entry_goes_first_not_everything() -> None:
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recently used
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3


def test_entries_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("ppml.cache.time.monotonic", lambda: clock[0])
    cache: LRUCache[str, int] = LRUCache(8, ttl=30.0)
    cache.put("k", 1)
    clock[0] += 29.0
    assert cache.get("k") == 1
    clock[0] += 2.0
    assert cache.get("k") is None and len(cache) == 0


def test_weights_bound_the_total_and_a_too_heavy_value_is_not_kept() -> None:
    cache: LRUCache[str, bytes] = LRUCache(100, max_weight=10, weigh=len)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    cache.put("c", b"123")  # evicts "a" only
    assert cache.get("a") is None and cache.get("b") == b"12345" and cache.get("c") == b"123"
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None and cache.get("b") == b"12345"
