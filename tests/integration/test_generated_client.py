"""A client generated from the app's OpenAPI document drives a real ``ppml serve``.

The generator runs offline (``openapi-python-client``); the generated package is imported
from a temporary folder and used for the whole workflow: admin creates a tenant and key,
the tenant registers a dataset, submits a job, polls it, downloads the model and predicts.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

import pytest

from api.openapi import openapi_document, render
from api.routes.audit import AuditActionFilter
from ppml.services.audit import AuditAction
from ppml.specs import JobSpec
from tests.conftest import dp_job_spec
from tests.integration.stack import BIN, embedded_serve

ADMIN = "generated-client-admin-0123456789"
PACKAGE = "ppml_generated_client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Generates the client into a temporary folder and puts it on ``sys.path``."""
    root = tmp_path_factory.mktemp("generated")
    spec_path = root / "openapi.json"
    # Exactly the committed openapi.json (tests/integration/test_openapi.py checks that).
    spec_path.write_text(render(openapi_document()), encoding="utf-8")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [
        str(BIN / "openapi-python-client"),
        "generate",
        "--path",
        str(spec_path),
        "--output-path",
        str(root / PACKAGE),
        "--meta",
        "none",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every schema and operation must make it into the client: warnings mean omissions.
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(root))
    try:
        yield PACKAGE
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with embedded_serve(tmp_path_factory.mktemp("generated-service"), ADMIN) as (base, _proc):
        yield base


def _module(package: str, name: str) -> ModuleType:
    return importlib.import_module(f"{package}.{name}")


def _ok(response: Any, status: int) -> Any:
    assert response.status_code == status, (response.status_code, response.content[:500])
    return response.parsed


def test_generated_client_runs_the_whole_workflow(generated: str, service: str) -> None:
    # arrange: the generated package's pieces
    client_mod = _module(generated, "client")
    models = _module(generated, "models")
    api = {
        name: _module(generated, f"api.{group}.{name}")
        for group, name in [
            ("tenants", "create_tenant"),
            ("tenants", "create_api_key"),
            ("datasets", "create_dataset"),
            ("jobs", "create_job"),
            ("jobs", "get_job"),
            ("models", "download_model"),
            ("models", "get_model_card"),
            ("models", "predict"),
        ]
    }
    admin = client_mod.AuthenticatedClient(base_url=service, token=ADMIN)

    # act: admin → tenant and key
    tenant = _ok(
        api["create_tenant"].sync_detailed(
            client=admin, body=models.TenantCreate(name="generated")
        ),
        201,
    )
    key = _ok(api["create_api_key"].sync_detailed(tenant.id, client=admin), 201)
    user = client_mod.AuthenticatedClient(base_url=service, token=key.key)

    # dataset and job
    dataset_body = models.DatasetCreate.from_dict(
        {
            "name": "digits",
            "source": {"builtin": "digits"},
            "privacy_budget": {"epsilon": 8.0, "delta": 1e-5},
        }
    )
    dataset = _ok(api["create_dataset"].sync_detailed(client=user, body=dataset_body), 201)
    spec = models.JobSpec.from_dict(dp_job_spec(dataset.id, epsilon=2.0, epochs=4))
    job = _ok(api["create_job"].sync_detailed(client=user, body=spec), 202)
    deadline = time.monotonic() + 180
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.3)
        job = _ok(api["get_job"].sync_detailed(job.id, client=user), 200)

    # model, card, predictions
    onnx_format = models.DownloadModelFormat("onnx")
    download = api["download_model"].sync_detailed(job.id, client=user, format_=onnx_format)
    card = _ok(api["get_model_card"].sync_detailed(job.id, client=user), 200)
    answer = _ok(
        api["predict"].sync_detailed(
            job.id, client=user, body=models.PredictRequest(inputs=[[0.25] * 64])
        ),
        200,
    )
    missing = api["get_job"].sync_detailed("job_missing", client=user)

    # assert
    assert job.status == "succeeded"
    assert job.spec.dataset_id == dataset.id  # the spec comes back typed
    assert download.status_code == 200 and len(download.content) > 0
    assert hashlib.sha256(download.content).hexdigest() == card.artifacts["onnx"]["sha256"]
    assert card.privacy.epsilon == pytest.approx(job.privacy.epsilon_spent)
    assert len(answer.predictions) == 1 and len(answer.probabilities[0]) == 10
    assert missing.status_code == 404
    assert isinstance(missing.parsed, models.Problem) and missing.parsed.status == 404


