"""Per-key request rates of this API process: one token bucket per key (a tenant).

Each bucket holds at most ``burst`` tokens and gains ``rate`` tokens a second; a request takes
one. An empty bucket answers how long until its next token, which a 429 sends as
``Retry-After``. Buckets live in the process: with several API processes behind a balancer a
tenant gets at most ``rate`` per process, which bounds the work it can cause in each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ppml.cache import LRUCache

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """Token buckets by key, refilled at ``rate`` a second up to ``burst`` tokens.

    A forgotten key (the least recently used go first, past ``capacity``) starts again with
    a full bucket, which is what an idle key would have anyway.
    """

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        capacity: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst, self._clock = rate, burst, clock
        # key → (tokens, when they were counted)
        self._buckets: LRUCache[str, tuple[float, float]] = LRUCache(capacity)
        self._lock = threading.Lock()  # take() reads, then writes its key's bucket

    def take(self, key: str) -> float:
        """Take a token from ``key``'s bucket: 0.0 when granted, else the seconds to wait."""
        with self._lock:
            now = self._clock()
            tokens, then = self._buckets.get(key) or (float(self.burst), now)
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self._buckets.put(key, (tokens - 1.0, now))
                return 0.0
            self._buckets.put(key, (tokens, now))
            return (1.0 - tokens) / self.rate
