"""The ``ppml`` client commands, end to end against a real ``ppml serve`` (HTTP only).

Most commands run in-process through typer's ``CliRunner``; ``jobs submit --wait`` also runs
as the installed ``ppml`` executable, to prove the entry point and its exit codes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner, Result

from ppml.cli import app
from ppml.config import Settings
from ppml.datasets import BUILTIN_CLASSES, BUILTIN_INPUT_SHAPES
from ppml.db.models import Dataset
from ppml.services.pricing import price
from ppml.specs import JobSpec
from tests.integration.stack import (
    BIN,
    embedded_serve,
    free_port,
    service_env,
    wait_for_status,
)

ADMIN = "cli-admin-token-0123456789"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with embedded_serve(tmp_path_factory.mktemp("cli"), ADMIN) as (base, _proc):
        yield base


def _run(args: list[str], env: dict[str, str], *, code: int = 0) -> Result:
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def env(service: str) -> dict[str, str]:
    """PPML_URL and a fresh tenant's PPML_API_KEY, made with the admin commands."""
    admin = {"PPML_URL": service, "PPML_ADMIN_TOKEN": ADMIN, "PPML_API_KEY": ""}
    tenant_id = _run(["tenants", "create", "cli-tenant"], admin).stdout.strip()
    key = _run(["keys", "create", tenant_id], admin).stdout.strip()
    assert tenant_id.startswith("ten") and key.startswith("ppml_sk_")
    return {"PPML_URL": service, "PPML_API_KEY": key, "PPML_ADMIN_TOKEN": ""}


@pytest.fixture(scope="module")
def digits(env: dict[str, str]) -> str:
    args = ["datasets", "add", "digits", "--builtin", "digits", "--epsilon", "20"]
    dataset_id = _run([*args, "--delta", "1e-5"], env).stdout.strip()
    assert dataset_id.startswith("ds")
    return dataset_id


def _cli_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**service_env(Path("/nonexistent")), **env}
    return subprocess.run(
        [str(BIN / "ppml"), *args], capture_output=True, text=True, env=full_env, timeout=300
    )


def test_submit_wait_follows_the_example_job_to_success(
    env: dict[str, str], digits: str, tmp_path: Path
) -> None:
    # act: the documented example, through the installed executable
    result = _cli_process(
        ["jobs", "submit", str(EXAMPLES / "dp_digits.yaml"), "--dataset", digits, "--wait"], env
    )
    # assert
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.strip().splitlines()[0]
    assert f"job {job_id} succeeded" in result.stderr
    assert "ε spent" in result.stderr and "epoch 15/15" in result.stderr
    job = json.loads(_run(["jobs", "get", job_id], env).stdout)
    assert job["status"] == "succeeded" and job["dataset_id"] == digits
    assert job["spec"]["name"] == "digits-dp"

    # the model, in both formats, matches the card's digests
    card = json.loads(_run(["models", "card", job_id], env).stdout)
    onnx_path = tmp_path / "model.onnx"
    _run(["models", "download", job_id, "--format", "onnx", "-o", str(onnx_path)], env)
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == card["artifacts"]["onnx"]["sha256"]
    weights = tmp_path / "weights.safetensors"
    _run(["models", "download", job_id, "--output", str(weights)], env)
    assert (
        hashlib.sha256(weights.read_bytes()).hexdigest()
        == card["artifacts"]["safetensors"]["sha256"]
    )

    # lists and budget show it
    listed = json.loads(_run(["jobs", "list", "--json", "--dataset", digits], env).stdout)
    assert job_id in [j["id"] for j in listed]
    assert job_id in _run(["jobs", "list", "--status", "succeeded"], env).stdout
    budget = json.loads(_run(["datasets", "budget", digits, "--json"], env).stdout)
    assert budget["epsilon_total"] == 20.0 and budget["epsilon_spent"] > 1.9
    assert "epsilon_remaining" in _run(["datasets", "budget", digits], env).stdout


