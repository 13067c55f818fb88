"""Secrets at rest: sealed files and values (ppml.trust.sealing), the store that seals the
sensitive kinds, and the data key from the settings."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ppml.config import Settings
from ppml.datasets import DatasetArrays, load_arrays, open_secret, save_arrays, seal_secret
from ppml.storage import LocalStore
from ppml.trust.sealing import (
    CHUNK_BYTES,
    MAGIC,
    DataKeys,
    TamperedData,
    UnknownKey,
    new_data_key,
    sealed_key_id,
)

KEY = os.urandom(32)
KEYS = DataKeys(KEY)
# A row nobody could find in a file by chance: 8 features, one recognisable float32 pattern.
KNOWN_ROW = np.array([[1234.5678, -8765.4321, 3.1415927, 2.7182817, 42.0, -0.5, 1e-3, 7.25]])


def _seal(plain: bytes, keys: DataKeys = KEYS, context: str = "datasets/ds_a.npz") -> bytes:
    sink = io.BytesIO()
    keys.seal_stream(io.BytesIO(plain), sink, context=context)
    return sink.getvalue()


def _open(sealed: bytes, keys: DataKeys = KEYS, context: str = "datasets/ds_a.npz") -> bytes:
    sink = io.BytesIO()
    keys.open_stream(io.BytesIO(sealed), sink, context=context)
    return sink.getvalue()


def _arrays() -> DatasetArrays:
    rng = np.random.default_rng(0)
    x = np.concatenate([KNOWN_ROW, rng.random((99, 8))]).astype(np.float32)
    return DatasetArrays(
        x_train=x[:80],
        y_train=(np.arange(80) % 2).astype(np.int64),
        x_test=x[80:],
        y_test=(np.arange(20) % 2).astype(np.int64),
        classes=("a", "b"),
        feature_names=tuple(f"f{i}" for i in range(8)),
    )


# Sealed streams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 2 * CHUNK_BYTES + 5]
)
def test_a_sealed_stream_opens_to_what_was_sealed(size: int) -> None:
    # arrange
    plain = os.urandom(size)
    # act
    sealed = _seal(plain)
    # assert
    assert sealed.startswith(MAGIC)
    assert len(sealed) == 60 + size + 16 * max(1, -(-size // CHUNK_BYTES))
    if size >= 16:
        assert plain[:16] not in sealed
    assert _open(sealed) == plain


def test_every_flipped_byte_fails_authentication() -> None:
    # arrange: two chunks and a short final one
    sealed = _seal(os.urandom(2 * CHUNK_BYTES + 100))
    header = 60
    positions = [8, 9 + 8, 30, header - 1, header, header + CHUNK_BYTES, len(sealed) - 1]
    for position in positions:
        damaged = bytearray(sealed)
        damaged[position] ^= 0x01
        # act / assert: the key id's byte names another key; any other byte fails the tag
        with pytest.raises((TamperedData, UnknownKey)):
            _open(bytes(damaged))


def test_truncated_extended_or_reordered_files_fail() -> None:
    # arrange
    sealed = _seal(os.urandom(2 * CHUNK_BYTES + 100))
    header, chunk = 60, CHUNK_BYTES + 16
    first, second = sealed[header : header + chunk], sealed[header + chunk : header + 2 * chunk]
    # act / assert
    with pytest.raises(TamperedData):  # the final chunk dropped: the last one is not final
        _open(sealed[: header + 2 * chunk])
    with pytest.raises(TamperedData):  # only the header
        _open(sealed[:header])
    with pytest.raises(TamperedData):  # something appended after the final chunk
        _open(sealed + b"\0" * 16)
    with pytest.raises(TamperedData):  # two chunks swapped
        _open(sealed[:header] + second + first + sealed[header + 2 * chunk :])


def test_a_file_sealed_for_one_name_does_not_open_as_another() -> None:
    sealed = _seal(b"rows of ds_a", context="datasets/ds_a.npz")
    with pytest.raises(TamperedData, match=r"datasets/ds_b\.npz"):
        _open(sealed, context="datasets/ds_b.npz")


def test_a_wrong_key_is_named_in_a_clear_error() -> None:
    # arrange
    sealed = _seal(b"rows")
    other = DataKeys(os.urandom(32))
    # act / assert
    with pytest.raises(UnknownKey, match="PPML_ENCRYPTION_OLD_KEYS") as caught:
        _open(sealed, keys=other)
    assert KEYS.active_id in str(caught.value)
    with pytest.raises(TamperedData, match="not a sealed file"):
        _open(b"PK\x03\x04 a plain zip file, not sealed at all" * 3)


def test_a_rotated_keyring_opens_old_files_and_seals_under_the_new_key() -> None:
    # arrange
    old_file = _seal(b"sealed before the rotation")
    rotated = DataKeys(os.urandom(32), retired=[KEY])
    # act
    new_file = _seal(b"sealed after", keys=rotated)
    # assert
    assert _open(old_file, keys=rotated) == b"sealed before the rotation"
    assert sealed_key_id(new_file) == rotated.active_id != KEYS.active_id
    assert sealed_key_id(old_file) == KEYS.active_id
    with pytest.raises(UnknownKey):
        _open(new_file)  # the old keyring does not know the new key


def test_the_keyring_never_shows_its_keys() -> None:
    text = repr(KEYS)
    assert KEYS.active_id in text
    assert base64.b64encode(KEY).decode() not in text and KEY.hex() not in text


# Sealed values -----------------------------------------------------------------------------


def test_a_split_secret_is_stored_sealed_and_bound_to_its_dataset() -> None:
    # arrange
    secret = os.urandom(32).hex()
    # act
    stored = seal_secret(KEYS, "ds_a", secret)
    # assert
    assert stored.startswith(f"v1:{KEYS.active_id}:") and secret not in stored
    assert open_secret(KEYS, "ds_a", stored) == secret
    assert seal_secret(KEYS, "ds_a", secret) != stored  # a fresh nonce each time
    with pytest.raises(TamperedData):
        open_secret(KEYS, "ds_b", stored)  # copied into another dataset's row
    with pytest.raises(UnknownKey):
        open_secret(DataKeys(os.urandom(32)), "ds_a", stored)
    with pytest.raises(UnknownKey):
        open_secret(None, "ds_a", stored)


def test_a_legacy_plain_secret_is_read_as_it_is() -> None:
    legacy = os.urandom(32).hex()
    assert open_secret(KEYS, "ds_a", legacy) == legacy
    assert open_secret(None, "ds_a", None) is None


# The store ---------------------------------------------------------------------------------


def test_a_stored_dataset_is_not_readable_without_the_key(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path, keys=KEYS)
    arrays = _arrays()
    # act
    artifact = store.write("datasets/ds_a.npz", lambda path: save_arrays(arrays, path))
    # assert: on disk, ciphertext without the known row, which numpy cannot read
    stored = store.path("datasets/ds_a.npz").read_bytes()
    assert stored.startswith(MAGIC)
    assert KNOWN_ROW.astype(np.float32).tobytes() not in stored
    assert KNOWN_ROW.astype(np.float32)[0, :2].tobytes() not in stored
    assert b"x_train" not in stored  # not even the names inside the npz
    with pytest.raises((ValueError, OSError, zipfile.BadZipFile)):
        np.load(store.path("datasets/ds_a.npz"), allow_pickle=False)
    # the recorded digest and size are the stored (sealed) bytes'
    assert artifact.sha256 == hashlib.sha256(stored).hexdigest()
    assert artifact.size == len(stored)
    # with the key, the round trip is exact
    with store.open_plain("datasets/ds_a.npz") as path:
        loaded = load_arrays(path)
        copy = path
    np.testing.assert_array_equal(loaded.x_train, arrays.x_train)
    np.testing.assert_array_equal(loaded.y_test, arrays.y_test)
    assert not copy.exists() and not copy.parent.exists()  # the decrypted copy is gone
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_stored_checkpoint_is_not_readable_without_the_key(tmp_path: Path) -> None:
    # arrange
    import torch

    from ppml.jobs.checkpoints import JobCheckpoints

    store = LocalStore(tmp_path, keys=KEYS)
    weights = torch.from_numpy(KNOWN_ROW.astype(np.float32))
    files = JobCheckpoints(store, "job_a")
    # act
    files.save(1, {"kind": "sgd", "steps": 7, "model": {"w": weights}})
    # assert
    stored = store.path(files.key(1)).read_bytes()
    assert stored.startswith(MAGIC) and weights.numpy().tobytes() not in stored
    with pytest.raises(Exception):  # noqa: B017 (torch raises one of several types)
        torch.load(store.path(files.key(1)), weights_only=True)
    resumed = files.latest(before=2)
    assert resumed is not None and resumed["steps"] == 7
    assert torch.equal(resumed["model"]["w"], weights)
    # with another key the checkpoint does not open (and is skipped as unreadable)
    stranger = LocalStore(tmp_path, keys=DataKeys(os.urandom(32)))
    assert JobCheckpoints(stranger, "job_a").latest(before=2) is None


def test_a_sealed_file_moved_to_another_name_does_not_open(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path, keys=KEYS)
    store.write("datasets/ds_a.npz", lambda path: save_arrays(_arrays(), path))
    store.write("datasets/ds_b.npz", lambda path: path.write_bytes(b"other rows"))
    # act: ds_a's file put in place of ds_b's
    os.replace(store.path("datasets/ds_a.npz"), store.path("datasets/ds_b.npz"))
    # assert
    with pytest.raises(TamperedData), store.open_plain("datasets/ds_b.npz"):
        pass


def test_a_flipped_byte_in_a_stored_file_fails_to_open(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, keys=KEYS)
    store.write("uploads/ds_a.csv", lambda path: path.write_bytes(b"age,label\n42,sick\n"))
    path = store.path("uploads/ds_a.csv")
    damaged = bytearray(path.read_bytes())
    damaged[-3] ^= 0x80
    path.write_bytes(bytes(damaged))
    with pytest.raises(TamperedData), store.open_plain("uploads/ds_a.csv"):
        pass
    assert list((tmp_path / "tmp").iterdir()) == []  # no partial plain copy is left


def test_models_stay_plain_and_keyless_stores_cannot_read_sealed_files(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path, keys=KEYS)
    # act
    store.write("models/m.onnx", lambda path: path.write_bytes(b"weights"))
    store.write("uploads/ds_a.csv", lambda path: path.write_bytes(b"age,label\n42,sick\n"))
    # assert
    assert store.path("models/m.onnx").read_bytes() == b"weights"
    with store.open_plain("models/m.onnx") as path:
        assert path == store.path("models/m.onnx")
    with (
        pytest.raises(UnknownKey, match="no data key"),
        LocalStore(tmp_path).open_plain("uploads/ds_a.csv"),
    ):
        pass


def test_files_written_before_sealing_are_read_as_they_are(tmp_path: Path) -> None:
    LocalStore(tmp_path).write("datasets/ds_a.npz", lambda path: save_arrays(_arrays(), path))
    with LocalStore(tmp_path, keys=KEYS).open_plain("datasets/ds_a.npz") as path:
        assert load_arrays(path).n_train == 80


def test_the_sweep_removes_abandoned_plain_copies_only(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path, keys=KEYS)
    with store.staging(".npz") as live:
        live.write_bytes(b"being written")
        abandoned = tmp_path / "tmp" / "plain-dead"
        abandoned.mkdir()
        (abandoned / "ds_a.npz").write_bytes(b"plain rows of a crashed reader")
        old = time.time() - 2 * 86400
        os.utime(abandoned, (old, old))
        # act
        removed = store.sweep(older_than_s=86400)
        # assert
        assert removed == 1 and not abandoned.exists() and live.exists()


# The data key in the settings --------------------------------------------------------------


def test_the_local_key_is_generated_once_private_and_shared(tmp_path: Path) -> None:
    # arrange
    first = Settings(data_dir=tmp_path, encryption_key=None)
    # act
    key = first.ensure_encryption_key()
    again = Settings(data_dir=tmp_path, encryption_key=None).ensure_encryption_key()
    # assert
    path = tmp_path / "encryption_key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert key == again == path.read_text().strip()
    assert len(base64.b64decode(key)) == 32
    assert [p.name for p in tmp_path.iterdir()] == ["encryption_key"]
    assert key not in repr(first)


def test_the_key_from_the_environment_wins_and_retired_keys_still_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arrange
    old, new = new_data_key(), new_data_key()
    sealed = _seal(b"rows", keys=DataKeys(base64.b64decode(old)))
    monkeypatch.setenv("PPML_ENCRYPTION_KEY", new)
    monkeypatch.setenv("PPML_ENCRYPTION_OLD_KEYS", f" {old} ,")
    # act
    keys = DataKeys.from_settings(Settings(data_dir=tmp_path))
    # assert
    assert _open(sealed, keys=keys) == b"rows"
    assert keys.active_id == DataKeys(base64.b64decode(new)).active_id
    assert not (tmp_path / "encryption_key").exists()


def test_a_malformed_key_is_refused_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="base64 of 32 bytes"):
        Settings(data_dir=tmp_path, encryption_key=base64.b64encode(b"short").decode())
    with pytest.raises(ValidationError, match="base64"):
        Settings(data_dir=tmp_path, encryption_old_keys="not base64!")


def test_production_requires_the_data_key(tmp_path: Path) -> None:
    production = {
        "environment": "production",
        "data_dir": tmp_path,
        "admin_token": "a" * 32,
        "database_url": "postgresql+psycopg://u@h/db",
        "broker_url": "redis://h:6379/0",
    }
    with pytest.raises(ValidationError, match="PPML_ENCRYPTION_KEY"):
        Settings(**production, encryption_key=None)
    assert Settings(**production, encryption_key=new_data_key()).environment == "production"
