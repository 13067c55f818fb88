"""The signed head file: moves only forward when merged, back only when reset, and a file
that does not verify is refused and left as it is."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ppml.errors import LedgerHeadsInvalid
from ppml.privacy.chain import EMPTY, Link, behind
from ppml.privacy.heads import HeadFile
from ppml.trust.keys import SigningKeys


def _heads(tmp_path: Path) -> HeadFile:
    return HeadFile(tmp_path / "ledger-heads.json", SigningKeys(tmp_path / "keys"))


def test_a_missing_file_knows_no_heads(tmp_path: Path) -> None:
    assert _heads(tmp_path).read() == {}


def test_heads_move_forward_only_and_writers_merge(tmp_path: Path) -> None:
    # arrange
    heads = _heads(tmp_path)
    # act: concurrent writers in any order, and a stale one
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: heads.advance({f"ds{n % 4}": Link(n, f"h{n}")}), range(40)))
    heads.advance({"ds0": Link(1, "stale")})
    # assert: the highest seq of each dataset, as another process reads it
    assert _heads(tmp_path).read() == {f"ds{k}": Link(36 + k, f"h{36 + k}") for k in range(4)}


def test_queued_heads_are_written_together_by_the_writer_thread(tmp_path: Path) -> None:
    # arrange: count the signed writes, and hold the first one until every head is queued
    heads = _heads(tmp_path)
    writes: list[dict[str, Link]] = []
    write, release = heads._write, threading.Event()

    def counted(links: dict[str, Link]) -> None:
        writes.append(dict(links))
        assert release.wait(timeout=10)
        write(links)

    heads._write = counted  # type: ignore[method-assign]
    heads.advance_soon({"ds0": Link(0, "h0")})
    # act: while that write runs, commits from many threads hand their heads over, one stale
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: heads.advance_soon({f"ds{n % 4}": Link(n, f"h{n}")}), range(200)))
    heads.advance_soon({"ds0": Link(1, "stale")})
    release.set()
    # assert: two signed writes in all (the second took every queued head), and the file
    # holds the highest seq of each dataset
    assert heads.flush(timeout=10)
    assert len(writes) == 2
    assert _heads(tmp_path).read() == {f"ds{k}": Link(196 + k, f"h{196 + k}") for k in range(4)}


def test_a_reset_moves_a_head_back(tmp_path: Path) -> None:
    heads = _heads(tmp_path)
    heads.advance({"a": Link(5, "h5"), "b": Link(2, "b2")})
    heads.reset({"a": Link(3, "h3")})
    assert _heads(tmp_path).read() == {"a": Link(3, "h3"), "b": Link(2, "b2")}


def test_an_edited_file_is_refused_and_kept(tmp_path: Path) -> None:
    # arrange
    heads = _heads(tmp_path)
    heads.advance({"a": Link(5, "h5")})
    document = json.loads(heads.path.read_text())
    document["heads"]["a"]["seq"] = 2
    heads.path.write_text(json.dumps(document))
    edited = heads.path.read_bytes()
    # act / assert
    with pytest.raises(LedgerHeadsInvalid):
        heads.read()
    heads.advance({"a": Link(6, "h6")})
    assert heads.path.read_bytes() == edited
    heads.reset({"a": Link(1, "h1")}, rebuild=True)
    assert heads.read() == {"a": Link(1, "h1")}
    assert len(list(tmp_path.glob("ledger-heads.json.invalid-*"))) == 1


def test_a_file_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    _heads(tmp_path).advance({"a": Link(1, "h1")})
    stranger = HeadFile(tmp_path / "ledger-heads.json", SigningKeys(tmp_path / "other-keys"))
    with pytest.raises(LedgerHeadsInvalid):
        stranger.read()


def test_a_chain_extends_a_known_head_only_through_it() -> None:
    chain = {1: "h1", 2: "h2", 3: "h3"}
    assert behind(Link(3, "h3"), Link(2, "h2"), chain.get) is None
    assert behind(Link(3, "h3"), Link(3, "h3"), chain.get) is None
    assert behind(Link(3, "h3"), EMPTY, chain.get) is None
    assert behind(Link(1, "h1"), Link(2, "h2"), chain.get) is not None  # cut short
    assert behind(Link(3, "h3"), Link(2, "other"), chain.get) is not None  # rewritten
