"""A client generated from the app's OpenAPI document drives a real ``ppml serve``.

The generator runs offline (``openapi-python-client``); the generated package is imported
from a temporary folder and used for the whole workflow: admin creates a tenant and key,
the tenant registers a dataset, submits a job, polls it, downloads the model and predicts.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from api.openapi import openapi_document, render
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
