"""The ``ppml`` command: ``serve``, ``worker`` and ``db`` administration, and a client.

The core does not import the ``api`` or ``worker`` adapters: ``serve`` hands uvicorn the app
factory by name and starts the worker as its own process (``python -m worker``), the same way
the API enqueues tasks by name.

The client commands (``datasets``, ``jobs``, ``models``, ``tenants``, ``keys``) talk to the
HTTP API only (``--url``/``PPML_URL``, ``--api-key``/``PPML_API_KEY``, ``PPML_ADMIN_TOKEN``),
never to the database (through ``ppml.client``). Server modules are imported inside the server
commands, so the client starts fast.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ppml.client import DEFAULT_URL, ApiError, PPMLClient
from ppml.config import get_settings

app = typer.Typer(help="ppml: privacy-preserving training as a service.", no_args_is_help=True)
db_app = typer.Typer(help="Database administration.", no_args_is_help=True)
app.add_typer(db_app, name="db")

log = logging.getLogger("ppml")


def _verify_ledger(url: str, *, repair: bool) -> list[str]:
    from ppml.db.repositories import Repositories
    from ppml.db.session import Database
    from ppml.privacy.ledger import Ledger

    database = Database(url)
    try:
        with database.session(write=repair) as session:
            return Ledger(Repositories(session)).verify(repair=repair)
    finally:
        database.dispose()


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION."""
    from ppml.db.migrate import upgrade

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"database at revision {revision}")


@db_app.command("check")
def db_check(
    repair: bool = typer.Option(False, help="Rebuild cached totals from entries."),
) -> None:
    """Check that every budget's cached totals equal the fold of its ledger entries."""
    bad = _verify_ledger(get_settings().resolved_database_url, repair=repair)
    if bad and not repair:
        typer.echo(f"ledger cache differs from entries for: {', '.join(bad)}", err=True)
        raise typer.Exit(1)
    typer.echo("ledger consistent" if not bad else f"repaired: {', '.join(bad)}")


class _WorkerSupervisor:
    """Keeps one embedded worker process alive while the API runs."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="worker-supervisor", daemon=True).start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.process = subprocess.Popen([sys.executable, "-m", "worker"])
            code = self.process.wait()
            if self.stopping.is_set():
                return
            log.warning("embedded worker exited with %s; restarting", code)
            time.sleep(1)

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Run an embedded worker."),
) -> None:
    """Run the API (and, by default, an embedded training worker)."""
    import uvicorn

    from ppml.db.migrate import upgrade

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.resolved_database_url
    upgrade(url)
    repaired = _verify_ledger(url, repair=True)
    if repaired:
        log.error("ledger cache rebuilt from entries for datasets %s", repaired)
    token_source = "PPML_ADMIN_TOKEN" if settings.admin_token else None
    settings.ensure_admin_token()
    if token_source is None:
        token_source = str((settings.data_dir / "admin_token").resolve())
        # The worker and uvicorn read settings from the environment; keep them consistent.
        os.environ["PPML_ADMIN_TOKEN"] = settings.ensure_admin_token()
    typer.echo(f"ppml API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    typer.echo(f"admin token: {token_source}")
    typer.echo(f"database: {url}\nbroker: {settings.resolved_broker_url}")
    supervisor = _WorkerSupervisor()
    if worker:
        supervisor.start()
    try:
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, log_level="info")
    finally:
        supervisor.stop()


@app.command("worker")
def worker_command(
    concurrency: int = typer.Option(1, help="Jobs run at once (one per GPU is typical)."),
) -> None:
    """Run a training worker alone (production)."""
    os.execv(
        sys.executable,
        [sys.executable, "-m", "worker", "--concurrency", str(concurrency)],
    )


# --- client commands: the HTTP API only ----------------------------------------------------
# Commands that create something print its id (or key) alone on stdout, for scripts
# (`DS=$(ppml datasets add …)`); human-readable lines go to stderr. `--json` prints the API's
# answer instead.

Url = Annotated[str, typer.Option("--url", envvar="PPML_URL", help="Base URL of the API.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="PPML_API_KEY", help="A tenant's key.", show_default=False),
]
AdminToken = Annotated[
    str | None,
    typer.Option(
        "--admin-token", envvar="PPML_ADMIN_TOKEN", help="The admin token.", show_default=False
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
Limit = Annotated[int, typer.Option(min=1, help="Show at most this many items.")]

datasets_app = typer.Typer(help="Datasets and their privacy budgets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Training jobs.", no_args_is_help=True)
models_app = typer.Typer(help="Trained models and their privacy receipts.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants (admin token).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (admin token).", no_args_is_help=True)
for _name, _sub in (
    ("datasets", datasets_app),
    ("jobs", jobs_app),
    ("models", models_app),
    ("tenants", tenants_app),
    ("keys", keys_app),
):
    app.add_typer(_sub, name=_name)

TERMINAL = ("succeeded", "failed", "cancelled")


def _err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str) -> NoReturn:
    _err().print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


@contextmanager
def _client(
    url: str, *, api_key: str | None = None, admin_token: str | None = None
) -> Iterator[PPMLClient]:
    """A client whose API errors end the command: the problem's detail, exit code 1."""
    try:
        with PPMLClient(url, api_key=api_key, admin_token=admin_token) as client:
            yield client
    except ApiError as exc:
        _fail(f"{exc.detail} (HTTP {exc.status})")
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url}: {exc}")


