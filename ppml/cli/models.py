"""``ppml models``: download trained models and print their cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ppml.cli.common import ApiKey, AsJson, Url, api_client, err, fail, print_json, table
from ppml.client import DEFAULT_URL

models_app = typer.Typer(help="Trained models and their privacy receipts.", no_args_is_help=True)


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
        fail("--format must be safetensors or onnx")
    destination = output or Path(f"{job_id}.{format}")
    with api_client(url, api_key=api_key) as client:
        size, digest = client.download_model(job_id, destination, format=format)
    err().print(f"saved {destination} ({size} bytes, sha256 {digest})")
    typer.echo(str(destination))


@models_app.command("card")
def models_card(
    job_id: Annotated[str, typer.Argument(help="The job whose model card to print.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Print a model's card (privacy receipt, held-out metrics, artefact digests) as JSON."""
    with api_client(url, api_key=api_key) as client:
        print_json(client.model_card(job_id))


def _rows(path: Path) -> list[list[float]]:
    """Feature rows from a JSON file (``[[...], ...]`` or ``{"inputs": [[...], ...]}``) or a
    CSV file without a header (one row per line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        try:
            return [[float(v) for v in line.split(",")] for line in text.splitlines() if line]
        except ValueError:
            fail(f"{path}: every CSV cell must be a number (no header row)")
    try:
        parsed: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{path} is not valid JSON: {exc}")
    rows = parsed.get("inputs") if isinstance(parsed, dict) else parsed
    if not isinstance(rows, list):
        fail(f'{path} must hold a list of rows, or {{"inputs": [...]}}')
    return rows


@models_app.command("predict")
def models_predict(
    job_id: Annotated[str, typer.Argument(help="The job whose model predicts.")],
    inputs: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="Rows of features: JSON, or CSV without header."
        ),
    ],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Predict the classes of rows of features with a trained model (one line per row)."""
    rows = _rows(inputs)
    with api_client(url, api_key=api_key) as client:
        answer = client.predict(job_id, rows)
    if as_json:
        print_json(answer)
        return
    probabilities = answer.get("probabilities") or []
    lines = []
    for i, label in enumerate(answer["predictions"]):
        best = max(probabilities[i]) if i < len(probabilities) and probabilities[i] else None
        lines.append([str(i), str(label), "-" if best is None else f"{best:.4f}"])
    table(f"predictions of {job_id}", ["row", "prediction", "probability"], lines)