def test_submit_wait_exits_non_zero_when_the_job_fails(env: dict[str, str], digits: str) -> None:
    # arrange: a job that hits its own time limit after a second
    spec = yaml.safe_load((EXAMPLES / "dp_digits.yaml").read_text())
    spec["training"].update(epochs=1000, max_runtime_s=1)
    spec["privacy"]["target_epsilon"] = 8.0
    path = Path(env["PPML_URL"].replace("http://", "").replace(":", "_") + "-failing.json")
    path = Path("/tmp") / path.name
    path.write_text(json.dumps(spec))
    # act
    result = _run(["jobs", "submit", str(path), "--dataset", digits, "--wait"], env, code=1)
    # assert
    job_id = result.stdout.strip().splitlines()[0]
    assert f"job {job_id} failed" in result.stderr and "time_limit" not in result.stdout
    job = json.loads(_run(["jobs", "get", job_id], env).stdout)
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit"
    path.unlink()


def test_datasets_upload_list_and_public_data(env: dict[str, str], tmp_path: Path) -> None:
    # arrange: a small CSV with a label column
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 3)).round(4)
    lines = ["a,b,c,label"] + [f"{a},{b},{c},{int(a > 0)}" for a, b, c in features]
    csv = tmp_path / "small.csv"
    csv.write_text("\n".join(lines) + "\n")
    # act
    upload = ["datasets", "upload", str(csv), "--target", "label"]
    budget = ["--epsilon", "2", "--delta", "1e-4"]
    private = _run([*upload, "--name", "small", *budget, "--classes", "1,0", "--json"], env)
    public = _run([*upload, "--name", "open", "--public"], env)
    refused = _run([*upload, "--name", "x"], env, code=1)
    undeclared = _run([*upload, "--name", "x", *budget], env, code=1)
    listing = _run(["datasets", "list"], env)
    # assert
    body = json.loads(private.stdout)
    assert body["privacy_budget"] == {"epsilon": 2.0, "delta": 1e-4} and body["num_features"] == 3
    assert body["classes"] == ["1", "0"]
    assert body["schema"] == {"classes": ["1", "0"], "input_shape": None, "bounds": None}
    assert public.stdout.strip() in listing.stdout and body["id"] in listing.stdout
    assert "--public" in refused.stderr
    assert "--classes" in undeclared.stderr


def test_upload_waits_for_validation_and_fails_with_the_reason(
    env: dict[str, str], tmp_path: Path
) -> None:
    # arrange: a CSV whose third column holds a word deep in the file
    lines = ["a,b,label"] + [f"{i},{i % 5},{i % 2}" for i in range(100)]
    lines[60] = "7,word,0"
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    upload = ["datasets", "upload", str(bad), "--target", "label", "--public"]
    # act
    refused = _run([*upload, "--name", "bad"], env, code=1)
    accepted = json.loads(_run([*upload, "--name", "later", "--no-wait", "--json"], env).stdout)
    # assert: the worker's reason, without the value
    assert "is invalid" in refused.stderr and "not numeric" in refused.stderr
    assert "word" not in refused.stderr
    assert accepted["status"] == "validating" and accepted["num_train"] is None


def test_api_errors_print_the_problem_detail_and_exit_1(env: dict[str, str]) -> None:
    missing = _run(["jobs", "get", "job_nope"], env, code=1)
    budget = _run(["datasets", "add", "d", "--builtin", "digits"], env, code=1)
    bad_builtin = _run(
        ["datasets", "add", "d", "--builtin", "nope", "--epsilon", "1", "--delta", "1e-6"],
        env,
        code=1,
    )
    no_key = _run(["datasets", "list"], {**env, "PPML_API_KEY": ""}, code=1)
    wrong_key = _run(["datasets", "list", "--api-key", "ppml_sk_wrong"], env, code=1)
    no_admin = _run(["tenants", "create", "x"], env, code=1)
    down = _run(["jobs", "list", "--url", f"http://127.0.0.1:{free_port()}"], env, code=1)

    assert "job not found" in missing.stderr and "HTTP 404" in missing.stderr
    assert "--epsilon" in budget.stderr
    assert "HTTP 422" in bad_builtin.stderr and "source.builtin" in bad_builtin.stderr
    assert "API key" in no_key.stderr
    assert "invalid API key" in wrong_key.stderr
    assert "admin token" in no_admin.stderr
    assert "cannot reach" in down.stderr
    assert "Traceback" not in missing.stderr + down.stderr


