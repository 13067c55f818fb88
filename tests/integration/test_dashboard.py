"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

A real ``ppml serve`` (API + embedded worker) serves ``/ui``; the browser types an owner key,
quotes and submits a job through the page, follows it live to its end, and checks that the
curves are drawn, the receipt shown and the dataset's budget gauge filled. Every request the
browser makes, on ``/ui``, ``/docs`` and ``/redoc``, must load from the service's origin only (ReDoc
links its logo from its vendor's CDN: the page's policy blocks it, and the test sees that). A
failing test leaves a screenshot under ``tests/artifacts/`` (gitignored); the pages checked
are always kept there too, for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import register_digits
from tests.integration.stack import embedded_serve, tenant_client

playwright_api = pytest.importorskip("playwright.sync_api")

ADMIN = "dashboard-admin-0123456789"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TIMEOUT_MS = 90_000


def _chromium() -> str:
    found = os.environ.get("PPML_CHROMIUM") or shutil.which("chromium")
    if found is None:
        pytest.fail("the browser tests need Debian's chromium: `make browser` installs it")
    return found


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """The service, an owner key and a budgeted digits dataset of its tenant."""
    with embedded_serve(tmp_path_factory.mktemp("dashboard"), ADMIN) as (base, _proc):
        owner = tenant_client(base, ADMIN, "dashboard")
        dataset_id = register_digits(owner, {})
        key = owner.headers["Authorization"].removeprefix("Bearer ")
        owner.close()
        yield base, key, dataset_id


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@contextmanager
def _page(browser: Any, base: str, name: str) -> Iterator[tuple[Any, list[str], list[str]]]:
    """A fresh page, every URL it loaded (a response came back: a request that the page's
    Content-Security-Policy blocked loads nothing), its console errors; a screenshot on
    failure."""
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requested: list[str] = []
    errors: list[str] = []
    page.on("response", lambda response: requested.append(response.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        yield page, requested, errors
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
        raise
    finally:
        context.close()


def _sign_in(page: Any, base: str, key: str, fragment: str) -> None:
    page.goto(f"{base}/ui")
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#who:not(:empty)")  # the key's role, as the API told it
    page.goto(f"{base}/ui{fragment}")  # the key stays in the tab's sessionStorage


def _offsite(base: str, urls: list[str]) -> list[str]:
    return [u for u in urls if not (u.startswith(base + "/") or u.startswith(("data:", "blob:")))]


def _path_points(page: Any, selector: str) -> int:
    d = page.get_attribute(selector, "d") or ""
    return len(re.findall(r"[ML]\s*-?[\d.]+,-?[\d.]+", d))


def test_a_job_submitted_through_the_page_is_followed_live_to_its_curves_and_receipt(
    browser: Any, service: tuple[str, str, str]
) -> None:
    base, key, dataset_id = service
    with _page(browser, base, "job-page") as (page, requested, errors):
        # arrange: the owner signs in and opens the quote form on the dataset
        _sign_in(page, base, key, f"#/quote?dataset={dataset_id}")
        page.wait_for_selector("#quote-form")
        page.fill("#q-epochs", "4")
        # act: quote, then submit; the page follows the job's event stream
        page.click("#quote")
        page.wait_for_selector("#quote-epsilon")
        quoted = float(page.inner_text("#quote-epsilon"))
        page.click("#submit-job")
        page.wait_for_url(re.compile(r".*#/jobs/job_\w+"))
        page.wait_for_selector("#job-head .status.succeeded")
        page.wait_for_selector("#receipt")
        page.wait_for_selector("#curve-accuracy path.series", state="attached")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "job-page.png"), full_page=True)
        # assert: ε per report drawn, accuracy released (and exact, for an owner) drawn
        assert who(page) == "owner key"
        assert 0 < quoted <= 2.0
        assert _path_points(page, "#curve-epsilon path.s0") >= 2
        assert _path_points(page, "#curve-accuracy path.s0") >= 1  # released (DP)
        # exact, per epoch end (owner keys only): one point for each of the 4 epochs
        assert _path_points(page, "#curve-accuracy path.s1") == 4
        assert _path_points(page, "#curve-loss path.s1") == 4
        assert '"epsilon"' in page.inner_text("#receipt")
        assert page.is_visible("#download-onnx") and page.is_visible("#predict")
        assert _offsite(base, requested) == [] and errors == []
        # the jobs table, filtered by status: the job is listed as succeeded, not as failed
        page.goto(f"{base}/ui#/jobs?status=succeeded")
        page.wait_for_selector("#jobs .status.succeeded")
        page.goto(f"{base}/ui#/jobs?status=failed")
        page.wait_for_selector("#filter-status option[value=failed][selected]", state="attached")
        page.wait_for_selector("#jobs tr >> nth=0")  # its header: the list was read
        assert page.query_selector("#jobs .status") is None


