"""The OpenAPI document: committed, exact, and shaped for generated clients."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest

from api.openapi import SPEC_PATH, openapi_document, render

SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
PROBLEM_REF = "#/components/schemas/Problem"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return openapi_document()


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def test_committed_openapi_json_matches_the_app_exactly(spec: dict[str, Any]) -> None:
    committed = SPEC_PATH.read_text(encoding="utf-8")

    assert committed == render(spec), "stale: run `python -m api.openapi > openapi.json`"


def test_regeneration_command_checks_the_committed_file() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api.openapi", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=SPEC_PATH.parent,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_operation_has_one_declared_tag_and_a_snake_case_operation_id(
    spec: dict[str, Any],
) -> None:
    declared = {tag["name"] for tag in spec["tags"]}
    ids = []
    for path, method, operation in _operations(spec):
        assert len(operation.get("tags", [])) == 1, f"{method} {path}"
        assert operation["tags"][0] in declared, f"{method} {path}"
        assert SNAKE_CASE.match(operation.get("operationId", "")), f"{method} {path}"
        ids.append(operation["operationId"])
    assert len(ids) == len(set(ids))


def test_schema_names_read_well_in_generated_clients(spec: dict[str, Any]) -> None:
    for name in spec["components"]["schemas"]:
        assert not name.startswith("Body_"), name
        assert not name.endswith(("-Input", "-Output")), name
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", name), name


def test_every_v1_operation_declares_its_errors_as_problems(spec: dict[str, Any]) -> None:
    for path, method, operation in _operations(spec):
        if not path.startswith("/v1/"):
            continue
        responses = operation["responses"]
        expected = {"401", "422"} | ({"404"} if "{" in path else set())
        assert expected <= set(responses), f"{method} {path}: {sorted(responses)}"
        for status, response in responses.items():
            if int(status) < 400:
                continue
            content = response["content"]
            assert "application/problem+json" in content, f"{method} {path} {status}"
            refs = {media.get("schema", {}).get("$ref") for media in content.values()}
            assert PROBLEM_REF in refs, f"{method} {path} {status}"


def test_model_routes_declare_conflicts_and_binary_downloads(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    download = paths["/v1/jobs/{job_id}/model"]["get"]
    predict = paths["/v1/jobs/{job_id}/predict"]["post"]
    card = paths["/v1/jobs/{job_id}/model/card"]["get"]

    assert download["responses"]["200"]["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    formats = next(p for p in download["parameters"] if p["name"] == "format")
    assert formats["schema"]["enum"] == ["safetensors", "onnx"]
    for operation in (download, predict, card):
        assert "409" in operation["responses"]
    request = predict["requestBody"]["content"]["application/json"]["schema"]
    assert request == {"$ref": "#/components/schemas/PredictRequest"}
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    # A trained model's answer, or a pate job's (labels only, each charged).
    assert ok["anyOf"] == [
        {"$ref": "#/components/schemas/PredictResponse"},
        {"$ref": "#/components/schemas/PrivatePredictResponse"},
    ]
    response_fields = spec["components"]["schemas"]["PredictResponse"]["properties"]
    assert {"predictions", "probabilities", "receipt_id"} <= set(response_fields)
    private = spec["components"]["schemas"]["PrivatePredictResponse"]["properties"]
    assert "probabilities" not in private and "predictions" in private
