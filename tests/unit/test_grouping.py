"""Group commit: batches of concurrent requests, decided in arrival order, one at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable, Sequence

import pytest

from ppml.services.grouping import GroupCommit, Pending


class Recorder:
    """A handler that doubles each item and records the batches it saw."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.running = 0
        self.overlapped = False
        self.release_first = threading.Event()

    def __call__(self, _key: Hashable, batch: Sequence[Pending[int, int]]) -> None:
        self.running += 1
        self.overlapped |= self.running > 1
        if not self.batches:
            self.release_first.wait(5)
        self.batches.append([p.item for p in batch])
        for pending in batch:
            pending.resolve(pending.item * 2)
        self.running -= 1


def test_a_lone_request_is_its_own_batch() -> None:
    # arrange
    handler = Recorder()
    handler.release_first.set()
    group: GroupCommit[int, int] = GroupCommit(handler)
    # act
    results = [group.submit("k", i) for i in range(3)]
    # assert
    assert results == [0, 2, 4]
    assert handler.batches == [[0], [1], [2]]


def test_requests_arriving_during_a_batch_form_the_next_one_in_order() -> None:
    # arrange: the first request leads a batch that blocks until the others are queued
    handler = Recorder()
    group: GroupCommit[int, int] = GroupCommit(handler, max_batch=64)
    results: dict[int, int] = {}

    def submit(i: int) -> None:
        results[i] = group.submit("k", i)

    first = threading.Thread(target=submit, args=(0,))
    first.start()
    time.sleep(0.05)
    others = []
    for i in range(1, 9):
        thread = threading.Thread(target=submit, args=(i,))
        thread.start()
        others.append(thread)
        time.sleep(0.01)  # a known arrival order
    # act
    handler.release_first.set()
    for thread in [first, *others]:
        thread.join(5)
    # assert: one batch at a time; the waiting requests went together, in arrival order
    assert results == {i: 2 * i for i in range(9)}
    assert handler.batches == [[0], list(range(1, 9))]
    assert not handler.overlapped


def test_batches_are_capped() -> None:
    # arrange
    handler = Recorder()
    group: GroupCommit[int, int] = GroupCommit(handler, max_batch=3)
    threads = [threading.Thread(target=group.submit, args=("k", i)) for i in range(7)]
    threads[0].start()
    time.sleep(0.05)
    for thread in threads[1:]:
        thread.start()
        time.sleep(0.01)
    # act
    handler.release_first.set()
    for thread in threads:
        thread.join(5)
    # assert
    assert handler.batches == [[0], [1, 2, 3], [4, 5, 6]]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs() -> None:
    # arrange
    calls: list[list[int]] = []

    def handler(_key: Hashable, batch: Sequence[Pending[int, int]]) -> None:
        calls.append([p.item for p in batch])
        if len(calls) == 1:
            raise ValueError("boom")
        for pending in batch:
            pending.resolve(pending.item)

    group: GroupCommit[int, int] = GroupCommit(handler)
    # act / assert
    with pytest.raises(ValueError, match="boom"):
        group.submit("k", 1)
    assert group.submit("k", 2) == 2


def test_an_item_left_undecided_fails() -> None:
    # arrange
    group: GroupCommit[int, int] = GroupCommit(lambda _key, _batch: None)
    # act / assert
    with pytest.raises(RuntimeError, match="undecided"):
        group.submit("k", 1)


def test_keys_are_independent() -> None:
    # arrange: a batch for "a" blocks; a request for "b" does not wait for it
    release = threading.Event()

    def handler(key: Hashable, batch: Sequence[Pending[int, int]]) -> None:
        if key == "a":
            release.wait(5)
        for pending in batch:
            pending.resolve(pending.item)

    group: GroupCommit[int, int] = GroupCommit(handler)
    blocked = threading.Thread(target=group.submit, args=("a", 1))
    blocked.start()
    time.sleep(0.05)
    # act
    started = time.monotonic()
    result = group.submit("b", 2)
    # assert
    assert result == 2 and time.monotonic() - started < 1
    release.set()
    blocked.join(5)
