"""Byte ranges of model downloads from an object store (api/downloads.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from api.downloads import _span, serve_artifact
from ppml.storage import LocalStore


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", (0, 9)),
        ("bytes=90-", (90, 99)),
        ("bytes=90-500", (90, 99)),  # clipped to the last byte
        ("bytes=-10", (90, 99)),  # the last ten
        ("bytes=-500", (0, 99)),
        ("bytes=100-", "unsatisfiable"),
        ("bytes=9-3", "unsatisfiable"),
        ("bytes=-0", "unsatisfiable"),
        ("bytes=0-1,5-6", None),  # several ranges: served whole, as RFC 9110 allows
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_a_range_header_names_the_bytes_to_send(
    header: str | None, expected: tuple[int, int] | str | None
) -> None:
    assert _span(header, 100) == expected


def test_an_empty_file_has_no_satisfiable_range() -> None:
    assert _span("bytes=0-", 0) == "unsatisfiable"
    assert _span("bytes=-1", 0) == "unsatisfiable"


def test_a_range_past_the_end_of_a_local_model_answers_416_problem(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path)
    artifact = store.write("models/m.onnx", lambda path: path.write_bytes(b"x" * 100))

    # act
    response = asyncio.run(
        serve_artifact(store, artifact.key, artifact.sha256, "m.onnx", "bytes=100-")
    )

    # assert
    assert response.status_code == 416
    assert response.media_type == "application/problem+json"
    assert response.headers["content-range"] == "bytes */100"
