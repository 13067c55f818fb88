"""``ppml datasets``: register, upload and list datasets, and show their privacy budgets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

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
from ppml.client import DEFAULT_URL

datasets_app = typer.Typer(help="Datasets and their privacy budgets.", no_args_is_help=True)


def _budget(epsilon: float | None, delta: float | None, public: bool) -> tuple[float, float] | None:
    if public:
        if epsilon is not None or delta is not None:
            fail("--public data has no budget: drop --epsilon and --delta")
        return None
    if epsilon is None or delta is None:
        fail("give the privacy budget (--epsilon and --delta), or --public for data without one")
    return epsilon, delta


Epsilon = Annotated[float | None, typer.Option(help="Total ε of the dataset's budget.")]
Delta = Annotated[float | None, typer.Option(help="Total δ (well below 1/n).")]
Public = Annotated[bool, typer.Option("--public", help="Public data: no privacy budget.")]
Unit = Annotated[str, typer.Option(help="Privacy unit: record or client.")]
Validation = Annotated[
    str | None,
    typer.Option(
        "--validation-dataset",
        help="A public dataset (same features and classes) to score jobs on exactly.",
    ),
]
Classes = Annotated[
    str | None,
    typer.Option(
        help="The declared label set, comma-separated (a,b,c); class i is the i-th name. "
        "Required with a budget (or give --schema)."
    ),
]
Schema = Annotated[
    str | None, typer.Option(help='The declared schema as JSON: {"classes": ["a", "b"]}.')
]


def _schema(classes: str | None, schema: str | None) -> dict[str, Any] | None:
    if classes is not None and schema is not None:
        fail("give --classes or --schema, not both")
    if classes is not None:
        return {"classes": [name.strip() for name in classes.split(",")]}
    if schema is None:
        return None
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError:
        fail('--schema must be JSON, e.g. {"classes": ["a", "b"]}')
    if not isinstance(parsed, dict):
        fail('--schema must be a JSON object, e.g. {"classes": ["a", "b"]}')
    return parsed


def _dataset_line(dataset: dict[str, Any]) -> str:
    budget = dataset.get("privacy_budget")
    privacy = f"ε={budget['epsilon']:g}, δ={budget['delta']:g}" if budget else "public"
    if dataset.get("status", "ready") != "ready":
        return f"dataset {dataset['id']} {dataset['name']!r}: {dataset['status']}; {privacy}"
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
    validation_dataset: Validation = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Register a built-in dataset with its privacy budget (its classes are fixed)."""
    budget = _budget(epsilon, delta, public)
    with api_client(url, api_key=api_key) as client:
        dataset = client.create_dataset(
            name,
            builtin=builtin,
            budget=budget,
            privacy_unit=privacy_unit,
            validation_dataset_id=validation_dataset,
        )
    created(dataset, dataset["id"], _dataset_line(dataset), as_json)


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
    classes: Classes = None,
    schema: Schema = None,
    validation_dataset: Validation = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="Wait until the server has validated the file (else print it validating).",
        ),
    ] = True,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Upload a CSV, Parquet or NPZ file as a dataset with its privacy budget.

    Budgeted data declares its label set (--classes): the released classes are the
    declared ones, and a row with an undeclared label is refused. The server validates the
    file after storing it; by default the command waits for that, and fails (exit 1) with
    the reason if the file is invalid.
    """
    budget = _budget(epsilon, delta, public)
    declared = _schema(classes, schema)
    if budget is not None and declared is None:
        fail("data with a budget must declare its classes: --classes a,b (or --schema JSON)")
    with api_client(url, api_key=api_key) as client:
        dataset = client.upload_dataset(
            file,
            name=name,
            target=target,
            budget=budget,
            client_column=client_column,
            privacy_unit=privacy_unit,
            schema=declared,
            validation_dataset_id=validation_dataset,
            wait=wait,
        )
    created(dataset, dataset["id"], _dataset_line(dataset), as_json)


@datasets_app.command("list")
def datasets_list(
    url: Url = DEFAULT_URL, api_key: ApiKey = None, limit: Limit = 50, as_json: AsJson = False
) -> None:
    """List your datasets, newest first."""
    with api_client(url, api_key=api_key) as client:
        items = client.list_datasets(limit=limit)
    if as_json:
        print_json(items)
        return
    rows = []
    for d in items:
        budget = d.get("privacy_budget") or {}
        rows.append(
            [
                d["id"],
                d["name"],
                d.get("status", "ready"),
                fmt(d["num_features"]),
                fmt(d["num_classes"]),
                f"{fmt(d['num_train'])}/{fmt(d['num_test'])}",
                fmt(budget.get("epsilon")),
                fmt(budget.get("delta")),
                d["created_at"][:16].replace("T", " "),
            ]
        )
    columns = ["id", "name", "status", "features", "classes", "train/test", "ε", "δ", "created"]
    table("datasets", columns, rows)


@datasets_app.command("get")
def datasets_get(
    dataset_id: Annotated[str, typer.Argument(help="The dataset's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Print a dataset (status, counts, classes, budget) as JSON."""
    with api_client(url, api_key=api_key) as client:
        print_json(client.get_dataset(dataset_id))


@datasets_app.command("ledger")
def datasets_ledger(
    dataset_id: Annotated[str, typer.Argument(help="The dataset's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    limit: Limit = 200,
    as_json: AsJson = False,
) -> None:
    """The dataset's ledger, oldest first: each job's reserve, commit and release entries."""
    with api_client(url, api_key=api_key) as client:
        items = client.ledger(dataset_id, limit=limit)
    if as_json:
        print_json(items)
        return
    rows = [
        [
            str(e["seq"]),
            e["job_id"],
            e["kind"],
            fmt(e["epsilon"]),
            e.get("note") or "",
            e["created_at"][:19].replace("T", " "),
        ]
        for e in items
    ]
    table(f"ledger of {dataset_id}", ["seq", "job", "kind", "ε", "note", "at"], rows)


@datasets_app.command("delete")
def datasets_delete(
    dataset_id: Annotated[str, typer.Argument(help="The dataset's id.")],
    delete_models: Annotated[
        bool, typer.Option("--delete-models", help="Delete its jobs' model files too.")
    ] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Delete a dataset's files (owner keys); its budget, ledger and audit trail stay, and
    the same rows cannot be registered again with a new budget."""
    with api_client(url, api_key=api_key) as client:
        client.delete_dataset(dataset_id, delete_models=delete_models)
    err().print(f"dataset {dataset_id} deleted" + (" with its models" if delete_models else ""))


@datasets_app.command("budget")
def datasets_budget(
    dataset_id: Annotated[str, typer.Argument(help="The dataset's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Spent, reserved and remaining ε of a dataset (composed across jobs by RDP)."""
    with api_client(url, api_key=api_key) as client:
        budget = client.dataset_budget(dataset_id)
    if as_json:
        print_json(budget)
        return
    keys = ["epsilon_total", "delta_total", "epsilon_spent", "epsilon_reserved"]
    keys += ["epsilon_remaining", "epsilon_spent_composed", "accounting", "admission"]
    keys += ["admission_filter", "filter_anchor_order", "privacy_unit"]
    table(f"budget of {dataset_id}", ["", "value"], [[k, fmt(budget.get(k))] for k in keys])
