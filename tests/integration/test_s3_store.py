"""The S3 backend of the artefact store against a real S3 server (SeaweedFS, signed requests)."""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
from pathlib import Path

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError

from ppml.storage import SEALED_KINDS, IntegrityError
from ppml.storage import s3 as s3_backend
from ppml.storage.s3 import S3Store
from ppml.trust.keys import StoredSigningKeys, canonical, verify
from ppml.trust.sealing import MAGIC, DataKeys, UnknownKey
from tests.integration.s3_helpers import S3Server

KEYS = DataKeys(b"k" * 32)


def _store(
    s3: S3Server, bucket: str, scratch: Path, *, prefix: str = "svc", keys: DataKeys | None = KEYS
) -> S3Store:
    return S3Store(bucket, prefix, scratch=scratch, keys=keys, client=s3.client())


@pytest.fixture
def bucket(s3: S3Server) -> str:
    return s3.new_bucket()


@pytest.fixture
def store(s3: S3Server, bucket: str, tmp_path: Path) -> S3Store:
    return _store(s3, bucket, tmp_path / "scratch")


def _raw(s3: S3Server, bucket: str, key: str) -> bytes:
    body: bytes = s3.client().get_object(Bucket=bucket, Key=f"svc/{key}")["Body"].read()
    return body


def test_a_published_object_keeps_its_sha256_as_metadata(
    s3: S3Server, bucket: str, store: S3Store
) -> None:
    # act
    artifact = store.write("models/m.onnx", lambda path: path.write_bytes(b"weights"))

    # assert: the digest is the stored bytes', kept with the object, and read back
    assert artifact.sha256 == hashlib.sha256(b"weights").hexdigest() and artifact.size == 7
    head = s3.client().head_object(Bucket=bucket, Key="svc/models/m.onnx")
    assert head["Metadata"]["sha256"] == artifact.sha256
    assert store.stat("models/m.onnx") == artifact
    with store.open_plain("models/m.onnx") as path:
        assert path.read_bytes() == b"weights"
    assert list((store.scratch).iterdir()) == []  # staged and fetched copies are gone
    empty = store.write("models/empty.onnx", lambda path: path.write_bytes(b""))
    assert empty.size == 0 and b"".join(store.read_range("models/empty.onnx")) == b""


def test_a_fetch_refuses_bytes_that_do_not_match_their_digest(
    s3: S3Server, bucket: str, store: S3Store
) -> None:
    # arrange: the object is replaced behind the store's back, its metadata kept
    artifact = store.write("models/m.onnx", lambda path: path.write_bytes(b"weights"))
    s3.client().put_object(
        Bucket=bucket, Key="svc/models/m.onnx", Body=b"poison", Metadata={"sha256": artifact.sha256}
    )

    # act / assert
    with pytest.raises(IntegrityError), store.open_plain("models/m.onnx"):
        pass


def test_sealed_kinds_are_stored_sealed_and_read_back_plain(
    s3: S3Server, bucket: str, store: S3Store, tmp_path: Path
) -> None:
    # arrange
    secret = b"patient,diagnosis\n" * 1000

    # act
    store.write("datasets/d.npz", lambda path: path.write_bytes(secret))
    store.write("models/m.onnx", lambda path: path.write_bytes(b"weights"))

    # assert: protected kinds hold ciphertext at rest; models stay plain for download
    assert "datasets" in SEALED_KINDS and "models" not in SEALED_KINDS
    raw = _raw(s3, bucket, "datasets/d.npz")
    assert raw.startswith(MAGIC) and b"patient" not in raw
    assert _raw(s3, bucket, "models/m.onnx") == b"weights"
    with store.open_plain("datasets/d.npz") as path:
        assert path.read_bytes() == secret
        assert (path.parent.stat().st_mode & 0o777) == 0o700
    keyless = _store(s3, bucket, tmp_path / "other", keys=None)
    with pytest.raises(UnknownKey), keyless.open_plain("datasets/d.npz"):
        pass


