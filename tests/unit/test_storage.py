"""The artifact store: the one place that stages, fsyncs, renames and digests files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ppml.storage import Artifact, ArtifactStore


def test_write_publishes_the_written_file_with_its_digest_and_size(tmp_path: Path) -> None:
    # arrange
    store = ArtifactStore(tmp_path)
    staged: list[Path] = []

    def writer(path: Path) -> None:
        staged.append(path)
        path.write_bytes(b"weights")

    # act
    artifact = store.write("models/m.onnx", writer)

    # assert
    digest = hashlib.sha256(b"weights").hexdigest()
    assert artifact == Artifact(key="models/m.onnx", sha256=digest, size=7)
    assert store.path("models/m.onnx").read_bytes() == b"weights"
    assert staged[0].parent == tmp_path / "tmp" and staged[0].suffix == ".onnx"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_failed_writer_leaves_the_published_file_and_no_staged_one(tmp_path: Path) -> None:
    # arrange
    store = ArtifactStore(tmp_path)
    store.write("models/m.onnx", lambda path: path.write_bytes(b"old"))

    def half_then_fail(path: Path) -> None:
        path.write_bytes(b"ne")
        raise RuntimeError("export failed")

    # act
    with pytest.raises(RuntimeError, match="export failed"):
        store.write("models/m.onnx", half_then_fail)

    # assert
    assert store.path("models/m.onnx").read_bytes() == b"old"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_publishing_fsyncs_the_file_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arrange
    store = ArtifactStore(tmp_path)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    # act
    store.write("datasets/d.npz", lambda path: path.write_bytes(b"rows"))
    # assert
    inode = store.path("datasets/d.npz").stat().st_ino
    folder = (tmp_path / "datasets").stat().st_ino
    assert synced[0] == inode and folder in synced[1:]


def test_an_invalid_key_is_refused_before_the_writer_runs(tmp_path: Path) -> None:
    calls: list[Path] = []

    with pytest.raises(ValueError, match="invalid artifact key"):
        ArtifactStore(tmp_path).write("../escape", calls.append)

    assert calls == []