def test_keys_create_takes_a_role_and_an_analyst_key_registers_public_data_only(
    service: str,
) -> None:
    # arrange
    admin = {"PPML_URL": service, "PPML_ADMIN_TOKEN": ADMIN, "PPML_API_KEY": ""}
    tenant_id = _run(["tenants", "create", "cli-roles"], admin).stdout.strip()
    # act
    owner = _run(["keys", "create", tenant_id], admin)
    analyst = json.loads(
        _run(["keys", "create", tenant_id, "--role", "analyst", "--json"], admin).stdout
    )
    bad_role = _run(["keys", "create", tenant_id, "--role", "admin"], admin, code=2)
    as_analyst = {"PPML_URL": service, "PPML_API_KEY": analyst["key"], "PPML_ADMIN_TOKEN": ""}
    add = ["datasets", "add", "d", "--builtin", "digits"]
    refused = _run([*add, "--epsilon", "1", "--delta", "1e-6"], as_analyst, code=1)
    public = _run([*add, "--public"], as_analyst)
    # assert
    assert "owner key" in owner.stderr and owner.stdout.strip().startswith("ppml_sk_")
    assert analyst["role"] == "analyst" and analyst["tenant_id"] == tenant_id
    assert "admin" in bad_role.output
    assert "HTTP 403" in refused.stderr and "owner key" in refused.stderr
    assert public.stdout.strip().startswith("ds")


def test_keys_list_and_revoke_as_the_admin_and_as_an_owner(service: str) -> None:
    # arrange: an owner key and an expiring analyst key of a new tenant
    admin = {"PPML_URL": service, "PPML_ADMIN_TOKEN": ADMIN, "PPML_API_KEY": ""}
    tenant_id = _run(["tenants", "create", "cli-keys"], admin).stdout.strip()
    owner = json.loads(_run(["keys", "create", tenant_id, "--json"], admin).stdout)
    expiring = ["keys", "create", tenant_id, "--role", "analyst", "--json"]
    analyst = json.loads(_run([*expiring, "--expires-at", "2099-01-01T00:00:00Z"], admin).stdout)
    as_owner = {"PPML_URL": service, "PPML_API_KEY": owner["key"], "PPML_ADMIN_TOKEN": ""}
    # act
    by_admin = json.loads(_run(["keys", "list", "--tenant", tenant_id, "--json"], admin).stdout)
    table = _run(["keys", "list"], as_owner).stdout
    revoked = _run(["keys", "revoke", analyst["id"]], as_owner)
    by_owner = json.loads(_run(["keys", "list", "--json"], as_owner).stdout)
    _run(["keys", "revoke", owner["id"], "--tenant", tenant_id], admin)
    # assert
    assert [k["id"] for k in by_admin] == [analyst["id"], owner["id"]]
    assert by_admin[0]["expires_at"] == "2099-01-01T00:00:00Z"
    assert owner["prefix"] in table and owner["key"] not in table + json.dumps(by_admin)
    assert f"key {analyst['id']} revoked" in revoked.stderr
    assert [k["revoked_at"] is not None for k in by_owner] == [True, False]
    time.sleep(1.0)  # every API process refuses a revoked key within a second
    refused = _run(["datasets", "list"], as_owner, code=1)
    assert "HTTP 401" in refused.stderr


def test_cancel_a_queued_job(env: dict[str, str], digits: str, tmp_path: Path) -> None:
    # arrange: a long job, then one queued behind it on the single embedded worker
    spec = yaml.safe_load((EXAMPLES / "dp_digits.yaml").read_text())
    spec["training"]["epochs"] = 1000
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = _run(["jobs", "submit", str(path)], {**env, "PPML_DATASET_ID": digits}).stdout.strip()
    second = _run(["jobs", "submit", str(path), "--dataset", digits], env).stdout.strip()
    # act
    cancelled = _run(["jobs", "cancel", second, "--json"], env)
    again = _run(["jobs", "cancel", second], env, code=1)
    _run(["jobs", "cancel", first], env)
    # assert
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    assert "HTTP 409" in again.stderr


def test_submit_needs_a_dataset_id(env: dict[str, str]) -> None:
    result = _run(["jobs", "submit", str(EXAMPLES / "dp_digits.yaml")], env, code=1)

    assert "--dataset" in result.stderr


