"""No page of the service (the dashboard, /docs, /redoc) references anything outside it.

The served HTML is parsed for what a browser would load (scripts, styles, images, frames,
icons), each must be a path on the service, and each is fetched: the dashboard's own JS and
CSS hold no absolute URL at all (the SVG namespace name is not a resource); CSS ``url()`` and
``@import`` of every stylesheet stay local. tests/integration/test_dashboard.py checks the
same in a real browser, request by request.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from ppml.config import Settings

LOADING = {"script": "src", "img": "src", "iframe": "src", "source": "src", "link": "href"}
ABSOLUTE = re.compile(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", re.IGNORECASE)
NAMESPACES = {"http://www.w3.org/2000/svg"}


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = LOADING.get(tag)
        for name, value in attrs:
            if name == wanted and value:
                self.found.append(value)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # No lifespan: these pages touch neither the database nor the broker.
    settings = Settings(
        environment="local",
        data_dir=Path(tmp_path_factory.mktemp("ui")),
        database_url="sqlite://",
        broker_url="memory://",
        admin_token="ui-assets-admin-0123456789",
    )
    return TestClient(create_app(settings))


@pytest.mark.parametrize("page", ["/ui", "/docs", "/redoc"])
def test_a_page_loads_only_what_the_service_serves(client: TestClient, page: str) -> None:
    # act
    response = client.get(page)
    parser = _References()
    parser.feed(response.text)
    # assert
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "content-security-policy" in response.headers
    assert parser.found, "the page references its assets"
    for ref in parser.found:
        if ref.startswith("data:"):
            continue
        assert ref.startswith("/") and not ref.startswith("//"), ref
        asset = client.get(ref)
        assert asset.status_code == 200, ref
        if ref.endswith(".css"):
            for target in re.findall(r"(?:url\(|@import\s+)['\"]?([^'\")\s]+)", asset.text):
                assert not ABSOLUTE.match(target), (ref, target)


@pytest.mark.parametrize("asset", ["/ui/static/app.js", "/ui/static/style.css"])
def test_the_dashboards_own_files_name_no_other_host(client: TestClient, asset: str) -> None:
    text = client.get(asset).text
    found = [m for m in ABSOLUTE.findall(text) if m not in NAMESPACES]
    assert found == []


def test_the_dashboard_allows_its_own_origin_only(client: TestClient) -> None:
    policy = client.get("/ui").headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";") if d.strip())
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["connect-src"] == "'self'"
