"""Uploads through the API, then their ingestion run in-process, as a worker would run it.

The route answers 202 with the dataset ``validating``; ``ingest`` runs the ingestion task's
function on the test's own database and store (no Celery), so a test sees the dataset
``ready`` or ``invalid`` as soon as the call returns. End-to-end checks of the real worker
use ``ppml serve`` (tests/security/test_upload_bombs.py).
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi.testclient import TestClient

from ppml.config import Settings
from ppml.db.session import Database
from ppml.services.ingestion import ingest_upload
from ppml.storage import ArtifactStore


def ingest(database: Database, settings: Settings, dataset_id: str) -> str:
    """Run the ingestion of one dataset; returns its status afterwards."""
    return ingest_upload(database, ArtifactStore.for_settings(settings), settings, dataset_id)


def ingest_in(client: TestClient, dataset_id: str) -> str:
    """Run the ingestion on the database and settings of the test client's app."""
    state = client.app.state  # type: ignore[attr-defined]
    return ingest(state.db, state.settings, dataset_id)


def upload(
    client: TestClient, headers: dict[str, str], *, data: dict[str, Any], files: dict[str, Any]
) -> httpx.Response:
    """POST an upload; when it is accepted (202), ingest it and answer the dataset as it
    then is (status ``ready`` or ``invalid``) with the 202's status code and headers."""
    response = client.post("/v1/datasets/upload", headers=headers, data=data, files=files)
    if response.status_code != 202:
        return response
    body = response.json()
    assert body["status"] == "validating", body
    assert body["num_train"] is None and body["num_features"] is None, body
    ingest_in(client, body["id"])
    shown = client.get(f"/v1/datasets/{body['id']}", headers=headers)
    assert shown.status_code == 200, shown.text
    kept = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return httpx.Response(202, headers=kept, content=shown.content, request=response.request)