def test_generated_client_creates_an_analyst_key_that_cannot_register_budgeted_data(
    generated: str, service: str
) -> None:
    # arrange
    client_mod = _module(generated, "client")
    models = _module(generated, "models")
    create_tenant = _module(generated, "api.tenants.create_tenant")
    create_api_key = _module(generated, "api.tenants.create_api_key")
    create_dataset = _module(generated, "api.datasets.create_dataset")
    admin = client_mod.AuthenticatedClient(base_url=service, token=ADMIN)
    tenant = _ok(
        create_tenant.sync_detailed(client=admin, body=models.TenantCreate(name="roles")), 201
    )
    analyst_body = models.ApiKeyCreate.from_dict({"role": "analyst"})
    # act
    analyst_key = _ok(create_api_key.sync_detailed(tenant.id, client=admin, body=analyst_body), 201)
    owner_key = _ok(create_api_key.sync_detailed(tenant.id, client=admin), 201)
    budgeted = models.DatasetCreate.from_dict(
        {
            "name": "digits",
            "source": {"builtin": "digits"},
            "privacy_budget": {"epsilon": 8.0, "delta": 1e-5},
        }
    )
    as_analyst = client_mod.AuthenticatedClient(base_url=service, token=analyst_key.key)
    as_owner = client_mod.AuthenticatedClient(base_url=service, token=owner_key.key)
    refused = create_dataset.sync_detailed(client=as_analyst, body=budgeted)
    registered = _ok(create_dataset.sync_detailed(client=as_owner, body=budgeted), 201)
    # assert
    assert analyst_key.role == "analyst" and owner_key.role == "owner"
    assert refused.status_code == 403
    assert isinstance(refused.parsed, models.Problem) and refused.parsed.status == 403
    assert registered.privacy_budget.epsilon == 8.0


def _csv(rows: int = 240) -> bytes:
    """A small public table: four features, a label that the first feature decides."""
    lines = ["a,b,c,d,label"]
    for i in range(rows):
        a, b = (i * 37 % 101) / 101, (i * 53 % 97) / 97
        lines.append(f"{a:.4f},{b:.4f},{(a + b) / 2:.4f},{i % 7 / 7:.4f},{int(a > 0.5)}")
    return ("\n".join(lines) + "\n").encode()


def test_generated_client_uploads_submits_follows_and_reads_typed_records(
    generated: str, service: str
) -> None:
    # arrange
    client_mod = _module(generated, "client")
    models = _module(generated, "models")
    types = _module(generated, "types")
    call = {
        name: _module(generated, f"api.{group}.{name}")
        for group, name in [
            ("tenants", "create_tenant"),
            ("tenants", "create_api_key"),
            ("datasets", "upload_dataset"),
            ("datasets", "create_dataset"),
            ("datasets", "get_dataset"),
            ("jobs", "create_job"),
            ("jobs", "stream_job_events"),
            ("jobs", "get_job"),
            ("jobs", "get_job_metrics"),
            ("jobs", "list_jobs"),
            ("models", "download_model"),
        ]
    }
    admin = client_mod.AuthenticatedClient(base_url=service, token=ADMIN)
    tenant = _ok(
        call["create_tenant"].sync_detailed(client=admin, body=models.TenantCreate(name="upl")),
        201,
    )
    key = _ok(call["create_api_key"].sync_detailed(tenant.id, client=admin), 201)
    user = client_mod.AuthenticatedClient(base_url=service, token=key.key, timeout=120)
    upload = models.DatasetUpload(
        file=types.File(payload=io.BytesIO(_csv()), file_name="table.csv", mime_type="text/csv"),
        name="table",
        target="label",
    )
    # act: upload (multipart, a real file part), wait until ready, submit, follow, download
    dataset = _ok(call["upload_dataset"].sync_detailed(client=user, body=upload), 202)
    deadline = time.monotonic() + 120
    while dataset.status == "validating":
        assert time.monotonic() < deadline, "upload was not validated"
        time.sleep(0.3)
        dataset = _ok(call["get_dataset"].sync_detailed(dataset.id, client=user), 200)
    spec = dp_job_spec(dataset.id, epochs=2)
    spec["privacy"] = None  # public data: no budget
    job = _ok(
        call["create_job"].sync_detailed(client=user, body=models.JobSpec.from_dict(spec)), 202
    )
    stream = call["stream_job_events"].sync_detailed(job.id, client=user)
    job = _ok(call["get_job"].sync_detailed(job.id, client=user), 200)
    history = _ok(call["get_job_metrics"].sync_detailed(job.id, client=user), 200)
    download = call["download_model"].sync_detailed(job.id, client=user)
    running = call["list_jobs"].sync_detailed(client=user, status=models.JobStatusFilter("running"))
    refused = call["create_job"].sync_detailed(
        client=user, body=models.JobSpec.from_dict({**spec, "dataset_id": "ds_missing"})
    )
    small = call["create_dataset"].sync_detailed(
        client=user,
        body=models.DatasetCreate.from_dict(
            {
                "name": "digits",
                "source": {"builtin": "digits"},
                "privacy_budget": {"epsilon": 0.5, "delta": 1e-5},
            }
        ),
    )
    too_dear = call["create_job"].sync_detailed(
        client=user, body=models.JobSpec.from_dict(dp_job_spec(_ok(small, 201).id, epsilon=2.0))
    )
    # assert: the file went as a file; the stream ran to its end; records are typed
    assert dataset.status == "ready" and dataset.num_features == 4
    assert stream.status_code == 200 and b"event: end" in stream.content
    assert job.status == "succeeded", job.error
    assert isinstance(job.metrics, models.Metrics) and 0 <= job.metrics.test_accuracy <= 1
    assert job.metrics.release.mechanism == "exact-public-data"
    assert isinstance(history, models.MetricsHistory) and history.points
    assert isinstance(history.points[-1], models.MetricsPoint)
    assert history.points[-1].fraction == 1.0
    assert download.status_code == 200 and len(download.content) > 0
    assert _ok(running, 200).items == []
    assert refused.status_code == 404 and isinstance(refused.parsed, models.Problem)
    assert refused.parsed.status == 404 and refused.parsed.type_.endswith("not-found")
    # a typed error: the budget refusal's extension members are fields of Problem
    problem = too_dear.parsed
    assert too_dear.status_code == 409 and isinstance(problem, models.Problem)
    assert problem.type_.endswith("budget-exceeded")
    assert isinstance(problem.epsilon_remaining, float) and problem.epsilon_remaining <= 0.5
    assert isinstance(problem.epsilon_requested, float) and problem.epsilon_requested > 0.5
    assert isinstance(problem.max_target_epsilon, float) and problem.max_target_epsilon < 2.0


