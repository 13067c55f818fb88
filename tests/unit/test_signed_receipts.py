"""Signed receipts: signed when a model is released, checked offline (ppml.trust.receipts),
bound to the job's files, mechanisms and ledger (ppml.jobs.receipts), served over HTTP."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ppml.config import Settings
from ppml.db.models import JobStatus
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.jobs.runner import JobRunner
from ppml.trust.keys import SigningKeys, canonical
from ppml.trust.receipts import RECEIPT_FORMAT, check_receipt, receipt_file, sign_receipt
from tests.conftest import dp_job_spec, new_tenant, register_digits
from tests.unit.worlds import make_world, worker_settings

MODEL = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      weights"


def _signed(keys: SigningKeys, model: bytes = MODEL) -> bytes:
    body = {
        "job_id": "job_1",
        "artifacts": {"safetensors": {"sha256": hashlib.sha256(model).hexdigest()}},
        "dataset": {"id": "ds_1", "fingerprint": "sha256:ab"},
        "privacy": {"epsilon": 1.25, "delta": 1e-5, "mechanisms": [{"epsilon": 1.2}]},
        "ledger": {"entries": [{"id": "led_1", "kind": "commit"}], "chain_head": None},
    }
    return receipt_file(sign_receipt(keys, body))


def _keys_file(keys: SigningKeys) -> bytes:
    return json.dumps({"keys": keys.public_keys()}).encode()


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys(tmp_path / "keys")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    path.write_bytes(MODEL)
    return path


def _failed(result: Any) -> list[str]:
    return [check.name for check in result.checks if not check.ok]


# ------------------------------------------------------------------------------ offline


def test_a_signed_receipt_verifies_offline(keys: SigningKeys, model: Path) -> None:
    # arrange
    receipt = _signed(keys)
    # act
    result = check_receipt(model, receipt, _keys_file(keys))
    # assert
    assert result.ok, result.checks
    assert [c.name for c in result.checks] == [
        "receipt file",
        "signature",
        "key validity",
        "digest",
    ]
    assert result.document is not None and result.document["format"] == RECEIPT_FORMAT


def test_one_flipped_byte_of_the_model_fails_on_its_digest(keys: SigningKeys, model: Path) -> None:
    # arrange
    receipt = _signed(keys)
    data = bytearray(MODEL)
    data[-1] ^= 0x01
    model.write_bytes(bytes(data))
    # act
    result = check_receipt(model, receipt, _keys_file(keys))
    # assert
    assert not result.ok and _failed(result) == ["digest"]


def test_every_one_byte_change_of_the_receipt_fails(keys: SigningKeys, model: Path) -> None:
    # arrange
    receipt = _signed(keys)
    public = _keys_file(keys)
    for position in range(len(receipt)):
        changed = bytearray(receipt)
        changed[position] ^= 0x01
        # act
        result = check_receipt(model, bytes(changed), public)
        # assert
        assert not result.ok, f"byte {position} ({chr(receipt[position])!r}) changed unseen"


def test_a_changed_figure_fails_on_the_signature(keys: SigningKeys, model: Path) -> None:
    # arrange: one digit of ε, changed in a re-serialised canonical file
    receipt = json.loads(_signed(keys))
    receipt["receipt"]["privacy"]["epsilon"] = 1.35
    # act
    result = check_receipt(model, canonical(receipt), _keys_file(keys))
    # assert
    assert _failed(result) == ["signature", "key validity"]


def test_a_key_retired_before_the_receipt_was_issued_fails(keys: SigningKeys, model: Path) -> None:
    # arrange: the record says the signing key was retired a second before the receipt
    receipt = _signed(keys)
    issued = datetime.fromisoformat(json.loads(receipt)["receipt"]["issued_at"])
    public = keys.public_keys()
    public[0]["retired_at"] = (issued - timedelta(seconds=1)).isoformat()
    # act
    result = check_receipt(model, receipt, json.dumps({"keys": public}).encode())
    # assert
    assert _failed(result) == ["key validity"]
    assert "retired" in next(c.detail for c in result.checks if not c.ok)


def test_an_unknown_key_fails(keys: SigningKeys, model: Path, tmp_path: Path) -> None:
    receipt = _signed(keys)
    other = SigningKeys(tmp_path / "other-keys")

    result = check_receipt(model, receipt, _keys_file(other))

    assert "signature" in _failed(result)


def test_rotation_keeps_old_receipts_valid(keys: SigningKeys, model: Path) -> None:
    # arrange
    old = _signed(keys)
    new_key = keys.rotate()
    new = _signed(keys)
    public = _keys_file(keys)
    # act
    results = [check_receipt(model, receipt, public) for receipt in (old, new)]
    # assert
    assert all(result.ok for result in results), [r.checks for r in results]
    assert json.loads(new)["signature"]["key_id"] == new_key["key_id"]
    assert json.loads(old)["signature"]["key_id"] != new_key["key_id"]


def test_a_rotation_by_another_process_reaches_a_signer_at_once(
    keys: SigningKeys, model: Path, tmp_path: Path
) -> None:
    # arrange: this signer has signed (and parsed its key) before the other one rotates
    _signed(keys)
    new_key = SigningKeys(tmp_path / "keys").rotate()
    # act
    receipt = _signed(keys)
    # assert
    assert json.loads(receipt)["signature"]["key_id"] == new_key["key_id"]
    assert check_receipt(model, receipt, _keys_file(keys)).ok


def test_malformed_files_fail_with_a_reason_instead_of_a_crash(
    keys: SigningKeys, model: Path, tmp_path: Path
) -> None:
    # arrange
    receipt, public = _signed(keys), _keys_file(keys)
    bad_key = json.dumps({"keys": [{**keys.active(), "created_at": "yesterday"}]}).encode()
    cases = [
        (model, receipt.replace(b'"epsilon":1.25', b'"epsilon":NaN'), public),
        (model, b"not json", public),
        (model, b"[]", public),
        (model, receipt, b"{}"),
        (model, receipt, bad_key),
        (tmp_path / "missing.safetensors", receipt, public),
    ]
    for path, receipt_bytes, keys_bytes in cases:
        # act
        result = check_receipt(path, receipt_bytes, keys_bytes)
        # assert
        assert not result.ok
        assert all(check.detail for check in result.checks if not check.ok)


# ------------------------------------------------------------------------- at release


def test_a_released_models_receipt_binds_its_files_mechanisms_and_ledger(
    database: Database, settings: Settings
) -> None:
    # arrange
    world = make_world(database, worker_settings(settings))
    job_id = world.submit(private=True)
    # act
    assert JobRunner(world.db, world.settings, owner="worker-a").run(job_id) == "succeeded"
    # assert
    job = world.job(job_id)
    assert job.receipt is not None and job.receipt.signed is not None
    assert job.artifacts is not None and job.privacy is not None
    signed = job.receipt.signed
    document = signed.document()
    entries = world.job_ledger(job_id)
    with database.session() as session:
        head = Repositories(session).newest_ledger_entry(job.dataset_id)
    assert head is not None
    assert document["job_id"] == job_id and document["dataset"]["id"] == job.dataset_id
    assert "fingerprint" in document["dataset"]
    assert document["artifacts"] == {
        fmt: {"sha256": ref.sha256} for fmt, ref in job.artifacts.root.items()
    }
    assert [e["id"] for e in document["ledger"]["entries"]] == [e.id for e in entries]
    assert {e["kind"] for e in document["ledger"]["entries"]} == {"reserve", "commit", "release"}
    assert document["ledger"]["chain_head"]["entry_id"] == head.id
    assert document["privacy"]["ledger_entry_id"] == job.privacy.ledger_entry_id
    assert document["privacy"]["epsilon"] == job.privacy.epsilon_spent
    names = [m["name"] for m in document["privacy"]["mechanisms"]]
    assert names[0] == "training" and all(
        m["epsilon"] > 0 for m in document["privacy"]["mechanisms"]
    )
    assert document["receipt"] == job.receipt.model_dump(mode="json", exclude={"signed"})
    keys = SigningKeys(world.settings.signing_keys_dir)
    for fmt, ref in job.artifacts.root.items():
        result = check_receipt(
            world.store.path(ref.key), receipt_file(signed), _keys_file(keys), fmt=fmt
        )
        assert result.ok, result.checks


# ------------------------------------------------------------------------------- HTTP


def test_the_public_keys_are_served_without_a_key_and_cacheable(
    client: TestClient, settings: Settings
) -> None:
    response = client.get("/.well-known/ppml-signing-keys.json")

    assert response.status_code == 200
    assert "max-age" in response.headers["cache-control"]
    assert "public" in response.headers["cache-control"]
    active = SigningKeys(settings.signing_keys_dir).active()
    assert response.json()["keys"][-1]["key_id"] == active["key_id"]
    assert "private" not in response.text.lower()


def test_a_job_without_a_model_has_no_receipt(client: TestClient, tenant: dict[str, str]) -> None:
    # arrange: a queued job (no worker runs here) and another tenant
    dataset_id = register_digits(client, tenant)
    job = client.post("/v1/jobs", json=dp_job_spec(dataset_id, epochs=1), headers=tenant).json()
    stranger = new_tenant(client)
    path = f"/v1/jobs/{job['id']}/receipt"
    # act
    answers = [client.get(path, headers=tenant), client.get(path, headers=stranger)]
    anonymous = client.get(path)
    # assert
    assert [a.status_code for a in answers] == [409, 404]
    assert all(a.headers["content-type"] == "application/problem+json" for a in answers)
    assert answers[0].json()["type"].endswith("model-not-ready")
    assert anonymous.status_code == 401
    assert job["status"] == JobStatus.QUEUED
