"""api.routes.common.Router: a path outside a router's prefix is no match, at once."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient

from api import ui
from api.app import ROUTERS
from api.errors import install_error_handlers
from api.routes.common import CheckedRoute, Router


def _app(kind: type[APIRouter] = Router) -> FastAPI:
    items, others = kind(prefix="/v1/items"), kind(prefix="/v1/others")

    @items.get("/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"item": item_id}

    @others.get("/{other_id}")
    async def other(other_id: str) -> dict[str, str]:
        return {"other": other_id}

    @others.post("")
    async def create() -> dict[str, str]:
        return {"created": "yes"}

    app = FastAPI()
    app.include_router(items)
    app.include_router(others)
    return app


def test_requests_reach_the_routes_of_every_router() -> None:
    with TestClient(_app()) as client:
        assert client.get("/v1/items/a").json() == {"item": "a"}
        assert client.get("/v1/others/b").json() == {"other": "b"}
        assert client.post("/v1/others").json() == {"created": "yes"}


def test_every_answer_is_the_one_fastapis_own_router_gives() -> None:
    requests = [
        ("GET", "/v1/items/a"),
        ("DELETE", "/v1/others/b"),  # 405
        ("GET", "/v1/nowhere/b"),  # 404
        ("GET", "/v1/others/"),  # the trailing-slash redirect
        ("POST", "/v1/others/"),
        ("GET", "/v1/items"),
    ]
    answers = {}
    for kind in (Router, APIRouter):
        with TestClient(_app(kind)) as client:
            answers[kind] = [
                (r.status_code, r.headers.get("location"), r.content)
                for r in (client.request(m, p, follow_redirects=False) for m, p in requests)
            ]
    assert answers[Router] == answers[APIRouter]


calls: list[str] = []


async def counted(page: int = 0) -> int:
    calls.append("dependency")
    return page


def test_a_query_parameter_no_route_declares_is_refused_before_the_route_runs() -> None:
    """422 (invalid-input, naming the parameter) for an unknown one, before any dependency,
    on the real app's routes (its routers and the health router alike)."""
    calls.clear()
    items = Router(prefix="/v1/items")

    @items.get("/{item_id}")
    async def item(item_id: str, page: Annotated[int, Depends(counted)]) -> dict[str, Any]:
        return {"item": item_id, "page": page}

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(items)
    with TestClient(app) as client:
        assert client.get("/v1/items/a", params={"page": 2}).json() == {"item": "a", "page": 2}
        refused = client.get("/v1/items/a", params={"page": 2, "pgae": 3})
    assert refused.status_code == 422
    assert refused.json()["type"] == "/problems/invalid-input"
    assert refused.json()["field"] == "pgae" and calls == ["dependency"]
    routes = [route for router in (*ROUTERS, ui.router) for route in router.routes]
    assert routes and all(isinstance(route, CheckedRoute) for route in routes)
