"""``ppml models``: download trained models and print their cards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ppml.cli.common import ApiKey, Url, api_client, err, fail, print_json
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
