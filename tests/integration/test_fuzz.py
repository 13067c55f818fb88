"""Property-based fuzzing of the whole HTTP surface with schemathesis (every built-in check).

Stateless: ≥ 100 generated requests per operation; stateful: sequences that follow the links
schemathesis infers between operations (create a dataset, then use its id, …). The assertion is
the one the quality bar asks for: no 5xx and no response outside the documented schemas.

Every check runs except ``positive_data_acceptance``: ppml must refuse some schema-valid
requests because of the data they refer to (δ ≥ 1/n for the dataset, a batch larger than the
dataset), with a documented 422 naming the field. No schema can express those rules.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from ppml.config import Settings
from ppml.db.session import Database
from tests.conftest import ADMIN_TOKEN, new_tenant, register_digits


@pytest.fixture(scope="module")
def fuzz_app(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    shutil.copyfile(sqlite_template, tmp / "ppml.db")
    url = f"sqlite:///{tmp / 'ppml.db'}"
    db = Database(url)
    app = create_app(
        Settings(
            data_dir=tmp / "data", database_url=url, broker_url="memory://", admin_token=ADMIN_TOKEN
        ),
        db,
    )
    with TestClient(app) as client:
        headers = new_tenant(client)
        register_digits(client, headers)  # something for list and id routes to find
    yield app, headers
    db.dispose()


@pytest.fixture(scope="module")
def api_schema(fuzz_app: tuple[FastAPI, dict[str, str]]) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app[0])


DATA_DEPENDENT = [positive_data_acceptance]


def _operations() -> list[str]:
    app = create_app(Settings(data_dir=Path("/tmp/ppml-fuzz-schema"), broker_url="memory://"))
    return sorted(app.openapi()["paths"])


@pytest.mark.parametrize("path", _operations())
def test_no_server_errors_and_responses_match_the_schema(
    api_schema: Any, fuzz_app: tuple[FastAPI, dict[str, str]], path: str
) -> None:
    headers = fuzz_app[1]
    operations = list(api_schema[path].values())
    assert operations
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(headers=headers, excluded_checks=DATA_DEPENDENT)

        check()


def test_stateful_sequences_stay_within_the_contract(
    api_schema: Any, fuzz_app: tuple[FastAPI, dict[str, str]]
) -> None:
    headers = fuzz_app[1]

    class Machine(api_schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            # Negative cases may break or drop the Authorization header on purpose: keep theirs.
            meta = getattr(case, "_meta", None)
            negative = meta is not None and meta.generation.mode == GenerationMode.NEGATIVE
            return (
                {} if negative or "Authorization" in (case.headers or {}) else {"headers": headers}
            )

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, excluded_checks=DATA_DEPENDENT)

    Machine.run(
        settings=settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    )
