"""Secrets at rest through the service: registered and uploaded data are sealed on disk, and the
per-dataset split secret is never plain in the database (PostgreSQL and SQLite)."""

from __future__ import annotations

import base64
import os
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy import text

from ppml.config import Settings
from ppml.datasets import load_arrays, load_builtin, open_secret
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.services.datasets import seal_split_secrets
from ppml.services.ingestion import ingest_upload
from ppml.storage import ArtifactStore
from ppml.trust.sealing import MAGIC, DataKeys, UnknownKey, new_data_key
from tests.conftest import register_digits
from tests.integration.ingest_helpers import ingest_in

# A value that appears in exactly one uploaded row, easy to look for in the stored bytes.
NEEDLE = "987654.125"


def _stored_secret(database: Database, dataset_id: str) -> str:
    with database.session() as session:
        row = Repositories(session).dataset_by_id(dataset_id)
        assert row is not None and row.split_secret is not None
        return row.split_secret


def _column_dump(database: Database) -> str:
    """Every split secret as the database holds it, read with plain SQL."""
    with database.session() as session:
        return " ".join(session.execute(text("SELECT split_secret FROM datasets")).scalars())


def test_a_registered_datasets_secret_and_arrays_are_sealed(
    client: TestClient, tenant: dict[str, str], settings: Settings, database: Database
) -> None:
    # arrange
    keys = DataKeys.from_settings(settings)
    # act
    dataset_id = register_digits(client, tenant)
    # assert: the column holds a sealed value, which opens to the secret behind the split
    stored = _stored_secret(database, dataset_id)
    assert stored.startswith(f"v1:{keys.active_id}:")
    secret = open_secret(keys, dataset_id, stored)
    assert secret is not None and len(bytes.fromhex(secret)) == 32
    assert secret not in _column_dump(database)
    store = ArtifactStore.for_settings(settings)
    with store.open_plain(f"datasets/{dataset_id}.npz") as path:
        arrays = load_arrays(path)
    np.testing.assert_array_equal(
        arrays.x_test, load_builtin("digits", secret=secret).x_test.astype(arrays.x_test.dtype)
    )
    # the file on disk: sealed, unreadable as an npz, without the rows' bytes
    on_disk = store.path(f"datasets/{dataset_id}.npz")
    assert on_disk.read_bytes().startswith(MAGIC)
    assert arrays.x_train[0].tobytes() not in on_disk.read_bytes()
    with pytest.raises((ValueError, OSError, zipfile.BadZipFile)):
        np.load(on_disk, allow_pickle=False)


def test_an_upload_is_sealed_from_the_moment_it_is_stored(
    client: TestClient, tenant: dict[str, str], settings: Settings
) -> None:
    # arrange
    rows = ["age,dose,label"] + [f"{20 + i % 50},{i / 100:.2f},{'ab'[i % 2]}" for i in range(60)]
    content = ("\n".join([*rows, f"{NEEDLE},0.5,a"]) + "\n").encode()
    store = ArtifactStore.for_settings(settings)
    # act
    response = client.post(
        "/v1/datasets/upload",
        headers=tenant,
        data={"name": "visits", "target": "label"},
        files={"file": ("visits.csv", content)},
    )
    # assert: stored as it came, but sealed
    assert response.status_code == 202, response.text
    dataset_id = response.json()["id"]
    raw = store.path(f"uploads/{dataset_id}.csv").read_bytes()
    assert raw.startswith(MAGIC) and NEEDLE.encode() not in raw and b"age,dose" not in raw
    # the worker opens it with the shared key; the arrays it publishes are sealed too
    assert ingest_in(client, dataset_id) == "ready"
    assert not store.exists(f"uploads/{dataset_id}.csv")
    stored = store.path(f"datasets/{dataset_id}.npz").read_bytes()
    assert stored.startswith(MAGIC)
    assert np.float32(float(NEEDLE)).tobytes() not in stored
    with store.open_plain(f"datasets/{dataset_id}.npz") as path:
        arrays = load_arrays(path)
    everything = np.concatenate([arrays.x_train, arrays.x_test])
    assert np.float32(float(NEEDLE)) in everything[:, 0]


def test_a_worker_without_the_key_leaves_the_upload_validating(
    client: TestClient, tenant: dict[str, str], settings: Settings, database: Database
) -> None:
    # arrange: an upload sealed by the API, and a worker configured with another key
    content = b"age,label\n" + b"".join(f"{i},{'ab'[i % 2]}\n".encode() for i in range(40))
    response = client.post(
        "/v1/datasets/upload",
        headers=tenant,
        data={"name": "visits", "target": "label"},
        files={"file": ("visits.csv", content)},
    )
    dataset_id = response.json()["id"]
    stranger = settings.model_copy(update={"encryption_key": SecretStr(new_data_key())})
    # act / assert: a clear error, and nothing of the upload lost
    with pytest.raises(UnknownKey, match="PPML_ENCRYPTION_OLD_KEYS"):
        ingest_upload(database, ArtifactStore.for_settings(stranger), stranger, dataset_id)
    shown = client.get(f"/v1/datasets/{dataset_id}", headers=tenant).json()
    assert shown["status"] == "validating"
    assert ArtifactStore.for_settings(settings).exists(f"uploads/{dataset_id}.csv")


def test_plain_secrets_are_sealed_at_start_and_rewrapped_after_a_rotation(
    client: TestClient, tenant: dict[str, str], settings: Settings, database: Database
) -> None:
    # arrange: a row as written before sealing (its secret in plain hex)
    dataset_id = register_digits(client, tenant)
    keys = DataKeys.from_settings(settings)
    legacy = open_secret(keys, dataset_id, _stored_secret(database, dataset_id))
    with database.session(write=True) as session:
        session.execute(
            text("UPDATE datasets SET split_secret = :s WHERE id = :i"),
            {"s": legacy, "i": dataset_id},
        )
    assert legacy is not None and legacy in _column_dump(database)
    # act
    sealed_now = seal_split_secrets(database, keys)
    again = seal_split_secrets(database, keys)
    # assert: sealed once, under the active key, to the same secret
    assert (sealed_now, again) == (1, 0)
    assert legacy not in _column_dump(database)
    assert open_secret(keys, dataset_id, _stored_secret(database, dataset_id)) == legacy
    # act: the data key rotates (the old one kept for reading); the next start re-wraps
    new = os.urandom(32)
    rotated = DataKeys(new, retired=[base64.b64decode(settings.ensure_encryption_key())])
    assert seal_split_secrets(database, rotated) == 1
    # assert: the row names the new key, and the new key alone opens it
    stored = _stored_secret(database, dataset_id)
    assert stored.startswith(f"v1:{rotated.active_id}:")
    assert open_secret(DataKeys(new), dataset_id, stored) == legacy
