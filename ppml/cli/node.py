"""``ppml node run``: a remote data-owner node of a federation (docs: ppml/node/).

The node reads its data file locally and never sends it: it connects out to the server,
reports only whether its data matches the federation's schema and its row count, keeps its
own privacy ledger in ``--data-dir``, and trains the rounds it is given.

Exit codes: 0 after a test limit (``--max-idle-polls``, ``--max-tasks``), 2 when the node
cannot run (schema mismatch, enrolment or credential refused, budget options invalid).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ppml.cli.common import err

__all__ = ["node_app"]

node_app = typer.Typer(help="Run a remote data-owner node of a federation.", no_args_is_help=True)


@node_app.command("run")
def run(
    server: Annotated[str, typer.Option("--server", envvar="PPML_SERVER", help="Base URL.")],
    data: Annotated[
        Path, typer.Option("--data", help="The local data file (CSV, Parquet or NPZ).")
    ],
    target: Annotated[str, typer.Option("--target", help="The label column (CSV, Parquet).")],
    epsilon: Annotated[
        float | None,
        typer.Option("--epsilon", help="This node's total ε (required at the first start)."),
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option("--delta", help="This node's total δ, below 1/rows (first start)."),
    ] = None,
    enrol: Annotated[
        str | None,
        typer.Option(
            "--enrol",
            envvar="PPML_ENROL_TOKEN",
            help="The enrolment token (ppml_enrol_…), needed once.",
            show_default=False,
        ),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option("--data-dir", help="node.json (credential) and ledger.sqlite.")
    ] = Path(".ppml-node"),
    name: Annotated[str, typer.Option("--name", help="A name for the local ledger.")] = "node",
    max_idle_polls: Annotated[
        int | None,
        typer.Option(
            "--max-idle-polls",
            min=1,
            help="Exit after this many empty polls in a row (tests).",
            show_default=False,
        ),
    ] = None,
    max_tasks: Annotated[
        int | None,
        typer.Option(
            "--max-tasks", min=1, help="Exit after this many tasks (tests).", show_default=False
        ),
    ] = None,
    poll_wait: Annotated[
        int, typer.Option("--poll-wait", min=0, max=25, help="Long-poll wait, seconds.")
    ] = 25,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="Torch threads for local training (1 suits small models and nodes that "
            "share a machine; raise it for large models on a machine of the node's own).",
        ),
    ] = 1,
) -> None:
    """Enrol (once, with --enrol) or come back, then train the federation's rounds."""
    from ppml.node.ledger import prepare_accounting
    from ppml.node.runner import NodeError, NodeOptions, NodeRunner
    from ppml.node.train import prepare_torch

    # force: importing opacus (under ppml.node.runner) already configured the root logger at
    # WARNING, which would hide the node's record of its rounds and of what it sent
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    for chatty in ("httpx", "alembic"):  # every request is logged by the node itself
        logging.getLogger(chatty).setLevel(logging.WARNING)
    options = NodeOptions(
        server=server,
        data=data,
        target=target,
        data_dir=data_dir,
        epsilon=epsilon,
        delta=delta,
        name=name,
        enrol=enrol,
        max_idle_polls=max_idle_polls,
        max_tasks=max_tasks,
        poll_wait_s=poll_wait,
    )
    prepare_torch(threads)  # before polling, what a first round would otherwise pay for
    prepare_accounting()
    runner = NodeRunner(options)
    try:
        runner.start()
        assert runner.config is not None and runner.data is not None
        err().print(
            f"node {runner.config.node_id} of federation {runner.config.federation_id}: "
            f"{runner.data.check.message}; polling {server}"
        )
        handled = runner.run()
        err().print(f"stopped after {handled} task(s)")
    except NodeError as exc:
        err().print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        runner.close()
