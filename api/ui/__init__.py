"""The dashboard (``/ui``) and the API's reference pages (``/docs``, ``/redoc``), offline.

Every asset is served by the API itself: the dashboard's own HTML, JS and CSS from
``api/ui/static`` (hand-written, no build step), and Swagger UI and ReDoc from the files that
the ``fastapi-offline`` package ships (MIT; the licences of Swagger UI, Apache-2.0, and ReDoc,
MIT, are in those files' headers). No page loads anything from outside the service: the
dashboard's Content-Security-Policy allows its own origin only, and
``tests/integration/test_ui_assets.py`` parses what every page references.

The dashboard is a static page that calls the ``/v1`` API with the key its user types in
(kept in ``sessionStorage``, sent as ``Authorization: Bearer``, never put in a URL). The event
stream is read with ``fetch`` so that the header goes with it (``EventSource`` cannot send
one). Its routes are outside ``/v1``: they need no key and hold no data.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from api.routes.common import CheckedRoute

__all__ = ["STATIC_DIR", "VENDOR_DIR", "install"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"

#: Only the service's own origin, for everything the dashboard loads or calls.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

#: The reference pages: their inline start-up script and styles (Swagger UI's, ReDoc's
#: styled components and web worker) are theirs; whatever they would fetch must be ours.
#: ReDoc links its logo from its vendor's CDN: the policy keeps the browser from loading it.
REFERENCE_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False, route_class=CheckedRoute)


@router.get("/ui")
def dashboard() -> FileResponse:
    """The dashboard's single page (its views are chosen by the URL's fragment)."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"},
    )


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    """Swagger UI from local files; the validator badge (an external image) is off."""
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="ppml - Swagger UI",
        swagger_js_url="/ui/vendor/swagger-ui-bundle.js",
        swagger_css_url="/ui/vendor/swagger-ui.css",
        swagger_favicon_url="/ui/vendor/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},
    )
    page.headers["Content-Security-Policy"] = REFERENCE_POLICY
    return page


@router.get("/redoc")
def redoc() -> HTMLResponse:
    """ReDoc from a local file, without its Google Fonts link (and, by the policy, without
    its vendor's logo)."""
    page = get_redoc_html(
        openapi_url="/openapi.json",
        title="ppml - ReDoc",
        redoc_js_url="/ui/vendor/redoc.standalone.js",
        redoc_favicon_url="/ui/vendor/favicon.png",
        with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = REFERENCE_POLICY
    return page


def install(app: FastAPI) -> None:
    """Serve the dashboard and the reference pages (the app was built without FastAPI's own
    ``/docs`` and ``/redoc``, which load their scripts from a CDN)."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.mount("/ui/vendor", StaticFiles(directory=VENDOR_DIR), name="ui-vendor")
