"""api.routes.common.Router: a path outside a router's prefix is no match, at once."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from api.routes.common import Router


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
