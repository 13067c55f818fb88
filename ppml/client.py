"""A small HTTP client of the ppml API (what the ``ppml`` CLI uses; never the database).

Errors come back as :class:`ApiError` carrying the problem document (RFC 9457).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

__all__ = ["ApiError", "Event", "PPMLClient"]

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """An error answer of the API, or a client-side failure with the same shape."""

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.problem = problem or {}


@dataclass(frozen=True)
class Event:
    """One server-sent event of a job's stream: its ``id:`` (the seq to resume after), its
    ``event:`` name (``status``, ``progress``, ``end``) and its decoded ``data:``."""

    id: str | None
    name: str
    data: Any


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from a stream's lines (comments such as keep-alives skipped)."""
    event_id: str | None = None
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield Event(event_id, name, json.loads("\n".join(data)))
            event_id, name, data = None, "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            name = value
        elif field == "data":
            data.append(value)


def _raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
    except ValueError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    detail = str(problem.get("detail") or response.reason_phrase or "request failed")
    raise ApiError(response.status_code, detail, problem)


class PPMLClient:
    """Typed-enough wrappers of the ``/v1`` routes.

    Args:
        base_url: Where the API listens, e.g. ``http://127.0.0.1:8000``.
        api_key: A tenant's key (datasets, jobs, models).
        admin_token: The admin token (tenants and keys).
        timeout: Seconds per request.
        transport: An httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        admin_token: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.api_key, self.admin_token = api_key, admin_token
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> PPMLClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _headers(self, admin: bool) -> dict[str, str]:
        secret = self.admin_token if admin else self.api_key
        if not secret:
            what = "an admin token (PPML_ADMIN_TOKEN)" if admin else "an API key (PPML_API_KEY)"
            raise ApiError(401, f"this command needs {what}")
        return {"Authorization": f"Bearer {secret}"}

    def request(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> Any:
        """Sends one request; returns the decoded JSON body, or raises :class:`ApiError`."""
        headers = {**self._headers(admin), **kwargs.pop("headers", {})}
        response = self.http.request(method, path, headers=headers, **kwargs)
        _raise_for_problem(response)
        return response.json() if response.content else None

    def _pages(
        self, path: str, params: dict[str, Any], limit: int, *, admin: bool = False
    ) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while len(items) < limit:
            query = {k: v for k, v in params.items() if v is not None}
            query["page_size"] = min(200, limit - len(items))
            if token:
                query["page_token"] = token
            page = self.request("GET", path, admin=admin, params=query)
            items += page["items"]
            token = page.get("next_page_token")
            if not token:
                break
        return items

    # --- admin -------------------------------------------------------------------------

    def create_tenant(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", "/v1/tenants", admin=True, json={"name": name}
        )
        return result

    def create_api_key(
        self, tenant_id: str, role: str = "owner", *, expires_at: str | None = None
    ) -> dict[str, Any]:
        """A new key of ``role`` (``owner`` or ``analyst``) for the tenant; shown once.

        ``expires_at`` (ISO-8601 with a time zone) ends it then; None: it never expires.
        """
        body: dict[str, Any] = {"role": role}
        if expires_at is not None:
            body["expires_at"] = expires_at
        result: dict[str, Any] = self.request(
            "POST", f"/v1/tenants/{tenant_id}/api-keys", admin=True, json=body
        )
        return result

    def list_api_keys(
        self, tenant_id: str | None = None, *, limit: int = 50
    ) -> list[dict[str, Any]]:
        """A tenant's keys, newest first (never the keys themselves): with ``tenant_id`` as the
        admin, without it the API key's own tenant (an owner's key)."""
        if tenant_id is None:
            return self._pages("/v1/api-keys", {}, limit)
        return self._pages(f"/v1/tenants/{tenant_id}/api-keys", {}, limit, admin=True)

    def revoke_api_key(self, key_id: str, *, tenant_id: str | None = None) -> None:
        """Revoke a key: with ``tenant_id`` as the admin, without it as the tenant's owner."""
        if tenant_id is None:
            self.request("DELETE", f"/v1/api-keys/{key_id}")
        else:
            self.request("DELETE", f"/v1/tenants/{tenant_id}/api-keys/{key_id}", admin=True)

    # --- datasets ----------------------------------------------------------------------

    def create_dataset(
        self,
        name: str,
        *,
        builtin: str,
        budget: tuple[float, float] | None,
        privacy_unit: str = "record",
        validation_dataset_id: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "name": name,
            "source": {"builtin": builtin},
            "privacy_budget": {"epsilon": budget[0], "delta": budget[1]} if budget else None,
            "privacy_unit": privacy_unit,
            "validation_dataset_id": validation_dataset_id,
        }
        result: dict[str, Any] = self.request("POST", "/v1/datasets", json=body)
        return result

    def upload_dataset(
        self,
        path: Path,
        *,
        name: str,
        target: str | None,
        budget: tuple[float, float] | None,
        client_column: str | None = None,
        privacy_unit: str = "record",
        schema: dict[str, Any] | None = None,
        validation_dataset_id: str | None = None,
        wait: bool = True,
        wait_timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Uploads a file; ``schema`` (e.g. ``{"classes": ["a", "b"]}``) declares the label
        set, required with a budget.

        The API stores the file and validates it in a worker; with ``wait`` (the default)
        this returns the dataset once it is ready (see :meth:`wait_for_dataset`), else the
        dataset as accepted, still ``validating``.

        Raises:
            ApiError: the upload was refused, or (``wait``) it ended invalid or is still
                validating after ``wait_timeout`` seconds.
        """
        form: dict[str, str] = {"name": name, "privacy_unit": privacy_unit}
        if schema is not None:
            form["schema"] = json.dumps(schema)
        if validation_dataset_id is not None:
            form["validation_dataset_id"] = validation_dataset_id
        if target is not None:
            form["target"] = target
        if client_column is not None:
            form["client_column"] = client_column
        if budget is not None:
            form["epsilon"], form["delta"] = repr(budget[0]), repr(budget[1])
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/octet-stream")}
            result: dict[str, Any] = self.request(
                "POST", "/v1/datasets/upload", data=form, files=files
            )
        if wait and result.get("status") == "validating":
            return self.wait_for_dataset(result["id"], timeout=wait_timeout)
        return result

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/datasets/{dataset_id}")
        return result

    def wait_for_dataset(
        self, dataset_id: str, *, timeout: float = 600.0, interval: float = 0.5
    ) -> dict[str, Any]:
        """Polls a validating dataset until it is ready; returns it.

        Raises:
            ApiError: it ended invalid (the reason's detail and problem), or is still
                validating after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            dataset = self.get_dataset(dataset_id)
            if dataset.get("status") == "invalid":
                problem = dataset.get("problem") or {}
                detail = str(problem.get("detail") or "the upload is invalid")
                raise ApiError(422, f"dataset {dataset_id} is invalid: {detail}", problem)
            if dataset.get("status", "ready") != "validating":
                return dataset
            if time.monotonic() >= deadline:
                raise ApiError(504, f"dataset {dataset_id} is still validating after {timeout:g} s")
            time.sleep(interval)

    def list_datasets(self, *, limit: int = 50) -> list[dict[str, Any]]:
        return self._pages("/v1/datasets", {}, limit)

    def delete_dataset(self, dataset_id: str, *, delete_models: bool = False) -> None:
        """Delete a dataset's files (owner keys); its budget, ledger and audit trail stay."""
        params = {"delete_models": "true"} if delete_models else {}
        self.request("DELETE", f"/v1/datasets/{dataset_id}", params=params)

    def dataset_budget(self, dataset_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/datasets/{dataset_id}/budget")
        return result

    def ledger(self, dataset_id: str, *, limit: int = 50) -> list[dict[str, Any]]:
        """A dataset's ledger entries (reserve, commit, release), oldest first."""
        return self._pages(f"/v1/datasets/{dataset_id}/ledger", {}, limit)

    # --- jobs --------------------------------------------------------------------------

    def submit_job(
        self, spec: dict[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        result: dict[str, Any] = self.request("POST", "/v1/jobs", json=spec, headers=headers)
        return result

    def quote_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """What the job would cost (ε, σ, whether it fits); reserves nothing."""
        result: dict[str, Any] = self.request("POST", "/v1/jobs/quote", json=spec)
        return result

    def list_jobs(
        self, *, status: str | None = None, dataset_id: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        return self._pages("/v1/jobs", {"status": status, "dataset_id": dataset_id}, limit)

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}")
        return result

    def job_events(self, job_id: str, *, after: str | None = None) -> Iterator[Event]:
        """The job's server-sent events after the one whose id is ``after`` (None: the job as
        it stands, then what follows), until the stream ends (with the job, or after the
        server's longest stream: resume with the last event's id)."""
        headers = self._headers(admin=False) | {"Accept": "text/event-stream"}
        if after is not None:
            headers["Last-Event-ID"] = after
        path = f"/v1/jobs/{job_id}/events"
        # Keep-alives come at least every 15 s: a minute of silence is a dead connection.
        with self.http.stream("GET", path, headers=headers, timeout=60.0) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_problem(response)
            yield from parse_events(response.iter_lines())

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    # --- models ------------------------------------------------------------------------

    def model_card(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}/model/card")
        return result

    def predict(self, job_id: str, inputs: list[list[float]]) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/jobs/{job_id}/predict", json={"inputs": inputs}
        )
        return result

    def receipt(self, job_id: str) -> bytes:
        """The signed receipt of a job's model, byte for byte as served (a verifier refuses
        any other spelling)."""
        response = self.http.get(f"/v1/jobs/{job_id}/receipt", headers=self._headers(admin=False))
        _raise_for_problem(response)
        return response.content

    def signing_keys(self) -> bytes:
        """The service's public signing keys (``/.well-known/ppml-signing-keys.json``; no
        key needed)."""
        response = self.http.get("/.well-known/ppml-signing-keys.json")
        _raise_for_problem(response)
        return response.content

    def download_model(self, job_id: str, destination: Path, *, format: str) -> tuple[int, str]:
        """Streams the model to ``destination`` (atomically); returns ``(bytes, sha256)``.

        Raises:
            ApiError: On an error answer, or if the bytes do not match ``X-Content-SHA256``.
        """
        partial = destination.with_name(f".{destination.name}.part")
        digest, size = hashlib.sha256(), 0
        with self.http.stream(
            "GET",
            f"/v1/jobs/{job_id}/model",
            params={"format": format},
            headers=self._headers(admin=False),
        ) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_problem(response)
            expected = response.headers.get("x-content-sha256")
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        if expected and digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise ApiError(502, "the download does not match the server's sha256; try again")
        partial.replace(destination)
        return size, digest.hexdigest()
