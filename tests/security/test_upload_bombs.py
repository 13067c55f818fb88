"""Issue #15, finding 3: decompression bombs are refused before they are stored or decoded,
and uploads are validated outside the API process, whose memory does not grow with them.

Against a real ``ppml serve`` (API + embedded worker): the API's resident memory is read
from ``/proc/<pid>/status`` before and after the bombs (the embedded worker is a child
process, not counted).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.stack import embedded_serve, tenant_client
from tests.security.bombs import csv_bomb, npz_bomb, parquet_bomb

ADMIN = "bombs-admin-token-0123456789"
MB = 1024 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    root = tmp_path_factory.mktemp("bombs")
    with embedded_serve(root, ADMIN) as (base, proc):
        yield base, proc.pid, root / "data"


@pytest.fixture(scope="module")
def client(service: tuple[str, int, Path]) -> Iterator[httpx.Client]:
    with tenant_client(service[0], ADMIN, "bombs") as tenant:
        yield tenant


def _post(client: httpx.Client, path: Path, **fields: str) -> httpx.Response:
    data = {"name": path.stem, "target": "label", **fields}
    with path.open("rb") as handle:
        return client.post("/v1/datasets/upload", data=data, files={"file": (path.name, handle)})


def _settled(client: httpx.Client, dataset_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/datasets/{dataset_id}").json()
        if body["status"] != "validating":
            return body
        time.sleep(0.3)
    raise AssertionError(f"dataset {dataset_id} still validating after {timeout} s")


def _small_files(folder: Path) -> list[Path]:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((200, 3)), columns=["a", "b", "c"])
    frame["label"] = np.arange(200) % 2
    frame.to_parquet(folder / "warm.parquet")
    frame.to_csv(folder / "warm.csv", index=False)
    np.savez(folder / "warm.npz", x=frame[["a", "b", "c"]].to_numpy(), y=frame["label"])
    return [folder / "warm.parquet", folder / "warm.csv", folder / "warm.npz"]


def test_bombs_are_refused_at_once_and_the_api_does_not_grow(
    service: tuple[str, int, Path], client: httpx.Client, tmp_path: Path
) -> None:
    # arrange: every format's reader loaded once (a first upload of each, validated)
    _base, pid, data_dir = service
    for path in _small_files(tmp_path):
        accepted = _post(client, path)
        assert accepted.status_code == 202, accepted.text
        assert _settled(client, accepted.json()["id"])["status"] == "ready"
    bombs = [
        parquet_bomb(tmp_path / "bomb.parquet"),
        npz_bomb(tmp_path / "bomb.npz"),
        csv_bomb(tmp_path / "bomb.csv"),
    ]
    before = _rss(pid)

    # act: each bomb three times
    answers = []
    for bomb in bombs:
        for _ in range(3):
            started = time.monotonic()
            answers.append((bomb, _post(client, bomb), time.monotonic() - started))
    after = _rss(pid)

    # assert: 413 from the headers, in well under a second each; nothing kept
    for bomb, answer, elapsed in answers:
        assert answer.status_code == 413, (bomb.name, answer.text)
        problem = answer.json()
        assert problem["field"] == "file" and problem["decoded_bytes"] > problem["limit"]
        assert elapsed < 2.0, (bomb.name, elapsed)
    sizes = {b.name: b.stat().st_size for b in bombs}
    print(f"\nbombs {sizes}; API VmRSS {before / MB:.1f} MB -> {after / MB:.1f} MB")
    assert after - before < 100 * MB
    assert [d["status"] for d in client.get("/v1/datasets").json()["items"]] == ["ready"] * 3
    assert not any((data_dir / "uploads").glob("*"))


def test_a_large_upload_is_validated_by_the_worker_not_the_api(
    service: tuple[str, int, Path], client: httpx.Client, tmp_path: Path
) -> None:
    # arrange: about 40 MB of CSV (decodes to about 60 MB, within the limit)
    _base, pid, data_dir = service
    rows = 200_000
    rest = ",".join(["0.123456"] * 19)
    path = tmp_path / "large.csv"
    with path.open("w") as out:
        out.write(",".join(f"f{j}" for j in range(20)) + ",label\n")
        out.writelines(f"{i / rows:.6f},{rest},{'ab'[i % 2]}\n" for i in range(rows))
    before = _rss(pid)

    # act
    accepted = _post(client, path)
    after = _rss(pid)
    settled = _settled(client, accepted.json()["id"])

    # assert: answered validating, counts null; the worker made it ready
    size = path.stat().st_size
    print(f"\nupload {size / MB:.1f} MB; API VmRSS {before / MB:.1f} -> {after / MB:.1f} MB")
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "validating" and accepted.json()["num_train"] is None
    assert accepted.headers["location"] == f"/v1/datasets/{accepted.json()['id']}"
    assert after - before < 100 * MB
    assert settled["status"] == "ready", settled
    assert settled["num_train"] + settled["num_test"] == rows and settled["num_features"] == 20
    assert not any((data_dir / "uploads").glob("*"))  # the raw file is gone once converted


def test_an_invalid_upload_ends_invalid_with_its_reason_and_nothing_kept(
    service: tuple[str, int, Path], client: httpx.Client, tmp_path: Path
) -> None:
    # arrange: a value deep in the file that is not a number (only decoding finds it)
    _base, _pid, data_dir = service
    secret = "x7731982"
    lines = ["a,b,label"] + [f"{i},{i % 7},{i % 2}" for i in range(500)]
    lines[300] = f"{secret},1,0"
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")

    # act
    accepted = _post(client, path)
    settled = _settled(client, accepted.json()["id"])
    job = client.post(
        "/v1/jobs",
        json={
            "name": "j",
            "dataset_id": settled["id"],
            "model": {"arch": "logreg"},
            "training": {"epochs": 1, "batch_size": 16, "learning_rate": 0.1},
            "privacy": None,
        },
    )

    # assert
    assert accepted.status_code == 202, accepted.text
    assert settled["status"] == "invalid" and settled["num_train"] is None
    problem = settled["problem"]
    assert problem["type"] == "/problems/malformed-file" and problem["field"] == "file"
    assert "column 1" in problem["detail"] and secret not in str(settled)
    assert job.status_code == 409 and job.json()["type"].endswith("/dataset-not-ready")
    assert not list((data_dir / "uploads").glob("*"))
    assert not (data_dir / "datasets" / f"{settled['id']}.npz").exists()