# Rows and features of the built-ins (scikit-learn's digits and breast_cancer, mnist1d as
# generated).
BUILTIN_SIZES = {"digits": (1797, 64), "breast_cancer": (569, 30), "mnist1d": (10_000, 40)}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_are_valid_job_specs(name: str) -> None:
    # Every example is a valid spec that the service admits on the built-in its comment
    # registers, as that command registers it (priced as admission prices it).
    text = (EXAMPLES / name).read_text()
    spec: dict[str, Any] = yaml.safe_load(text)
    match = re.search(r"--builtin (\w+) --epsilon ([\d.]+) --delta ([\de.-]+)(.*)", text)
    assert match is not None, "the example says which built-in it runs on"
    builtin, epsilon, delta, rest = match.groups()

    assert "dataset_id" not in spec  # filled in by `--dataset`
    parsed = JobSpec.model_validate({**spec, "dataset_id": "ds_example"})
    assert parsed.privacy is not None
    rows, features = BUILTIN_SIZES[builtin]
    shape = BUILTIN_INPUT_SHAPES.get(builtin)
    dataset = Dataset(
        id="ds_example",
        tenant_id="t",
        name=builtin,
        source={},
        storage_key="nowhere",
        num_features=features,
        num_classes=len(BUILTIN_CLASSES[builtin]),
        num_train=int(rows * 0.8),  # about 20% held out
        num_test=rows - int(rows * 0.8),
        classes={},
        data_schema=None if shape is None else {"input_shape": list(shape)},
        privacy_unit="client" if "--privacy-unit client" in rest else "record",
        epsilon_total=float(epsilon),
        delta_total=float(delta),
    )
    pricing = price(parsed, dataset, Settings())
    assert pricing.event is not None and pricing.epsilon <= parsed.privacy.target_epsilon


def test_cli_never_touches_the_database(env: dict[str, str], tmp_path: Path) -> None:
    # The client commands work from a directory with no data dir and no database settings.
    result = _cli_process(["datasets", "list", "--json"], {**env, "PPML_DATA_DIR": str(tmp_path)})

    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)
    assert list(tmp_path.iterdir()) == []
    assert httpx.get(f"{env['PPML_URL']}/healthz").status_code == 200