def _print_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2, sort_keys=True))


def _created(body: dict[str, Any], value: str, message: str, as_json: bool) -> None:
    if as_json:
        _print_json(body)
        return
    _err().print(message)
    typer.echo(value)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table whose cells are never wrapped; piped output is not cut at 80 columns."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(highlight=False)
    if not console.is_terminal:
        needed = Measurement.get(console, console.options.update(width=10_000), table).maximum
        console = Console(highlight=False, width=max(80, needed))
    console.print(table)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _budget(epsilon: float | None, delta: float | None, public: bool) -> tuple[float, float] | None:
    if public:
        if epsilon is not None or delta is not None:
            _fail("--public data has no budget: drop --epsilon and --delta")
        return None
    if epsilon is None or delta is None:
        _fail("give the privacy budget (--epsilon and --delta), or --public for data without one")
    return epsilon, delta


Epsilon = Annotated[float | None, typer.Option(help="Total ε of the dataset's budget.")]
Delta = Annotated[float | None, typer.Option(help="Total δ (well below 1/n).")]
Public = Annotated[bool, typer.Option("--public", help="Public data: no privacy budget.")]
Unit = Annotated[str, typer.Option(help="Privacy unit: record or client.")]


def _dataset_line(dataset: dict[str, Any]) -> str:
    budget = dataset.get("privacy_budget")
    privacy = f"ε={budget['epsilon']:g}, δ={budget['delta']:g}" if budget else "public"
    return (
        f"dataset {dataset['id']} {dataset['name']!r}: {dataset['num_train']} train / "
        f"{dataset['num_test']} test rows, {dataset['num_features']} features, "
        f"{dataset['num_classes']} classes; {privacy}"
    )


