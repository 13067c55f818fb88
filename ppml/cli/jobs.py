"""``ppml jobs``: submit (and follow), list, get and cancel training jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ppml.cli.common import (
    ApiKey,
    AsJson,
    Limit,
    Url,
    api_client,
    created,
    err,
    fail,
    fmt,
    print_json,
    table,
)
from ppml.client import DEFAULT_URL, PPMLClient

jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)

TERMINAL = ("succeeded", "failed", "cancelled")


def _load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        fail(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(spec, dict):
        fail(f"{path} must hold a job spec (a mapping)")
    return spec


def _epsilon_so_far(job: dict[str, Any]) -> float | None:
    """The job's ε so far, as the server reports it: final once the job ends, else what the
    steps reported so far spent (``progress.epsilon_spent``)."""
    privacy = job.get("privacy") or {}
    if privacy.get("epsilon_spent") is not None:
        return float(privacy["epsilon_spent"])
    spent = (job.get("progress") or {}).get("epsilon_spent")
    return None if spent is None else float(spent)


def _progress_detail(job: dict[str, Any], epsilon: float | None) -> str:
    spec, progress = job.get("spec") or {}, job.get("progress") or {}
    federated = spec.get("federated")
    if federated:
        where = f"round {progress.get('round') or 0}/{federated.get('rounds', '?')}"
    else:
        where = f"epoch {progress.get('epoch', 0)}/{spec.get('training', {}).get('epochs', '?')}"
    spent = "ε -" if epsilon is None else f"ε {epsilon:.3f}"
    return f"{where}  {spent}"


def _follow(client: PPMLClient, job: dict[str, Any], poll: float, timeout: float | None) -> Any:
    """Polls the job with a live progress bar until it ends; returns its final state."""
    deadline = time.monotonic() + timeout if timeout else None
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=30),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    console = err()
    console.print(f"following job {job['id']} (Ctrl-C stops waiting, not the job)")
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job["status"], total=1.0, detail="")
        while True:
            bar.update(
                task,
                description=job["status"],
                completed=float((job.get("progress") or {}).get("fraction") or 0.0),
                detail=_progress_detail(job, _epsilon_so_far(job)),
            )
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                fail(f"gave up waiting after {timeout:g} s; the job goes on")
            time.sleep(poll)
            job = client.get_job(job["id"])


def _job_summary(job: dict[str, Any]) -> str:
    parts = [f"job {job['id']} {job['status']}"]
    metrics = job.get("metrics") or {}
    if "test_accuracy" in metrics:
        parts.append(f"test accuracy {metrics['test_accuracy']:.4f}")
    privacy = job.get("privacy") or {}
    if privacy.get("epsilon_spent") is not None:
        parts.append(f"ε spent {privacy['epsilon_spent']:.4f} (δ={privacy.get('delta'):g})")
    if job.get("error"):
        parts.append(f"error: {job['error'].get('message') or job['error']}")
    return ", ".join(parts)


@jobs_app.command("submit")
def jobs_submit(
    spec_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Job spec, YAML or JSON.")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(envvar="PPML_DATASET_ID", help="Dataset id; fills the spec's dataset_id."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job until it ends.")] = False,
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between polls.")] = 0.5,
    timeout: Annotated[float | None, typer.Option(help="Stop waiting after this long.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Replays return the job.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Submit a training job; with --wait, follow it and exit non-zero unless it succeeds."""
    spec = _load_spec(spec_file)
    if dataset:
        spec["dataset_id"] = dataset
    if not spec.get("dataset_id"):
        fail("the spec has no dataset_id: pass --dataset ID or set PPML_DATASET_ID")
    with api_client(url, api_key=api_key) as client:
        job = client.submit_job(spec, idempotency_key=idempotency_key)
        if not wait:
            created(job, job["id"], f"job {job['id']} {job['status']}", as_json)
            return
        if not as_json:
            typer.echo(job["id"])
        try:
            job = _follow(client, job, poll, timeout)
        except KeyboardInterrupt:
            err().print(f"stopped waiting; job {job['id']} goes on (ppml jobs get {job['id']})")
            raise typer.Exit(130) from None
    if as_json:
        print_json(job)
    err().print(_job_summary(job))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Only jobs on this dataset.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    limit: Limit = 50,
    as_json: AsJson = False,
) -> None:
    """List your jobs, newest first."""
    with api_client(url, api_key=api_key) as client:
        items = client.list_jobs(status=status, dataset_id=dataset, limit=limit)
    if as_json:
        print_json(items)
        return
    rows = [
        [
            j["id"],
            j["name"],
            j["status"],
            f"{100 * float(j['progress']['fraction']):.0f}%",
            fmt((j.get("privacy") or {}).get("epsilon_spent")),
            fmt((j.get("metrics") or {}).get("test_accuracy")),
            j["created_at"][:16].replace("T", " "),
        ]
        for j in items
    ]
    table("jobs", ["id", "name", "status", "progress", "ε spent", "accuracy", "created"], rows)


@jobs_app.command("get")
def jobs_get(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Print a job (status, progress, metrics, privacy) as JSON."""
    with api_client(url, api_key=api_key) as client:
        print_json(client.get_job(job_id))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a job (a running job is charged for the steps it ran)."""
    with api_client(url, api_key=api_key) as client:
        job = client.cancel_job(job_id)
    if as_json:
        print_json(job)
        return
    err().print(f"job {job['id']}: cancel requested; it is {job['status']}")
