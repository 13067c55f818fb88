"""``ppml jobs``: submit (and follow), list, get and cancel training jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

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
from ppml.cli.follow import Follower
from ppml.client import DEFAULT_URL, PPMLClient

jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)


def _load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        fail(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(spec, dict):
        fail(f"{path} must hold a job spec (a mapping)")
    return spec


def _follow(
    client: PPMLClient,
    job: dict[str, Any],
    *,
    after: str | None,
    timeout: float | None,
    retry_s: float = 1.0,
) -> dict[str, Any]:
    """Follows the job's events with a live bar until it ends; Ctrl-C stops following (exit
    130) and prints how to re-attach where it stopped."""
    console = err()
    console.print(f"following job {job['id']} (Ctrl-C stops waiting, not the job)")
    follower = Follower(client, job, last_id=after)
    try:
        return follower.run(timeout=timeout, retry_s=retry_s)
    except KeyboardInterrupt:
        again = f"ppml jobs watch {job['id']}"
        if follower.last_id is not None:
            again += f" --after {follower.last_id}"
        console.print(f"stopped waiting; job {job['id']} goes on (re-attach: {again})")
        raise typer.Exit(130) from None


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
    poll: Annotated[
        float, typer.Option(min=0.05, help="Seconds before re-connecting a dropped event stream.")
    ] = 1.0,
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
        job = _follow(client, job, after=None, timeout=timeout, retry_s=poll)
    _ended(job, as_json)


def _ended(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(job)
    err().print(_job_summary(job))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("watch")
def jobs_watch(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    after: Annotated[
        str | None,
        typer.Option(
            help="Resume after this event id (what an interrupted watch printed): only later "
            "events are shown.",
            show_default=False,
        ),
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop waiting after this long.")] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Follow a job (submitted earlier, or after Ctrl-C) until it ends; exit non-zero unless
    it succeeds. Shows progress, loss, accuracy, ε spent and the time left."""
    with api_client(url, api_key=api_key) as client:
        job = _follow(client, client.get_job(job_id), after=after, timeout=timeout)
    _ended(job, as_json)


@jobs_app.command("quote")
def jobs_quote(
    spec_file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Job spec, YAML or JSON.")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(envvar="PPML_DATASET_ID", help="Dataset id; fills the spec's dataset_id."),
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """What a job would cost (ε, noise, steps) and whether it fits the budget; reserves
    nothing. Exit code 3 when it does not fit."""
    spec = _load_spec(spec_file)
    if dataset:
        spec["dataset_id"] = dataset
    if not spec.get("dataset_id"):
        fail("the spec has no dataset_id: pass --dataset ID or set PPML_DATASET_ID")
    with api_client(url, api_key=api_key) as client:
        quote = client.quote_job(spec)
    if as_json:
        print_json(quote)
    else:
        keys = ["epsilon", "delta", "noise_multiplier", "sample_rate", "steps", "fits_budget"]
        keys += ["epsilon_remaining", "max_target_epsilon", "compute"]
        table("quote", ["", "value"], [[k, fmt(quote.get(k))] for k in keys])
    if not quote.get("fits_budget"):
        largest = quote.get("max_target_epsilon")
        hint = "" if largest is None else f"; the largest target_epsilon that fits is {largest:g}"
        err().print(f"this job does not fit the dataset's remaining budget{hint}")
        raise typer.Exit(3)


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
