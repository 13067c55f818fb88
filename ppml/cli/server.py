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

import typer

from ppml.config import get_settings

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
    typer.echo(
        f"ppml API on http://{host}:{port}  (docs: http://{host}:{port}/docs), "
        f"{workers} API process{'es' if workers > 1 else ''}"
    )
    typer.echo(f"admin token: {token_source}")
    typer.echo(f"database: {url}\nbroker: {settings.resolved_broker_url}")
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
