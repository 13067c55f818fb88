"""The ``ppml`` command: ``serve``, ``worker`` and ``db`` administration, and a client.

The core does not import the ``api`` or ``worker`` adapters: ``serve`` hands uvicorn the app
factory by name and starts the worker as its own process (``python -m worker``), the same way
the API enqueues tasks by name.

The client commands (``datasets``, ``jobs``, ``models``, ``receipts``, ``tenants``, ``keys``)
talk to the HTTP API only (``--url``/``PPML_URL``, ``--api-key``/``PPML_API_KEY``,
``PPML_ADMIN_TOKEN``), never to the database (through ``ppml.client``); ``receipts verify``
reads local files only, and ``receipts rotate-key`` is for operators, on the data dir.
Server modules are imported inside the server commands, so the client starts fast.

Where things live: ``server`` (serve, worker, db), ``node`` (a federation's data-owner
node: ``ppml.node``), ``datasets``, ``jobs`` (``follow``: the
live bar over the event stream), ``models``, ``receipts`` (fetch, verify offline, rotate the
signing key), ``admin`` (tenants, keys), and ``common`` (shared options, the API client,
printing).
"""

from __future__ import annotations

import typer

from ppml.cli.admin import keys_app, tenants_app
from ppml.cli.datasets import datasets_app
from ppml.cli.jobs import jobs_app
from ppml.cli.models import models_app
from ppml.cli.node import node_app
from ppml.cli.receipts import receipts_app
from ppml.cli.server import db_app, serve, worker_command

__all__ = ["app"]

app = typer.Typer(help="ppml: privacy-preserving training as a service.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.command()(serve)
app.command("worker")(worker_command)
for _name, _sub in (
    ("datasets", datasets_app),
    ("jobs", jobs_app),
    ("models", models_app),
    ("receipts", receipts_app),
    ("tenants", tenants_app),
    ("keys", keys_app),
    ("node", node_app),
):
    app.add_typer(_sub, name=_name)
