"""Group commit: concurrent requests for one key are handled together, one batch at a time.

Admissions to one dataset are serialised by its budget lock anyway. Taking that lock once per
request makes every request pay for a lock round trip, a flush and a commit (an fsync on
PostgreSQL) while the others queue on the row lock. Instead, requests that arrive while a
batch for the same key is in flight wait in memory; when the batch ends, one of them leads
the next batch, which holds everyone who arrived meanwhile (up to ``max_batch``), in arrival
order. The leader's handler decides the items one after the other inside one transaction, so
the decisions are exactly those of a serial replay in that order.

Leadership passes from request thread to request thread (no background thread), so a batch
runs only while some request is waiting for it, and each request leads at most one batch.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["GroupCommit", "Pending"]

I = TypeVar("I")  # noqa: E741 - the item a request brings
R = TypeVar("R")  # its result


@dataclass(eq=False)
class Pending(Generic[I, R]):
    """One request's item, and its outcome once a batch has handled it."""

    item: I
    result: R | None = None
    error: BaseException | None = None
    done: bool = False
    lead: bool = False
    wake: threading.Event = field(default_factory=threading.Event)

    def resolve(self, result: R) -> None:
        self.result, self.done = result, True

    def fail(self, error: BaseException) -> None:
        self.error, self.done = error, True


class GroupCommit(Generic[I, R]):
    """Runs ``handle(key, batch)`` for batches of concurrent requests with the same key.

    ``handle`` must resolve or fail every item of the batch it is given; an item it leaves
    open fails with a ``RuntimeError``, and an exception it raises fails every open item.
    """

    def __init__(
        self, handle: Callable[[Hashable, Sequence[Pending[I, R]]], None], *, max_batch: int = 64
    ) -> None:
        self._handle, self.max_batch = handle, max_batch
        self._lock = threading.Lock()
        self._waiting: dict[Hashable, deque[Pending[I, R]]] = {}

    def submit(self, key: Hashable, item: I) -> R:
        """Wait for ``item`` to be handled in some batch (perhaps leading it) and return its
        result, or raise its error."""
        mine: Pending[I, R] = Pending(item)
        with self._lock:
            queue = self._waiting.get(key)
            if queue is None:  # nobody is leading: lead now
                self._waiting[key] = deque()
                mine.lead = True
            else:
                queue.append(mine)
        if not mine.lead:
            mine.wake.wait()
        if not mine.done:
            self._lead(key, mine)
        if mine.error is not None:
            raise mine.error
        return mine.result  # type: ignore[return-value]

    def _lead(self, key: Hashable, mine: Pending[I, R]) -> None:
        with self._lock:
            queue = self._waiting[key]
            batch = [mine]
            while queue and len(batch) < self.max_batch:
                batch.append(queue.popleft())
        try:
            self._handle(key, batch)
        except BaseException as exc:  # the leader re-raises it from submit(), as do the others
            for pending in batch:
                if not pending.done:
                    pending.fail(exc)
        finally:
            for pending in batch:
                if not pending.done:
                    pending.fail(RuntimeError("the batch left this request undecided"))
            self._pass_on(key)
            for pending in batch:
                if pending is not mine:
                    pending.wake.set()

    def _pass_on(self, key: Hashable) -> None:
        with self._lock:
            queue = self._waiting[key]
            if not queue:
                del self._waiting[key]
                return
            successor = queue.popleft()
            successor.lead = True
        successor.wake.set()
