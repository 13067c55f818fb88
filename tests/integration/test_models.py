"""Models over HTTP against a real ``ppml serve``: ONNX download, model card, predictions.

One service and a few small jobs serve the whole module: a DP MLP on digits, a non-private
logistic regression on public data, and a job cancelled while queued.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from ppml.datasets import load_builtin
from tests.integration.stack import (
    BIN,
    embedded_serve,
    wait_for_status,
)

ADMIN = "models-admin-token-0123456789"
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Service:
    base: str
    data_dir: Path
    pid: int


@dataclass
class Trained:
    client: httpx.Client
    key: str
    dp_job: dict[str, Any]
    public_job: dict[str, Any]
    cancelled_job: dict[str, Any]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("models")
    with embedded_serve(root, ADMIN) as (base, proc):
        yield Service(base=base, data_dir=root / "data", pid=proc.pid)


def _tenant(base: str, name: str) -> tuple[httpx.Client, str]:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    tenant = httpx.post(f"{base}/v1/tenants", json={"name": name}, headers=admin)
    assert tenant.status_code == 201, tenant.text
    key = httpx.post(f"{base}/v1/tenants/{tenant.json()['id']}/api-keys", headers=admin)
    assert key.status_code == 201, key.text
    secret = key.json()["key"]
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    return client, secret


def _dataset(client: httpx.Client, builtin: str, budget: dict[str, float] | None) -> str:
    body = {"name": builtin, "source": {"builtin": builtin}, "privacy_budget": budget}
    response = client.post("/v1/datasets", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _spec(dataset_id: str, arch: str, *, private: bool, epochs: int = 4) -> dict[str, Any]:
    privacy = {"target_epsilon": 2.0, "delta": 1e-5, "max_grad_norm": 1.0} if private else None
    return {
        "name": f"{arch}-job",
        "dataset_id": dataset_id,
        "model": {"arch": arch, "hidden_sizes": [32]},
        "training": {"epochs": epochs, "batch_size": 64, "learning_rate": 0.5, "seed": 0},
        "privacy": privacy,
        "federated": None,
    }


@pytest.fixture(scope="module")
def trained(service: Service) -> Trained:
    client, key = _tenant(service.base, "modeller")
    digits = _dataset(client, "digits", {"epsilon": 8.0, "delta": 1e-5})
    public = _dataset(client, "breast_cancer", None)
    dp = client.post("/v1/jobs", json=_spec(digits, "mlp", private=True)).json()
    plain = client.post("/v1/jobs", json=_spec(public, "logreg", private=False)).json()
    # Queued behind the two others on the single embedded worker: cancelled before it runs.
    doomed = client.post("/v1/jobs", json=_spec(digits, "logreg", private=True)).json()
    assert client.post(f"/v1/jobs/{doomed['id']}/cancel").status_code == 202
    dp_job = wait_for_status(client, dp["id"], TERMINAL)
    public_job = wait_for_status(client, plain["id"], TERMINAL)
    assert dp_job["status"] == "succeeded", dp_job
    assert public_job["status"] == "succeeded", public_job
    cancelled = wait_for_status(client, doomed["id"], TERMINAL)
    return Trained(client, key, dp_job, public_job, cancelled)


def _download(client: httpx.Client, job_id: str, fmt: str) -> httpx.Response:
    response = client.get(f"/v1/jobs/{job_id}/model", params={"format": fmt})
    assert response.status_code == 200, response.text
    return response


def test_onnx_download_matches_the_pytorch_model_and_carries_the_receipt(
    trained: Trained, tmp_path: Path
) -> None:
    import torch

    from ppml.training.export import load_model

    # arrange
    job_id = trained.dp_job["id"]
    onnx_file = _download(trained.client, job_id, "onnx")
    weights = _download(trained.client, job_id, "safetensors")
    (tmp_path / "m.safetensors").write_bytes(weights.content)
    module, st_metadata = load_model(tmp_path / "m.safetensors")
    session = ort.InferenceSession(onnx_file.content, providers=["CPUExecutionProvider"])
    x = load_builtin("digits", seed=0).x_test
    # act
    for batch in (1, 17, len(x)):
        (logits,) = session.run(["logits"], {"input": x[:batch]})
        with torch.no_grad():
            expected = module(torch.from_numpy(x[:batch])).numpy()
        # assert
        assert np.abs(logits - expected).max() <= 1e-4
    assert session.get_modelmeta().custom_metadata_map == st_metadata
    card = trained.client.get(f"/v1/jobs/{job_id}/model/card").json()
    for fmt, response in (("onnx", onnx_file), ("safetensors", weights)):
        assert response.headers["x-content-sha256"] == card["artifacts"][fmt]["sha256"]
        assert response.headers["content-type"] == "application/octet-stream"
        assert f'filename="{job_id}.{fmt}"' in response.headers["content-disposition"]


def test_model_card_states_the_full_privacy_receipt(trained: Trained) -> None:
    # arrange
    job = trained.dp_job
    # act
    card = trained.client.get(f"/v1/jobs/{job['id']}/model/card").json()
    # assert
    privacy = card["privacy"]
    assert card["job_id"] == job["id"] and card["dataset_id"] == job["dataset_id"]
    assert card["private"] is True and card["privacy_unit"] == "record"
    assert privacy["epsilon"] == job["privacy"]["epsilon_spent"]
    assert privacy["delta"] == job["privacy"]["delta"] == 1e-5
    assert privacy["accountant"] == "rdp" and privacy["sampling"] == "poisson"
    assert privacy["noise_multiplier"] == job["privacy"]["noise_multiplier"]
    assert privacy["max_grad_norm"] == 1.0
    assert privacy["sample_rate"] == job["privacy"]["sample_rate"]
    assert privacy["steps"] == job["privacy"]["steps"] > 0
    ledger = trained.client.get(f"/v1/datasets/{job['dataset_id']}/ledger").json()["items"]
    commits = [e["id"] for e in ledger if e["job_id"] == job["id"] and e["kind"] == "commit"]
    assert privacy["ledger_entry_id"] == job["privacy"]["ledger_entry_id"] == commits[0]
    assert set(card["libraries"]) == {"ppml", "torch", "opacus", "dp-accounting"}
    assert card["metrics"] == job["metrics"] and "test_accuracy" in card["metrics"]
    assert set(card["artifacts"]) == {"safetensors", "onnx"}
    assert card["architecture"]["arch"] == "mlp" and card["architecture"]["num_features"] == 64
    assert card["classes"] == [str(c) for c in range(10)]
    receipt = card["receipt"]
    assert json.loads(receipt["metrics"]) == job["metrics"]
    assert float(receipt["epsilon"]) == privacy["epsilon"]
    assert "x_train" not in json.dumps(card)  # the dataset's id, never its content


def test_predict_answers_labels_and_probabilities_like_the_onnx_model(trained: Trained) -> None:
    # arrange
    job = trained.dp_job
    session = ort.InferenceSession(
        _download(trained.client, job["id"], "onnx").content, providers=["CPUExecutionProvider"]
    )
    x = load_builtin("digits", seed=0).x_test[:17]
    for rows in (x[:1], x):
        # act
        response = trained.client.post(
            f"/v1/jobs/{job['id']}/predict", json={"inputs": rows.tolist()}
        )
        # assert
        assert response.status_code == 200, response.text
        body = response.json()
        (logits,) = session.run(["logits"], {"input": rows})
        expected = np.exp(logits - logits.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        np.testing.assert_allclose(body["probabilities"], expected, atol=1e-5)
        assert body["class_indices"] == expected.argmax(1).tolist()
        assert body["predictions"] == [str(i) for i in body["class_indices"]]
        assert body["receipt_id"] == job["privacy"]["ledger_entry_id"]
        card = trained.client.get(f"/v1/jobs/{job['id']}/model/card").json()
        assert body["model_sha256"] == card["artifacts"]["onnx"]["sha256"]


def test_concurrent_predictions_agree(trained: Trained) -> None:
    job_id = trained.dp_job["id"]
    x = load_builtin("digits", seed=0).x_test[:8].tolist()

    def call(_: int) -> list[int]:
        response = trained.client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": x})
        assert response.status_code == 200
        return list(response.json()["class_indices"])

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(32)))

    assert all(answer == answers[0] for answer in answers)


def _bad_rows() -> list[tuple[str, Any, str]]:
    good = [0.5] * 64
    return [
        ("wrong-width", {"inputs": [good, [0.5] * 63]}, "inputs.1"),
        ("empty", {"inputs": []}, "inputs"),
        ("no-inputs", {}, "inputs"),
        ("string", {"inputs": [[*good[:63], "1"]]}, "inputs.0.63"),
        ("boolean", {"inputs": [[*good[:63], True]]}, "inputs.0.63"),
        ("beyond-float32", {"inputs": [good, [*good[:10], 1e39, *good[11:]]]}, "inputs.1.10"),
        ("too-many-rows", {"inputs": [[0.0] * 64] * 4097}, "inputs"),
        ("unknown-field", {"inputs": [good], "extra": 1}, "extra"),
    ]


@pytest.mark.parametrize(
    ("body", "field"), [c[1:] for c in _bad_rows()], ids=[c[0] for c in _bad_rows()]
)
def test_predict_refuses_bad_inputs_with_422_naming_the_field(
    trained: Trained, body: Any, field: str
) -> None:
    response = trained.client.post(f"/v1/jobs/{trained.dp_job['id']}/predict", json=body)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_predict_refuses_non_finite_numbers(trained: Trained, token: str) -> None:
    row = ", ".join(["0.5"] * 5 + [token] + ["0.5"] * 58)
    response = trained.client.post(
        f"/v1/jobs/{trained.dp_job['id']}/predict",
        content=f'{{"inputs": [[{row}]]}}',
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 422, response.text
    assert response.json()["field"] == "inputs.0.5"


def test_models_of_a_job_that_did_not_succeed_answer_409(trained: Trained) -> None:
    job_id = trained.cancelled_job["id"]
    assert trained.cancelled_job["status"] == "cancelled"

    answers = [
        trained.client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.0] * 64]}),
        trained.client.get(f"/v1/jobs/{job_id}/model", params={"format": "onnx"}),
        trained.client.get(f"/v1/jobs/{job_id}/model/card"),
        trained.client.get(f"/v1/jobs/{job_id}/receipt"),
    ]

    for response in answers:
        assert response.status_code == 409, response.text
        assert response.json()["type"].endswith("model-not-ready")


def test_another_tenants_model_is_not_found(trained: Trained, service: Service) -> None:
    stranger, _ = _tenant(service.base, "stranger")
    job_id = trained.dp_job["id"]

    predict = stranger.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.0] * 64]})
    card = stranger.get(f"/v1/jobs/{job_id}/model/card")
    receipt = stranger.get(f"/v1/jobs/{job_id}/receipt")
    anonymous = httpx.post(f"{service.base}/v1/jobs/{job_id}/predict", json={"inputs": [[0.0]]})

    assert predict.status_code == 404 and card.status_code == 404 and receipt.status_code == 404
    assert anonymous.status_code == 401


def test_non_private_model_says_so(trained: Trained) -> None:
    job_id = trained.public_job["id"]

    card = trained.client.get(f"/v1/jobs/{job_id}/model/card").json()
    answer = trained.client.post(f"/v1/jobs/{job_id}/predict", json={"inputs": [[0.0] * 30]})

    assert card["private"] is False and card["privacy"] is None
    assert card["receipt"]["private"] == "false"
    assert answer.status_code == 200
    assert answer.json()["receipt_id"] is None
    assert answer.json()["predictions"][0] in card["classes"]


def test_the_api_process_never_imports_torch(trained: Trained, service: Service) -> None:
    # arrange: an API process of its own on the service's data, and the running server
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from fastapi.testclient import TestClient
        from api.app import create_app
        from ppml.config import Settings

        app = create_app(Settings(data_dir=Path({str(service.data_dir)!r}), admin_token="x" * 20))
        headers = {{"Authorization": "Bearer {trained.key}"}}
        with TestClient(app) as client:
            job = {trained.dp_job["id"]!r}
            ok = client.post(f"/v1/jobs/{{job}}/predict", json={{"inputs": [[0.1] * 64]}},
                             headers=headers)
            assert ok.status_code == 200, ok.text
            assert client.get(f"/v1/jobs/{{job}}/model/card", headers=headers).status_code == 200
            assert client.get(f"/v1/jobs/{{job}}/model?format=onnx",
                              headers=headers).status_code == 200
        assert "onnxruntime" in sys.modules
        assert "torch" not in sys.modules, "the API imported torch"
        print("no torch")
        """
    )
    # act
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    # assert
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no torch" in result.stdout
    maps = Path(f"/proc/{service.pid}/maps")
    if maps.exists():  # the `ppml serve` process (uvicorn) after serving predictions
        assert "libtorch" not in maps.read_text()


