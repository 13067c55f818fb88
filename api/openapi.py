"""The committed OpenAPI document: ``python -m api.openapi > openapi.json``.

``--check`` exits 1 when ``openapi.json`` differs from what the app generates (CI, tests).
The document does not depend on settings: it is built from an app that never connects.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["SPEC_PATH", "openapi_document", "render"]

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document (no database, broker or disk is touched)."""
    from api.app import create_app
    from ppml.config import Settings

    settings = Settings(
        environment="local",
        data_dir=Path("/nonexistent/ppml-openapi"),
        database_url="sqlite://",
        broker_url="memory://",
        admin_token="openapi-document-only",
    )
    spec: dict[str, Any] = create_app(settings).openapi()
    return spec


def render(spec: dict[str, Any]) -> str:
    """Pretty-printed with sorted keys, so diffs of the committed file stay readable."""
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render(openapi_document())
    if argv[1:] == ["--check"]:
        if not SPEC_PATH.exists() or SPEC_PATH.read_text(encoding="utf-8") != text:
            print(f"{SPEC_PATH.name} is stale: run `python -m api.openapi > openapi.json`")
            return 1
        return 0
    sys.stdout.buffer.write(text.encode("utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
