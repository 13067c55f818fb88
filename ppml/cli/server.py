"""Server commands: ``serve``, ``worker`` and ``db``.

They do not import the ``api`` or ``worker`` adapters: ``serve`` hands uvicorn the app factory
by name and starts the worker as its own process (``python -m worker``), the same way the API
enqueues tasks by name. Server modules are imported inside the commands, so the client starts
fast.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ppml.config import Settings, get_settings

if TYPE_CHECKING:
    from ppml.privacy.rollback import ChainReport

db_app = typer.Typer(help="Database administration.", no_args_is_help=True)

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

    settings = get_settings()
    upgrade(settings.resolved_database_url, revision)
    typer.echo(f"database at revision {revision}")
    if revision == "head":
        typer.echo(f"split secrets sealed now: {_seal_secrets(settings)}")


def _seal_secrets(settings: Settings) -> int:
    """Seal the split secrets still stored in plain text (or under a retired data key)."""
    from ppml.db.session import Database
    from ppml.services.datasets import seal_split_secrets
    from ppml.trust.sealing import DataKeys

    database = Database(settings.resolved_database_url)
    try:
        return seal_split_secrets(database, DataKeys.from_settings(settings))
    finally:
        database.dispose()


def _check_chains(settings: Settings) -> ChainReport:
    from ppml.db.session import Database
    from ppml.privacy.heads import HeadFile
    from ppml.privacy.rollback import check_chains

    database = Database(settings.resolved_database_url)
    try:
        return check_chains(database, HeadFile.of(settings))
    finally:
        database.dispose()


@db_app.command("check")
def db_check(
    repair: bool = typer.Option(
        False, help="Rebuild cached totals from entries (never a broken hash chain)."
    ),
) -> None:
    """Check every dataset's ledger: its hash chain (each entry's hash, sequence and link),
    that the chain is not behind its signed head (a rollback), and that the budget's cached
    totals equal the fold of its entries."""
    settings = get_settings()
    bad = _verify_ledger(settings.resolved_database_url, repair=repair)
    chains = _check_chains(settings)
    for line in chains.problems() + chains.warnings():
        typer.echo(line, err=True)
    if bad and not repair:
        typer.echo(f"ledger cache differs from entries for: {', '.join(bad)}", err=True)
    if not chains.ok:
        if repair:
            typer.echo(
                "--repair rebuilt only the cached totals: a broken or rolled-back chain is "
                "evidence, and is not repaired",
                err=True,
            )
        raise typer.Exit(1)
    if bad and not repair:
        raise typer.Exit(1)
    typer.echo("ledger consistent" if not bad else f"repaired: {', '.join(bad)}")


@db_app.command("acknowledge-rollback")
def db_acknowledge_rollback(
    dataset_id: str | None = typer.Argument(
        None, help="The dataset whose ledger is behind its signed chain head."
    ),
    note: str = typer.Option(..., help="Why (recorded with the acknowledgement)."),
    every: bool = typer.Option(
        False,
        "--all",
        help="Every dataset that is behind; with a head file that does not verify, rebuild "
        "it from the database (every dataset is recorded).",
    ),
    by: str | None = typer.Option(None, help="Who acknowledges (default: user@host)."),
) -> None:
    """Accept a dataset's ledger as the database holds it after a rollback (a restored
    backup, deleted entries): records the event, then moves the signed chain head back to the
    database's, so the dataset admits jobs again."""
    import getpass
    import socket

    from ppml.db.session import Database
    from ppml.errors import PPMLError
    from ppml.privacy.heads import HeadFile
    from ppml.privacy.rollback import acknowledge_rollback

    if (dataset_id is None) == (not every):
        typer.echo("give a DATASET_ID or --all (not both)", err=True)
        raise typer.Exit(2)
    settings = get_settings()
    database = Database(settings.resolved_database_url)
    who = by or f"{getpass.getuser()}@{socket.gethostname()}"
    try:
        rows = acknowledge_rollback(
            database,
            HeadFile.of(settings),
            None if every else [str(dataset_id)],
            by=who,
            note=note,
        )
    except PPMLError as error:
        typer.echo(error.detail, err=True)
        raise typer.Exit(1) from None
    finally:
        database.dispose()
    if not rows:
        typer.echo("no ledger is behind its signed chain head: nothing recorded")
    for row in rows:
        was = "unknown" if row.from_seq is None else f"entry {row.from_seq}"
        typer.echo(
            f"acknowledged {row.id}: dataset {row.dataset_id}, signed head {was} -> "
            f"database head entry {row.to_seq}"
        )


