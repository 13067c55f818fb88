"""``ppml receipts``: fetch a model's signed receipt and the service's public keys, verify a
downloaded model offline, and rotate the signing key (operators).

``verify`` reads three local files and nothing else: no network, no database.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from ppml.cli.common import ApiKey, Url, api_client, err, fail, fmt
from ppml.client import DEFAULT_URL

if TYPE_CHECKING:
    from ppml.trust.receipts import ReceiptCheck

receipts_app = typer.Typer(
    help="Signed receipts of released models: fetch, verify offline, rotate the signing key.",
    no_args_is_help=True,
)

KEYS_FILE = "ppml-signing-keys.json"


@receipts_app.command("get")
def receipts_get(
    job_id: Annotated[str, typer.Argument(help="The job whose model's receipt to fetch.")],
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Where to write it (default JOB.receipt.json)."),
    ] = None,
    keys_output: Annotated[
        Path, typer.Option("--keys-output", help="Where to write the service's public keys.")
    ] = Path(KEYS_FILE),
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Save a model's signed receipt and the service's public keys, byte for byte."""
    destination = output or Path(f"{job_id}.receipt.json")
    with api_client(url, api_key=api_key) as client:
        receipt = client.receipt(job_id)
        keys = client.signing_keys()
    destination.write_bytes(receipt)
    keys_output.write_bytes(keys)
    err().print(f"saved {destination} (receipt) and {keys_output} (public keys)")
    typer.echo(str(destination))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        fail(f"cannot read the {what} {path}: {exc.strerror or exc}")


def _statements(document: dict[str, Any]) -> list[str]:
    """What a verified receipt states, one line each."""
    dataset = document.get("dataset") or {}
    ledger = document.get("ledger") or {}
    head = ledger.get("chain_head") or {}
    lines = [
        f"job {document.get('job_id')}, issued {document.get('issued_at')}",
        f"dataset {dataset.get('id')}, content fingerprint {fmt(dataset.get('fingerprint'))}",
    ]
    privacy = document.get("privacy")
    if privacy is None:
        lines.append("no differential privacy: a model of public data, charged nothing")
    else:
        lines.append(
            f"ε = {fmt(privacy.get('epsilon'))} at δ = {fmt(privacy.get('delta'))} "
            f"({privacy.get('accountant')}, one {privacy.get('unit')} protected)"
        )
        for mechanism in privacy.get("mechanisms") or []:
            lines.append(
                f"  {mechanism.get('name')}: {mechanism.get('mechanism')}, "
                f"σ = {fmt(mechanism.get('noise_multiplier'))}, "
                f"ε alone = {fmt(mechanism.get('epsilon'))}"
            )
    for entry in ledger.get("entries") or []:
        lines.append(f"ledger {entry.get('kind')} {entry.get('id')}: ε {fmt(entry.get('epsilon'))}")
    lines.append(
        f"ledger chain head at release: {fmt(head.get('entry_id'))} "
        f"(hash {fmt(head.get('entry_hash'))})"
    )
    return lines


def _report(result: ReceiptCheck) -> None:
    console = err()
    for check in result.checks:
        mark = "[green]ok[/green]    " if check.ok else "[red]FAILED[/red]"
        console.print(f"{mark} {check.name}: {escape(check.detail)}")


@receipts_app.command("verify")
def receipts_verify(
    model: Annotated[Path, typer.Argument(help="The downloaded model file.")],
    receipt: Annotated[
        Path, typer.Option("--receipt", help="Its receipt, from `ppml receipts get`.")
    ],
    keys: Annotated[
        Path, typer.Option("--keys", help="The public keys, from `ppml receipts get`.")
    ],
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="safetensors or onnx (default: told by the file's suffix).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check a downloaded model against its signed receipt, offline.

    Checks the receipt file's form, its signature, the signing key's validity when the
    receipt was issued, and the model file's sha256; exits 1 on any failure.
    """
    from ppml.trust.receipts import check_receipt

    if format not in (None, "safetensors", "onnx"):
        fail("--format must be safetensors or onnx")
    result = check_receipt(model, _read(receipt, "receipt"), _read(keys, "keys file"), fmt=format)
    _report(result)
    if not result.ok:
        failed = next((c for c in result.checks if not c.ok), None)
        fail(f"the receipt does not verify: {failed.detail if failed else 'nothing checked'}")
    assert result.document is not None
    for line in _statements(result.document):
        typer.echo(line)
    err().print(f"[green]verified[/green]: {escape(str(model))} is the model this receipt binds")


@receipts_app.command("rotate-key")
def receipts_rotate_key() -> None:
    """Operators: make a new active signing key in the service's keyring (the data dir's, or
    the object store's with PPML_STORAGE_URL).

    The old key is retired now and keeps verifying the receipts it signed before; every API
    process and worker sharing the keyring signs with the new key from its next receipt.
    """
    from ppml.config import get_settings
    from ppml.trust.keys import SigningKeys

    keys = SigningKeys.for_settings(get_settings())
    new = keys.rotate()
    err().print(f"new active signing key {new['key_id']} in {keys}")
    typer.echo(new["key_id"])