def test_a_multipart_publish_is_never_seen_in_part(
    s3: S3Server, bucket: str, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arrange: a 12 MiB object goes up in three 5 MiB parts, over an old version
    monkeypatch.setattr(s3_backend, "_MULTIPART", 5 << 20)
    monkeypatch.setattr(s3_backend, "_PART", 5 << 20)
    old, new = b"o" * 1000, os.urandom(12 << 20)
    store.write("models/big.onnx", lambda path: path.write_bytes(old))
    seen: set[str] = set()
    done = threading.Event()

    def read_while_uploading() -> None:
        while not done.is_set():
            with store.open_plain("models/big.onnx") as path:
                seen.add(hashlib.sha256(path.read_bytes()).hexdigest())

    reader = threading.Thread(target=read_while_uploading)
    reader.start()

    # act
    try:
        artifact = store.write("models/big.onnx", lambda path: path.write_bytes(new))
    finally:
        done.set()
        reader.join()
    with store.open_plain("models/big.onnx") as path:
        seen.add(hashlib.sha256(path.read_bytes()).hexdigest())

    # assert: every read saw the old object or the whole new one (multipart: ETag "…-3")
    head = s3.client().head_object(Bucket=bucket, Key="svc/models/big.onnx")
    assert head["ETag"].strip('"').endswith("-3")
    assert seen <= {hashlib.sha256(old).hexdigest(), artifact.sha256}
    assert artifact.sha256 in seen


def test_a_failed_writer_leaves_the_published_object(store: S3Store) -> None:
    # arrange
    store.write("models/m.onnx", lambda path: path.write_bytes(b"old"))

    def half_then_fail(path: Path) -> None:
        path.write_bytes(b"ne")
        raise RuntimeError("export failed")

    # act
    with pytest.raises(RuntimeError, match="export failed"):
        store.write("models/m.onnx", half_then_fail)

    # assert
    assert b"".join(store.read_range("models/m.onnx")) == b"old"
    assert list(store.scratch.iterdir()) == []


def test_a_large_model_is_streamed_in_chunks_and_by_ranges(store: S3Store) -> None:
    # arrange
    content = os.urandom(24 << 20)
    store.write("models/large.safetensors", lambda path: path.write_bytes(content))

    # act: stream it whole, measuring the memory held meanwhile
    digest, sizes = hashlib.sha256(), []
    tracemalloc.start()
    try:
        for chunk in store.read_range("models/large.safetensors"):
            digest.update(chunk)
            sizes.append(len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    middle = b"".join(store.read_range("models/large.safetensors", 5_000_000, 5_000_099))
    tail = b"".join(store.read_range("models/large.safetensors", len(content) - 10))

    # assert: never more than a few chunks in memory, and ranges are exact
    assert digest.hexdigest() == hashlib.sha256(content).hexdigest()
    assert max(sizes) <= 1 << 20 and sum(sizes) == len(content)
    assert peak < 8 << 20, f"peak {peak} bytes while streaming {len(content)}"
    assert middle == content[5_000_000:5_000_100]
    assert tail == content[-10:]


def test_missing_keys_raise_file_not_found(store: S3Store) -> None:
    for read in (
        lambda: store.stat("models/none.onnx"),
        lambda: b"".join(store.read_range("models/none.onnx")),
    ):
        with pytest.raises(FileNotFoundError):
            read()
    with pytest.raises(FileNotFoundError), store.open_plain("datasets/none.npz"):
        pass
    assert not store.exists("models/none.onnx")
    store.delete("models/none.onnx")  # deleting what is missing is no error
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.write("../escape", lambda path: path.write_bytes(b"x"))


def test_listing_sees_one_kind_and_prefix_and_not_other_stores(
    s3: S3Server, bucket: str, store: S3Store, tmp_path: Path
) -> None:
    # arrange: another service's prefix in the same bucket
    other = _store(s3, bucket, tmp_path / "other", prefix="svc2")
    for key in ("checkpoints/j1.1.pt", "checkpoints/j1.2.pt", "checkpoints/j10.1.pt"):
        store.write(key, lambda path: path.write_bytes(b"c"))
    other.write("checkpoints/j1.3.pt", lambda path: path.write_bytes(b"c"))

    # act / assert
    assert store.list("checkpoints", "j1.") == ["checkpoints/j1.1.pt", "checkpoints/j1.2.pt"]
    assert store.list("models") == []
    assert other.list("checkpoints") == ["checkpoints/j1.3.pt"]


def test_create_publishes_only_if_nothing_is_there(store: S3Store) -> None:
    with store.staging() as first:
        first.write_bytes(b"first")
        assert store.create(first, "models/once.json") is not None
    with store.staging() as second:
        second.write_bytes(b"second")
        assert store.create(second, "models/once.json") is None
    assert b"".join(store.read_range("models/once.json")) == b"first"


def test_requests_with_a_wrong_secret_are_refused(
    s3: S3Server, bucket: str, store: S3Store, tmp_path: Path
) -> None:
    store.write("models/m.onnx", lambda path: path.write_bytes(b"x"))
    intruder = S3Store(
        bucket, "svc", scratch=tmp_path, client=s3.client(secret_key="not-the-secret")
    )
    with pytest.raises((ClientError, S3UploadFailedError), match="SignatureDoesNotMatch"):
        intruder.write("models/m.onnx", lambda path: path.write_bytes(b"y"))
    with pytest.raises(ClientError, match=r"\(403\)"):  # a HEAD's refusal has no body
        intruder.stat("models/m.onnx")
    assert b"".join(store.read_range("models/m.onnx")) == b"x"


def test_processes_with_their_own_folders_share_one_sealed_keyring(
    s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    # arrange: an API and a worker on different machines (separate scratch folders)
    api = StoredSigningKeys(_store(s3, bucket, tmp_path / "api"))
    worker = StoredSigningKeys(_store(s3, bucket, tmp_path / "worker"))

    # act
    signature = worker.sign(canonical({"receipt": 1}))
    rotated = api.rotate()
    after = worker.sign(canonical({"receipt": 2}))

    # assert: one keyring; what one signs the other's public record verifies; rotation
    # reaches the other at once; private keys are sealed at rest
    assert verify(api.public_keys(), canonical({"receipt": 1}), signature.as_dict()) is None
    assert after.key_id == rotated["key_id"] == api.active()["key_id"]
    raw = _raw(s3, bucket, StoredSigningKeys.KEY)
    assert raw.startswith(MAGIC) and b"PRIVATE KEY" not in raw
    with pytest.raises(ValueError, match="data key"):
        StoredSigningKeys(_store(s3, bucket, tmp_path / "keyless", keys=None))


def test_processes_starting_together_agree_on_the_first_key(
    s3: S3Server, bucket: str, tmp_path: Path
) -> None:
    # arrange
    keyrings = [StoredSigningKeys(_store(s3, bucket, tmp_path / f"p{i}")) for i in range(4)]
    found: list[str] = []

    # act: every process creates the keyring at once
    threads = [
        threading.Thread(target=lambda k=k: found.append(k.active()["key_id"])) for k in keyrings
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # assert
    assert len(found) == 4 and len(set(found)) == 1