def _embedded_worker_child() -> None:
    """In the worker child, before it runs. Its own process group: a signal sent to the
    server's group (Ctrl+C, ``kill -- -PGID``) reaches the server alone, whose shutdown stops
    the worker, instead of killing the worker mid-shutdown and having it restarted. On Linux the
    kernel also sends it SIGTERM when ``ppml serve`` dies, even by SIGKILL, so no embedded worker
    outlives its server."""
    os.setpgrp()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _exit_on_term(signum: int, _frame: object) -> None:
    # uvicorn restores this handler after its graceful shutdown and raises the signal again:
    # exiting through SystemExit runs serve()'s finally, which stops the embedded worker.
    raise SystemExit(128 + signum)


class _WorkerSupervisor:
    """Keeps one embedded worker process alive while the API runs."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="worker-supervisor", daemon=True).start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worker"], preexec_fn=_embedded_worker_child
            )
            code = self.process.wait()
            if self.stopping.is_set():
                return
            log.warning("embedded worker exited with %s; restarting", code)
            if self.stopping.wait(1):
                return

    def stop(self) -> None:
        self.stopping.set()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _metrics_dir(settings: Settings) -> Path:
    """A fresh folder for the Prometheus samples of this server's processes (its API processes
    and embedded worker inherit ``PROMETHEUS_MULTIPROC_DIR``), emptied of an earlier run's.
    Set before ``prometheus_client`` is imported anywhere here: it picks its storage then."""
    import shutil

    variable = "PROMETHEUS_MULTIPROC_DIR"
    folder = Path(os.environ.get(variable) or settings.data_dir / "prometheus").resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[variable] = str(folder)
    return folder


def serve(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Run an embedded worker."),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        envvar="PPML_API_WORKERS",
        help="API processes (uvicorn workers) sharing the port; one per core is typical.",
    ),
) -> None:
    """Run the API (and, by default, an embedded training worker)."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    metrics_dir = _metrics_dir(settings)  # before anything imports prometheus_client
    import uvicorn

    from ppml.db.migrate import upgrade
    from ppml.telemetry import configure_logging, logging_config

    configure_logging(settings.log_format)
    url = settings.resolved_database_url
    upgrade(url)
    repaired = _verify_ledger(url, repair=True)
    if repaired:
        log.error("ledger cache rebuilt from entries for datasets %s", repaired)
    chains = _check_chains(settings)
    for line in chains.problems():
        log.error("%s", line)
    for line in chains.warnings():
        log.warning("%s", line)
    key_source = "PPML_ENCRYPTION_KEY" if settings.encryption_key else None
    # Also makes the local data key before any other process could race for it.
    sealed = _seal_secrets(settings)
    if sealed:
        log.info("sealed %d datasets' split secrets under the active data key", sealed)
    key_source = key_source or str((settings.data_dir / "encryption_key").resolve())
    token_source = "PPML_ADMIN_TOKEN" if settings.admin_token else None
    settings.ensure_admin_token()
    if token_source is None:
        token_source = str((settings.data_dir / "admin_token").resolve())
        # The worker and uvicorn read settings from the environment; keep them consistent.
        os.environ["PPML_ADMIN_TOKEN"] = settings.ensure_admin_token()
    typer.echo(
        f"ppml API on http://{host}:{port}  (docs: http://{host}:{port}/docs), "
        f"{workers} API process{'es' if workers > 1 else ''}"
    )
    typer.echo(f"admin token: {token_source}")
    typer.echo(
        f"data key: {key_source} (back it up apart from the data: without it, nothing "
        "sealed can be read)"
    )
    # The receipts' signing key: generated on first start, shared with the workers.
    from ppml.trust.keys import SigningKeys

    keyring = SigningKeys.for_settings(settings)
    signing = keyring.active()
    typer.echo(f"signing key: {signing['key_id']} in {keyring}")
    typer.echo(f"database: {url}\nbroker: {settings.resolved_broker_url}")
    typer.echo(f"metrics: /metrics with the admin token (every process's, via {metrics_dir})")
    supervisor = _WorkerSupervisor()
    signal.signal(signal.SIGTERM, _exit_on_term)
    if worker:
        supervisor.start()
    try:
        # Each API process has its own pool and caches; the budget lock is in the database,
        # so admissions stay serialised across processes. The embedded worker stays one.
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="info",
            log_config=logging_config(settings.log_format),
        )
    finally:
        supervisor.stop()


def worker_command(
    concurrency: int = typer.Option(1, help="Jobs run at once (one per GPU is typical)."),
) -> None:
    """Run a training worker alone (production)."""
    os.execv(
        sys.executable,
        [sys.executable, "-m", "worker", "--concurrency", str(concurrency)],
    )