def test_the_dataset_page_shows_the_budget_gauge_and_burn_down_from_the_ledger(
    browser: Any, service: tuple[str, str, str]
) -> None:
    import httpx

    base, key, dataset_id = service
    headers = {"Authorization": f"Bearer {key}"}
    budget = httpx.get(f"{base}/v1/datasets/{dataset_id}/budget", headers=headers).json()
    with _page(browser, base, "dataset-page") as (page, requested, errors):
        # act
        _sign_in(page, base, key, f"#/datasets/{dataset_id}")
        page.wait_for_selector("#budget-gauge")
        page.wait_for_selector("#ledger")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dataset-page.png"), full_page=True)
        # assert: the gauge's spent segment is the budget's, the burn-down has its commits
        spent = float(page.get_attribute("#budget-gauge rect.spent", "data-epsilon") or "nan")
        width = float(page.get_attribute("#budget-gauge rect.spent", "width") or "0")
        assert spent == pytest.approx(budget["epsilon_spent"])
        assert (width > 0) == (budget["epsilon_spent"] > 0)
        assert "remaining ε" in (page.text_content("#budget-gauge") or "")
        assert _path_points(page, "#burndown path.s0") >= 1
        assert _offsite(base, requested) == [] and errors == []


@pytest.mark.parametrize("path,ready", [("/docs", ".swagger-ui .info"), ("/redoc", ".api-content")])
def test_the_reference_pages_render_from_local_files_only(
    browser: Any, service: tuple[str, str, str], path: str, ready: str
) -> None:
    base, _key, _dataset = service
    with _page(browser, base, path.strip("/")) as (page, requested, _errors):
        page.goto(base + path)
        page.wait_for_selector(ready)
        page.wait_for_load_state("networkidle")
        assert requested and _offsite(base, requested) == []


def who(page: Any) -> str:
    return str(page.inner_text("#who"))


def test_an_analyst_sees_no_exact_figures(browser: Any, service: tuple[str, str, str]) -> None:
    import httpx

    base, key, _dataset = service
    headers = {"Authorization": f"Bearer {key}"}
    job_id = httpx.get(f"{base}/v1/jobs", headers=headers).json()["items"][0]["id"]
    tenant_id = httpx.get(f"{base}/v1/api-keys", headers=headers).json()["items"][0]["tenant_id"]
    created = httpx.post(
        f"{base}/v1/tenants/{tenant_id}/api-keys",
        json={"role": "analyst"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert created.status_code == 201, created.text
    with _page(browser, base, "analyst-job-page") as (page, _requested, errors):
        # act
        _sign_in(page, base, created.json()["key"], f"#/jobs/{job_id}")
        page.wait_for_selector("#curve-accuracy path.series", state="attached")
        # assert: released figures only, and the page says so
        assert who(page) == "analyst key"
        assert page.query_selector("#curve-accuracy path.s1") is None
        assert "released" in page.inner_text("#curves")
        # the one failed load is the role probe (owners list keys; an analyst gets 403)
        assert [e for e in errors if "403" not in e] == []