@datasets_app.command("add")
def datasets_add(
    name: Annotated[str, typer.Argument(help="A name for the dataset.")],
    builtin: Annotated[str, typer.Option(help="digits, breast_cancer or mnist1d.")],
    epsilon: Epsilon = None,
    delta: Delta = None,
    public: Public = False,
    privacy_unit: Unit = "record",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Register a built-in dataset with its privacy budget."""
    budget = _budget(epsilon, delta, public)
    with _client(url, api_key=api_key) as client:
        dataset = client.create_dataset(
            name, builtin=builtin, budget=budget, privacy_unit=privacy_unit
        )
    _created(dataset, dataset["id"], _dataset_line(dataset), as_json)


@datasets_app.command("upload")
def datasets_upload(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="CSV, Parquet, NPZ.")],
    name: Annotated[str, typer.Option(help="A name for the dataset.")],
    target: Annotated[str | None, typer.Option(help="The label column.")] = None,
    epsilon: Epsilon = None,
    delta: Delta = None,
    public: Public = False,
    client_column: Annotated[
        str | None, typer.Option(help="Column naming each row's federated client.")
    ] = None,
    privacy_unit: Unit = "record",
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a CSV, Parquet or NPZ file as a dataset with its privacy budget."""
    budget = _budget(epsilon, delta, public)
    with _client(url, api_key=api_key) as client:
        dataset = client.upload_dataset(
            file,
            name=name,
            target=target,
            budget=budget,
            client_column=client_column,
            privacy_unit=privacy_unit,
        )
    _created(dataset, dataset["id"], _dataset_line(dataset), as_json)


@datasets_app.command("list")
def datasets_list(
    url: Url = DEFAULT_URL, api_key: ApiKey = None, limit: Limit = 50, as_json: AsJson = False
) -> None:
    """List your datasets, newest first."""
    with _client(url, api_key=api_key) as client:
        items = client.list_datasets(limit=limit)
    if as_json:
        _print_json(items)
        return
    rows = []
    for d in items:
        budget = d.get("privacy_budget") or {}
        rows.append(
            [
                d["id"],
                d["name"],
                str(d["num_features"]),
                str(d["num_classes"]),
                f"{d['num_train']}/{d['num_test']}",
                _fmt(budget.get("epsilon")),
                _fmt(budget.get("delta")),
                d["created_at"][:16].replace("T", " "),
            ]
        )
    columns = ["id", "name", "features", "classes", "train/test", "ε", "δ", "created"]
    _table("datasets", columns, rows)


@datasets_app.command("budget")
def datasets_budget(
    dataset_id: Annotated[str, typer.Argument(help="The dataset's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Spent, reserved and remaining ε of a dataset (composed across jobs by RDP)."""
    with _client(url, api_key=api_key) as client:
        budget = client.dataset_budget(dataset_id)
    if as_json:
        _print_json(budget)
        return
    keys = ["epsilon_total", "delta_total", "epsilon_spent", "epsilon_reserved"]
    keys += ["epsilon_remaining", "accounting", "admission", "privacy_unit"]
    _table(f"budget of {dataset_id}", ["", "value"], [[k, _fmt(budget.get(k))] for k in keys])


def _load_spec(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        _fail(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if not isinstance(spec, dict):
        _fail(f"{path} must hold a job spec (a mapping)")
    return spec


def _epsilon_so_far(privacy: dict[str, Any] | None, steps: int) -> float | None:
    """The job's ε after ``steps`` steps: the server's figure once final, else computed here
    with the same accountant (the API reports ε spent only when the job ends)."""
    if not privacy:
        return None
    if privacy.get("epsilon_spent") is not None:
        return float(privacy["epsilon_spent"])
    if steps <= 0:
        return 0.0
    from ppml.privacy import accounting as acc

    try:
        event = acc.MechanismEvent(
            sample_rate=float(privacy["sample_rate"]),
            noise_multiplier=float(privacy["noise_multiplier"]),
            steps=steps,
            unit=str(privacy.get("unit", "record")),
        )
        return float(acc.epsilon(acc.rdp_curve(event), float(privacy["delta"])))
    except (KeyError, TypeError, ValueError):
        return None


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
    epsilons: dict[int, float | None] = {}
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=30),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    console = _err()
    console.print(f"following job {job['id']} (Ctrl-C stops waiting, not the job)")
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job["status"], total=1.0, detail="")
        while True:
            steps = int((job.get("progress") or {}).get("steps") or 0)
            if steps not in epsilons or job["status"] in TERMINAL:
                epsilons[steps] = _epsilon_so_far(job.get("privacy"), steps)
            bar.update(
                task,
                description=job["status"],
                completed=float((job.get("progress") or {}).get("fraction") or 0.0),
                detail=_progress_detail(job, epsilons[steps]),
            )
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                _fail(f"gave up waiting after {timeout:g} s; the job goes on")
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
        _fail("the spec has no dataset_id: pass --dataset ID or set PPML_DATASET_ID")
    with _client(url, api_key=api_key) as client:
        job = client.submit_job(spec, idempotency_key=idempotency_key)
        if not wait:
            _created(job, job["id"], f"job {job['id']} {job['status']}", as_json)
            return
        if not as_json:
            typer.echo(job["id"])
        try:
            job = _follow(client, job, poll, timeout)
        except KeyboardInterrupt:
            _err().print(f"stopped waiting; job {job['id']} goes on (ppml jobs get {job['id']})")
            raise typer.Exit(130) from None
    if as_json:
        _print_json(job)
    _err().print(_job_summary(job))
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
    with _client(url, api_key=api_key) as client:
        items = client.list_jobs(status=status, dataset_id=dataset, limit=limit)
    if as_json:
        _print_json(items)
        return
    rows = [
        [
            j["id"],
            j["name"],
            j["status"],
            f"{100 * float(j['progress']['fraction']):.0f}%",
            _fmt((j.get("privacy") or {}).get("epsilon_spent")),
            _fmt((j.get("metrics") or {}).get("test_accuracy")),
            j["created_at"][:16].replace("T", " "),
        ]
        for j in items
    ]
    _table("jobs", ["id", "name", "status", "progress", "ε spent", "accuracy", "created"], rows)


@jobs_app.command("get")
def jobs_get(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Print a job (status, progress, metrics, privacy) as JSON."""
    with _client(url, api_key=api_key) as client:
        _print_json(client.get_job(job_id))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a job (a running job is charged for the steps it ran)."""
    with _client(url, api_key=api_key) as client:
        job = client.cancel_job(job_id)
    if as_json:
        _print_json(job)
        return
    _err().print(f"job {job['id']}: cancel requested; it is {job['status']}")


@models_app.command("download")
def models_download(
    job_id: Annotated[str, typer.Argument(help="The job whose model to download.")],
    format: Annotated[str, typer.Option("--format", help="safetensors or onnx.")] = "safetensors",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write (default JOB.FORMAT).")
    ] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Download a trained model (its metadata holds the privacy receipt); checks its sha256."""
    if format not in ("safetensors", "onnx"):
        _fail("--format must be safetensors or onnx")
    destination = output or Path(f"{job_id}.{format}")
    with _client(url, api_key=api_key) as client:
        size, digest = client.download_model(job_id, destination, format=format)
    _err().print(f"saved {destination} ({size} bytes, sha256 {digest})")
    typer.echo(str(destination))


@models_app.command("card")
def models_card(
    job_id: Annotated[str, typer.Argument(help="The job whose model card to print.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Print a model's card (privacy receipt, held-out metrics, artefact digests) as JSON."""
    with _client(url, api_key=api_key) as client:
        _print_json(client.model_card(job_id))


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="The tenant's name.")],
    url: Url = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Create a tenant (admin); prints its id."""
    with _client(url, admin_token=admin_token) as client:
        tenant = client.create_tenant(name)
    _created(tenant, tenant["id"], f"tenant {tenant['id']} {tenant['name']!r}", as_json)


@keys_app.command("create")
def keys_create(
    tenant_id: Annotated[str, typer.Argument(help="The tenant's id.")],
    url: Url = DEFAULT_URL,
    admin_token: AdminToken = None,
    as_json: AsJson = False,
) -> None:
    """Create an API key for a tenant (admin); prints the key, which is shown only once."""
    with _client(url, admin_token=admin_token) as client:
        key = client.create_api_key(tenant_id)
    message = f"key {key['id']} for tenant {tenant_id} (shown once; keep it secret)"
    _created(key, key["key"], message, as_json)


if __name__ == "__main__":
    app()
