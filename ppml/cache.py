"""One small, thread-safe cache: least recently used out first, optional expiry and weights.

Every in-process cache of ppml uses it (API keys, per-tenant job counts, datasets at
admission, small model files), so none of them forgets everything at once when it fills up.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["LRUCache"]

K = TypeVar("K")
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """At most ``capacity`` entries (and ``max_weight`` in total, if given), each living at
    most ``ttl`` seconds (if given); the least recently used entry goes first."""

    def __init__(
        self,
        capacity: int,
        *,
        ttl: float | None = None,
        max_weight: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity, self.ttl, self.max_weight = capacity, ttl, max_weight
        self._weigh = weigh or (lambda _value: 1)
        self._entries: OrderedDict[K, tuple[V, float, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value, or None when absent or expired."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            value, expires, _weight = entry
            if expires < time.monotonic():
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Store ``value``; a value heavier than ``max_weight`` alone is not kept."""
        weight = self._weigh(value)
        if self.max_weight is not None and weight > self.max_weight:
            return
        expires = time.monotonic() + self.ttl if self.ttl is not None else float("inf")
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (value, expires, weight)
            self._weight += weight
            while len(self._entries) > self.capacity or (
                self.max_weight is not None and self._weight > self.max_weight
            ):
                self._drop(next(iter(self._entries)))

    def pop(self, key: K) -> None:
        """Forget ``key``."""
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: K) -> None:
        _value, _expires, weight = self._entries.pop(key)
        self._weight -= weight
