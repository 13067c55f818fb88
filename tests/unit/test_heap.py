"""The API's frozen heap: what exists at a freeze leaves the collector's reach, and new
imports make the heap stale until it is frozen again."""

from __future__ import annotations

import asyncio
import gc
import sys
import types
import weakref
from collections.abc import Iterator

import pytest

from api.heap import FrozenHeap


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the test process collects as usual


@pytest.fixture
def imported() -> Iterator[str]:
    """A module that appears in ``sys.modules`` as an import would make it."""
    name = "ppml_test_late_import"
    yield name
    sys.modules.pop(name, None)


def _tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_freeze_takes_existing_objects_out_of_collections() -> None:
    before = [object()]  # a list is tracked by the collector
    assert _tracked(before)
    FrozenHeap().freeze()
    after = [object()]
    assert not _tracked(before)
    assert _tracked(after)
    assert gc.get_freeze_count() > 0


class _Node:
    peer: object = None


def test_freeze_collects_garbage_cycles_instead_of_freezing_them() -> None:
    gc.disable()  # no automatic collection between here and the freeze
    try:
        node = _Node()
        node.peer = node  # a cycle: reference counting alone never frees it
        ref = weakref.ref(node)
        del node
        assert ref() is not None
        FrozenHeap().freeze()
        assert ref() is None
    finally:
        gc.enable()


def test_an_import_makes_the_heap_stale_until_the_next_freeze(imported: str) -> None:
    heap = FrozenHeap()
    assert heap.stale()  # never frozen
    heap.freeze()
    assert not heap.stale()
    sys.modules[imported] = types.ModuleType(imported)
    assert heap.stale()
    heap.freeze()
    assert not heap.stale()


def test_watch_freezes_again_after_an_import(imported: str) -> None:
    async def scenario() -> bool:
        heap = FrozenHeap(interval_s=0.01)
        heap.freeze()
        watcher = asyncio.create_task(heap.watch())
        module = types.ModuleType(imported)
        module.payload = [object()]  # type: ignore[attr-defined]
        sys.modules[imported] = module
        assert heap.stale()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not heap.stale():
                break
        watcher.cancel()
        return not heap.stale() and not _tracked(module.payload)

    assert asyncio.run(scenario())