def test_quote_then_watch_reattach_ledger_and_predict(
    env: dict[str, str], digits: str, tmp_path: Path
) -> None:
    # arrange: a job far too long to end while its follower is interrupted (it is cancelled
    # once the follower has re-attached), and the example job, which runs to the end
    example = yaml.safe_load((EXAMPLES / "dp_digits.yaml").read_text())
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(example))
    long_path = tmp_path / "long.yaml"
    long_path.write_text(
        yaml.safe_dump({**example, "training": {**example["training"], "epochs": 1000}})
    )
    # act: quote (nothing reserved), then submit without waiting
    quote = json.loads(
        _run(["jobs", "quote", str(path), "--dataset", digits, "--json"], env).stdout
    )
    shown = _run(["jobs", "quote", str(path), "--dataset", digits], env).stdout
    long_id = _run(["jobs", "submit", str(long_path), "--dataset", digits], env).stdout.strip()
    auth = {"Authorization": f"Bearer {env['PPML_API_KEY']}"}
    with httpx.Client(base_url=env["PPML_URL"], headers=auth) as http:
        wait_for_status(http, long_id, {"running"})  # it has events to resume after
    # a follower interrupted by Ctrl-C tells how to re-attach after the last event it saw
    full_env = {**service_env(Path("/nonexistent")), **env}
    watcher = subprocess.Popen(
        [str(BIN / "ppml"), "jobs", "watch", long_id],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Without a terminal the live bar is drawn only at the end: wait for the follower's
    # first line, then for the job's backlog of events to reach it.
    seen = _read_until(watcher, "following job", timeout=60)
    time.sleep(1)
    watcher.send_signal(signal.SIGINT)
    _out, rest = watcher.communicate(timeout=30)
    interrupted = seen + rest
    assert "--after " in interrupted, interrupted
    after = interrupted.rsplit("--after ", 1)[1].split(")")[0].strip()
    _run(["jobs", "cancel", long_id], env)
    resumed = _run(["jobs", "watch", long_id, "--after", after], env, code=1)
    finished = _run(["jobs", "submit", str(path), "--dataset", digits, "--wait"], env)
    job_id = finished.stdout.strip().splitlines()[-1]
    ledger = json.loads(_run(["datasets", "ledger", digits, "--json"], env).stdout)
    ledger_table = _run(["datasets", "ledger", digits], env).stdout
    dataset = json.loads(_run(["datasets", "get", digits], env).stdout)
    # assert
    assert quote["fits_budget"] is True and quote["epsilon"] <= 2.0 and quote["steps"] > 0
    assert "noise_multiplier" in shown and "fits_budget" in shown
    assert watcher.returncode == 130, interrupted
    assert f"re-attach: ppml jobs watch {long_id} --after {after}" in interrupted
    assert int(after) >= 1
    assert f"job {long_id} cancelled" in resumed.stderr, resumed.stderr
    assert f"job {job_id} succeeded" in finished.stderr and "epoch 15/15" in finished.stderr
    assert "loss " in finished.stderr and "acc " in finished.stderr  # the released metrics
    kinds = [e["kind"] for e in ledger if e["job_id"] == job_id]
    assert kinds[0] == "reserve" and "commit" in kinds
    assert job_id in ledger_table and "reserve" in ledger_table
    assert dataset["id"] == digits and dataset["num_features"] == 64

    # the model predicts rows from JSON and from CSV; a wrong width is the API's 422
    rows = np.random.default_rng(0).uniform(0, 16, size=(3, 64)).round(2).tolist()
    (tmp_path / "rows.json").write_text(json.dumps({"inputs": rows}))
    (tmp_path / "rows.csv").write_text("\n".join(",".join(map(str, r)) for r in rows))
    from_json = json.loads(
        _run(["models", "predict", job_id, str(tmp_path / "rows.json"), "--json"], env).stdout
    )
    from_csv = _run(["models", "predict", job_id, str(tmp_path / "rows.csv")], env).stdout
    (tmp_path / "narrow.json").write_text(json.dumps([[1.0, 2.0]]))
    narrow = _run(["models", "predict", job_id, str(tmp_path / "narrow.json")], env, code=1)
    assert len(from_json["predictions"]) == 3 and len(from_json["probabilities"][0]) == 10
    assert all(str(p) in from_csv for p in from_json["predictions"])
    assert "HTTP 422" in narrow.stderr


def _read_until(proc: subprocess.Popen[str], marker: str, *, timeout: float) -> str:
    """What ``proc`` wrote to stderr up to and including ``marker``."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen, deadline = b"", time.monotonic() + timeout
    while marker.encode() not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            seen += os.read(fd, 4096)
    return seen.decode()


def test_quote_over_budget_exits_3_with_the_largest_epsilon_that_fits(
    env: dict[str, str], digits: str, tmp_path: Path
) -> None:
    spec = yaml.safe_load((EXAMPLES / "dp_digits.yaml").read_text())
    spec["privacy"]["target_epsilon"] = 50.0
    path = tmp_path / "greedy.json"
    path.write_text(json.dumps(spec))

    result = _run(["jobs", "quote", str(path), "--dataset", digits], env, code=3)

    assert "does not fit" in result.stderr and "largest target_epsilon" in result.stderr


def test_every_validation_error_of_a_422_is_printed(
    env: dict[str, str], digits: str, tmp_path: Path
) -> None:
    # arrange: a typo (learning_rat) and a bad value (batch_size 0) in one spec
    spec = yaml.safe_load((EXAMPLES / "dp_digits.yaml").read_text())
    spec["training"]["learning_rat"] = spec["training"].pop("learning_rate")
    spec["training"]["batch_size"] = 0
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(spec))
    # act
    submitted = _run(["jobs", "submit", str(path), "--dataset", digits], env, code=1)
    quoted = _run(["jobs", "quote", str(path), "--dataset", digits], env, code=1)
    # assert: each offending field is named, the typo included
    for result in (submitted, quoted):
        assert "HTTP 422" in result.stderr
        assert "training.learning_rat" in result.stderr
        assert "training.learning_rate" in result.stderr
        assert "training.batch_size" in result.stderr


def test_watch_of_an_unknown_job_is_a_clear_404(env: dict[str, str]) -> None:
    result = _run(["jobs", "watch", "job_nope"], env, code=1)

    assert "HTTP 404" in result.stderr and "Traceback" not in result.stderr
