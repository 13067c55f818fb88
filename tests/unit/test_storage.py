"""The artifact store: the one place that stages, fsyncs, renames and digests files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from ppml.config import Settings
from ppml.storage import Artifact, ArtifactStore, LocalStore
from ppml.storage.s3 import S3Store
from ppml.trust.sealing import new_data_key


def test_write_publishes_the_written_file_with_its_digest_and_size(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path)
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
    store = LocalStore(tmp_path)
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
    store = LocalStore(tmp_path)
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
        LocalStore(tmp_path).write("../escape", calls.append)

    assert calls == []


def test_the_settings_choose_the_backend(tmp_path: Path) -> None:
    # act
    local = ArtifactStore.for_settings(Settings(data_dir=tmp_path, encryption_key=None))
    remote = ArtifactStore.for_settings(
        Settings(
            data_dir=tmp_path,
            storage_url="s3://bucket/some/prefix",
            s3_endpoint_url="http://127.0.0.1:9",  # never contacted: building a client is local
            encryption_key=new_data_key(),
        )
    )

    # assert: both seal with the data key; the object store keeps scratch files locally
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    assert isinstance(remote, S3Store)
    assert (remote.bucket, remote.prefix) == ("bucket", "some/prefix")
    assert remote.scratch == (tmp_path / "tmp").resolve()
    assert local.seals("datasets/d.npz") and remote.seals("keys/signing.json")
    assert not remote.seals("models/m.onnx")


@pytest.mark.parametrize("url", ["gs://bucket", "s3://", "/srv/artefacts", "S3://bucket"])
def test_a_storage_url_that_is_not_s3_is_refused_at_startup(url: str) -> None:
    with pytest.raises(ValidationError, match="s3://bucket"):
        Settings(storage_url=url, encryption_key=new_data_key())


def test_a_shared_store_without_a_shared_data_key_is_refused_at_startup() -> None:
    with pytest.raises(ValidationError, match="PPML_STORAGE_URL needs PPML_ENCRYPTION_KEY"):
        Settings(storage_url="s3://bucket", encryption_key=None)


def test_the_local_backend_lists_creates_once_and_reads_ranges(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path)
    for key in ("checkpoints/j1.1.pt", "checkpoints/j1.2.pt", "checkpoints/j10.1.pt"):
        store.write(key, lambda path: path.write_bytes(b"0123456789"))

    # act
    with store.staging() as first:
        first.write_bytes(b"first")
        created = store.create(first, "keys/once.json")
    with store.staging() as second:
        second.write_bytes(b"second")
        again = store.create(second, "keys/once.json")

    # assert
    assert store.list("checkpoints", "j1.") == ["checkpoints/j1.1.pt", "checkpoints/j1.2.pt"]
    assert store.list("models") == []
    assert created is not None and again is None
    assert store.path("keys/once.json").read_bytes() == b"first"
    assert b"".join(store.read_range("checkpoints/j1.1.pt", 2, 4)) == b"234"
    assert b"".join(store.read_range("checkpoints/j1.1.pt", 7)) == b"789"
    with pytest.raises(FileNotFoundError), store.open_plain("datasets/missing.npz"):
        pass
