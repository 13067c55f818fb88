"""Keep the cyclic garbage collector's full collections short in the API process.

Every full (generation 2) collection walks every tracked object and stops the event loop
while it does, so its length is a floor under the tail latency of every request in flight.
Most of the heap is what imports made (modules, classes, functions, caches); it lives as
long as the process and never needs walking. ``gc.freeze()`` moves it out of the
collector's reach. Freezing once at startup is not enough: registering a built-in dataset
imports scikit-learn and SciPy, and the first submit imports Celery's Redis transport, about
50,000 objects that every later full collection walked again (25-30 ms each, every few
seconds under load). So the heap is frozen again whenever the set of imported modules grew.
Frozen objects are still freed by reference counting; only a cycle among them would wait,
and what imports make lives as long as the process anyway.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time

__all__ = ["FrozenHeap"]

log = logging.getLogger(__name__)


class FrozenHeap:
    """Freezes the heap now, and again after imports (checked every ``interval_s``)."""

    def __init__(self, interval_s: float = 5.0) -> None:
        self.interval_s = interval_s
        self._modules = -1

    def stale(self) -> bool:
        """Whether modules were imported since the last freeze."""
        return len(sys.modules) != self._modules

    def freeze(self) -> None:
        started = time.perf_counter()
        gc.collect()  # garbage cycles alive now would otherwise be frozen for good
        gc.freeze()
        self._modules = len(sys.modules)
        log.debug(
            "froze %d objects in %.1f ms",
            gc.get_freeze_count(),
            (time.perf_counter() - started) * 1e3,
        )

    async def watch(self) -> None:
        """Run until cancelled: freeze again whenever new modules were imported."""
        while True:
            await asyncio.sleep(self.interval_s)
            if self.stale():
                self.freeze()