def _analyst(service: Service, trained: Trained) -> httpx.Client:
    """An analyst key of the tenant that trained the jobs."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    tenants = httpx.get(f"{service.base}/v1/tenants", headers=admin).json()["items"]
    tenant_id = next(t["id"] for t in tenants if t["name"] == "modeller")
    key = httpx.post(
        f"{service.base}/v1/tenants/{tenant_id}/api-keys", json={"role": "analyst"}, headers=admin
    )
    assert key.status_code == 201, key.text
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    return httpx.Client(base_url=service.base, headers=headers, timeout=30)


def test_analysts_see_metrics_released_by_a_charged_gaussian_mechanism(
    service: Service, trained: Trained
) -> None:
    # arrange
    analyst = _analyst(service, trained)
    job_id, dataset_id = trained.dp_job["id"], trained.dp_job["dataset_id"]
    # act
    job = analyst.get(f"/v1/jobs/{job_id}").json()
    card = analyst.get(f"/v1/jobs/{job_id}/model/card").json()
    ledger = analyst.get(f"/v1/datasets/{dataset_id}/ledger").json()["items"]
    # assert: the metrics name their mechanism, and it is the one priced and charged
    evaluation = job["privacy"]["evaluation"]
    release = job["metrics"]["release"]
    assert release["mechanism"] == evaluation["mechanism"] == "gaussian"
    assert release["noise_multiplier"] == evaluation["noise_multiplier"] > 0
    assert release["units"] == analyst.get(f"/v1/datasets/{dataset_id}").json()["num_test"]
    assert release["accuracy_noise_std"] == release["noise_multiplier"] / release["units"]
    commit = next(e for e in ledger if e["job_id"] == job_id and e["kind"] == "commit")
    assert commit["event"]["eval_noise_multiplier"] == evaluation["noise_multiplier"]
    assert commit["event"]["eval_releases"] == 2
    assert job["privacy"]["epsilon_spent"] <= job["privacy"]["target_epsilon"]
    # the files and the card carry the same release, never the exact figures
    assert card["metrics"] == job["metrics"]
    assert json.loads(card["receipt"]["metrics"]) == job["metrics"]
    assert json.loads(card["receipt"]["evaluation"]) == evaluation


def test_exact_metrics_are_for_the_datasets_owner_only(service: Service, trained: Trained) -> None:
    # arrange
    analyst = _analyst(service, trained)
    path = f"/v1/jobs/{trained.dp_job['id']}/metrics/exact"
    # act
    refused = analyst.get(path)
    exact = trained.client.get(path)
    # assert
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert exact.status_code == 200, exact.text
    scores = exact.json()["metrics"]
    assert 0.0 <= scores["test_accuracy"] <= 1.0 and scores["rows"] == scores["units"] > 0
    assert scores["test_accuracy"] != trained.dp_job["metrics"]["test_accuracy"]  # noisy there


def test_public_data_is_scored_exactly(trained: Trained) -> None:
    release = trained.public_job["metrics"]["release"]
    exact = trained.client.get(f"/v1/jobs/{trained.public_job['id']}/metrics/exact").json()
    assert release["mechanism"] == "exact-public-data" and release["noise_multiplier"] is None
    assert trained.public_job["metrics"]["test_accuracy"] == exact["metrics"]["test_accuracy"]


def test_model_files_are_published_under_the_attempt_that_made_them(
    service: Service, trained: Trained
) -> None:
    files = sorted(p.name for p in (service.data_dir / "models").iterdir())
    job_id = trained.dp_job["id"]
    assert f"{job_id}.attempt-1.safetensors" in files
    assert f"{job_id}.attempt-1.onnx" in files


def _ppml(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # no PPML_* settings, no proxies
    return subprocess.run(
        [str(BIN / "ppml"), *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def _flip_one_byte(path: Path, position: int) -> Path:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    changed = path.with_name(f"changed-{path.name}")
    changed.write_bytes(bytes(data))
    return changed


def test_a_downloaded_model_verifies_offline_and_fails_after_a_one_byte_change(
    service: Service, trained: Trained, tmp_path: Path
) -> None:
    # arrange: both models' files over HTTP, their receipts and the keys through the CLI
    models = []
    for job in (trained.dp_job, trained.public_job):
        for fmt in ("safetensors", "onnx"):
            path = tmp_path / f"{job['id']}.{fmt}"
            path.write_bytes(_download(trained.client, job["id"], fmt).content)
            models.append((job, path))
        fetched = _ppml(
            "receipts", "get", job["id"], "--url", service.base, "--api-key", trained.key,
            cwd=tmp_path,
        )  # fmt: skip
        assert fetched.returncode == 0, fetched.stderr
    keys = tmp_path / "ppml-signing-keys.json"
    assert (
        keys.read_bytes() == httpx.get(f"{service.base}/.well-known/ppml-signing-keys.json").content
    )
    dp_id = trained.dp_job["id"]
    receipt = tmp_path / f"{dp_id}.receipt.json"
    assert receipt.read_bytes() == trained.client.get(f"/v1/jobs/{dp_id}/receipt").content

    def verify(model: Path, receipt: Path) -> subprocess.CompletedProcess[str]:
        return _ppml(
            "receipts", "verify", str(model), "--receipt", str(receipt), "--keys", str(keys),
            cwd=tmp_path,
        )  # fmt: skip

    # act
    verified = [verify(path, tmp_path / f"{job['id']}.receipt.json") for job, path in models]
    model_changed = verify(_flip_one_byte(models[0][1], 200), receipt)
    receipt_changed = verify(models[0][1], _flip_one_byte(receipt, len(receipt.read_bytes()) // 2))
    # assert: all four files verify, with every check named; a one-byte change fails
    for result in verified:
        assert result.returncode == 0, result.stdout + result.stderr
        for check in ("receipt file", "signature", "key validity", "digest"):
            assert f"ok     {check}" in result.stderr
    assert f"job {dp_id}" in verified[0].stdout
    assert trained.dp_job["privacy"]["ledger_entry_id"] in verified[0].stdout
    assert model_changed.returncode == 1 and "FAILED digest" in model_changed.stderr
    assert receipt_changed.returncode == 1 and "does not verify" in receipt_changed.stderr
    document = json.loads(receipt.read_bytes())["receipt"]
    card = trained.client.get(f"/v1/jobs/{dp_id}/model/card").json()
    assert document["artifacts"] == card["artifacts"]
    assert document["privacy"]["epsilon"] == trained.dp_job["privacy"]["epsilon_spent"]
    ledger = trained.client.get(f"/v1/datasets/{trained.dp_job['dataset_id']}/ledger").json()
    mine = [e["id"] for e in ledger["items"] if e["job_id"] == dp_id]
    assert [e["id"] for e in document["ledger"]["entries"]] == mine