def test_generated_client_types_a_private_jobs_privacy_record(generated: str, service: str) -> None:
    # arrange
    models = _module(generated, "models")
    # act: a private job's record, as the API documents it, read by the generated model
    record = models.Job.from_dict(
        {
            "id": "job_x",
            "name": "n",
            "dataset_id": "ds_x",
            "status": "failed",
            "spec": dp_job_spec("ds_x"),
            "progress": {"fraction": 0.5, "epoch": 1, "round": None, "steps": 10},
            "metrics": None,
            "privacy": {
                "target_epsilon": 2.0,
                "epsilon_planned": 2.0,
                "epsilon_spent": 1.0,
                "delta": 1e-5,
                "noise_multiplier": 1.1,
                "max_grad_norm": 1.0,
                "sample_rate": 0.05,
                "steps": 10,
                "steps_planned": 20,
                "unit": "record",
                "grid_version": "rdp-v1",
            },
            "error": {"code": "worker-lost", "message": "the worker vanished"},
            "cancel_requested": False,
            "created_at": "2026-12-07T00:00:00Z",
            "started_at": None,
            "finished_at": None,
        }
    )
    # assert: named classes, not anonymous unions
    assert isinstance(record.privacy, models.PrivacyRecord) and record.privacy.steps == 10
    assert isinstance(record.error, models.JobError) and record.error.code == "worker-lost"
    assert record.to_dict()["privacy"]["epsilon_spent"] == 1.0


def test_the_generated_client_has_no_anonymous_classes(generated: str) -> None:
    # arrange
    package = Path(importlib.import_module(generated).__file__ or "").parent
    # act
    anonymous = sorted(p.name for p in (package / "models").glob("*_type_*.py"))
    # assert: every schema, filter and union member is a named class
    assert anonymous == []


def test_the_contracts_named_enums_and_examples_match_the_core() -> None:
    document = openapi_document()
    example = document["components"]["schemas"]["JobSpec"]["examples"][0]
    assert {a.value for a in AuditActionFilter} == set(get_args(AuditAction))
    assert JobSpec.model_validate(example).name == example["name"]
    for name in ("Job", "JobPage", "Quote", "MetricsHistory", "MetricsPoint", "Problem"):
        schema = document["components"]["schemas"][name]
        undescribed = [p for p, s in schema["properties"].items() if "description" not in s]
        assert undescribed == [], name
