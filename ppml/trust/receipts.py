"""Signed receipts: made when a model is released, checked offline by whoever downloads it.

A receipt file is one canonical JSON object (:func:`ppml.trust.keys.canonical`)::

    {"receipt": {...the signed document...},
     "signature": {"algorithm": "Ed25519", "key_id": "sk_...", "value": "<base64>"}}

The signature covers ``canonical(receipt)``. The document states its own ``format`` and
``issued_at``; what it binds (the artefacts' digests, the dataset, the mechanisms and their
ε, the ledger entries and the ledger's chain head) is assembled by ``ppml.jobs.receipts``.

:func:`check_receipt` needs only the receipt file, the public keys
(``/.well-known/ppml-signing-keys.json``) and the model file: no network, no database.
Because the file is canonical JSON, a verifier also refuses a receipt whose bytes differ from
what the service issued in a way the signature alone would not see (spaces, key order).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ppml.db.models import utcnow
from ppml.trust.keys import SigningKeys, canonical, verify
from ppml.trust.records import SignatureRecord, SignedReceipt

__all__ = [
    "RECEIPT_FORMAT",
    "Check",
    "ReceiptCheck",
    "ReceiptSigningError",
    "check_receipt",
    "receipt_file",
    "sign_receipt",
]

RECEIPT_FORMAT = "ppml-receipt-v1"
_MODEL_SUFFIXES = {".safetensors": "safetensors", ".onnx": "onnx"}


class ReceiptSigningError(RuntimeError):
    """The keyring made a signature its own public record does not accept: an operator's
    problem (a damaged key folder, clocks far apart), never a user's."""


def sign_receipt(keys: SigningKeys, body: Mapping[str, Any], *, attempts: int = 3) -> SignedReceipt:
    """``body`` stamped with its format and issue time, signed with the active key.

    The signature is verified against the keyring's public record before it is handed out,
    at the issue time it states: a rotation between the stamp and the signature (the new
    key is younger than the stamp) is stamped and signed again.

    Raises:
        ReceiptSigningError: No attempt made a signature that verifies.
    """
    problem = "no attempt"
    for _ in range(attempts):
        issued = utcnow()
        payload = canonical({**body, "format": RECEIPT_FORMAT, "issued_at": issued.isoformat()})
        signature = keys.sign(payload).as_dict()
        found = verify(keys.public_keys(), payload, signature, signed_at=issued)
        if found is None:
            return SignedReceipt(payload=payload.decode(), signature=SignatureRecord(**signature))
        problem = found
    raise ReceiptSigningError(f"the receipt's signature does not verify: {problem}")


def receipt_file(signed: SignedReceipt) -> bytes:
    """The receipt file users download, exactly as a verifier expects it (canonical JSON)."""
    return canonical({"receipt": signed.document(), "signature": signed.signature.model_dump()})


@dataclass(frozen=True)
class Check:
    """One check of a receipt: its name, whether it held, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass
class ReceiptCheck:
    """Every check made, in order, and the receipt document (when the file could be read)."""

    checks: list[Check] = field(default_factory=list)
    document: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def add(self, name: str, problem: str | None, detail: str) -> None:
        """Record a check: ``problem`` is why it failed (None: it held, as ``detail`` says)."""
        self.checks.append(Check(name, problem is None, detail if problem is None else problem))


def _receipt_parts(raw: bytes, result: ReceiptCheck) -> tuple[dict[str, Any], dict[str, Any]]:
    """The document and signature of a receipt file (empty when unreadable), and whether the
    file is exactly the canonical form the service issues."""
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        result.add("receipt file", f"the receipt is not JSON: {exc}", "")
        return {}, {}
    document = parsed.get("receipt") if isinstance(parsed, dict) else None
    signature = parsed.get("signature") if isinstance(parsed, dict) else None
    if not isinstance(document, dict) or not isinstance(signature, dict):
        result.add("receipt file", "the file has no 'receipt' and 'signature' objects", "")
        return {}, {}
    try:
        exact = canonical(parsed) == raw
    except ValueError:  # NaN or Infinity: never in a receipt the service issued
        exact = False
    form = document.get("format")
    problem = None
    if form != RECEIPT_FORMAT:
        problem = f"unknown receipt format {form!r} (this verifier reads {RECEIPT_FORMAT})"
    elif not exact:
        problem = (
            "the receipt file is not byte for byte what the service issued (canonical JSON): "
            "it was edited or re-serialised"
        )
    result.add("receipt file", problem, f"{RECEIPT_FORMAT}, canonical JSON, {len(raw)} bytes")
    return document, signature


def _public_keys(raw: bytes, result: ReceiptCheck) -> list[dict[str, Any]]:
    """The ``keys`` of the service's public record (``{"keys": [...]}``, or the bare list)."""
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        result.add("keys file", f"the keys file is not JSON: {exc}", "")
        return []
    keys = parsed.get("keys") if isinstance(parsed, dict) else parsed
    if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
        result.add("keys file", "the keys file has no list of keys", "")
        return []
    return keys


def _canonical_base64(value: object) -> bool:
    """Whether ``value`` is the one base64 spelling of its bytes (a lenient decoder ignores
    the spare bits of the last character, so two spellings could carry one signature)."""
    if not isinstance(value, str):
        return False
    try:
        return base64.b64encode(base64.b64decode(value, validate=True)).decode() == value
    except (binascii.Error, ValueError):
        return False


def _issued_at(document: Mapping[str, Any]) -> datetime | None:
    try:
        issued = datetime.fromisoformat(str(document.get("issued_at")))
    except ValueError:
        return None
    return issued if issued.tzinfo is not None else None


def _verify(
    keys: Sequence[Mapping[str, Any]],
    payload: bytes,
    signature: Mapping[str, Any],
    signed_at: datetime | None = None,
) -> str | None:
    """:func:`ppml.trust.keys.verify`, with a malformed key record as a reason, not a crash."""
    try:
        return verify(keys, payload, signature, signed_at=signed_at)
    except (TypeError, ValueError, AttributeError) as exc:
        return f"the keys file's record of key {signature.get('key_id')!r} is malformed: {exc}"


def _check_signature(
    keys: Sequence[Mapping[str, Any]],
    document: dict[str, Any],
    signature: dict[str, Any],
    result: ReceiptCheck,
) -> None:
    """The signature over the document, then the key's validity at the stated issue time."""
    key_id = signature.get("key_id")
    try:
        payload = canonical(document)
    except ValueError:  # NaN or Infinity: nothing the service signed
        result.add("signature", "the receipt holds numbers JSON cannot carry (NaN)", "")
        result.add("key validity", "not checked: the signature does not hold", "")
        return
    problem = _verify(keys, payload, signature)
    if problem is None and not _canonical_base64(signature.get("value")):
        problem = "the signature's value is not canonical base64"
    result.add("signature", problem, f"{signature.get('algorithm')} signature by key {key_id}")
    issued = _issued_at(document)
    if problem is not None:
        result.add("key validity", "not checked: the signature does not hold", "")
    elif issued is None:
        result.add("key validity", "the receipt states no valid issued_at time", "")
    else:
        validity = _verify(keys, payload, signature, signed_at=issued)
        result.add("key validity", validity, f"key {key_id} was in service at {issued.isoformat()}")


def _check_digest(
    model: Path, document: Mapping[str, Any], fmt: str | None, result: ReceiptCheck
) -> None:
    artifacts = document.get("artifacts")
    bound = artifacts if isinstance(artifacts, dict) else {}
    try:
        digest = _sha256(model)
    except OSError as exc:
        result.add("digest", f"cannot read the model file: {exc.strerror or exc}", "")
        return
    fmt = fmt or _MODEL_SUFFIXES.get(model.suffix.lower())
    if fmt is None:  # an unknown suffix: the file must be one of the artefacts bound
        fmt = next((f for f, ref in bound.items() if _bound_digest(ref) == digest), None)
        if fmt is None:
            result.add("digest", f"sha256 {digest} is none of the artefacts bound", "")
            return
    expected = _bound_digest(bound.get(fmt))
    if expected is None:
        result.add("digest", f"the receipt binds no {fmt} artefact", "")
        return
    problem = None
    if digest != expected:
        problem = f"the model file's sha256 {digest} is not the {fmt} digest bound ({expected})"
    result.add("digest", problem, f"sha256 {digest} = the {fmt} artefact bound")


def _bound_digest(ref: Any) -> str | None:
    value = ref.get("sha256") if isinstance(ref, dict) else None
    return value if isinstance(value, str) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_receipt(
    model: Path, receipt: bytes, keys: bytes, *, fmt: str | None = None
) -> ReceiptCheck:
    """Check a downloaded model against its receipt, offline.

    Args:
        model: The model file (safetensors or ONNX).
        receipt: The receipt file's bytes, as served at ``/v1/jobs/{id}/receipt``.
        keys: The public keys' file, as served at ``/.well-known/ppml-signing-keys.json``.
        fmt: The model's format; by default told by the file's suffix, else whichever bound
            artefact the file's digest matches.

    Returns:
        Every check made (receipt file, signature, key validity, digest); ``ok`` when all held.
    """
    result = ReceiptCheck()
    document, signature = _receipt_parts(receipt, result)
    public_keys = _public_keys(keys, result)
    if not document or not public_keys:
        return result
    result.document = document
    _check_signature(public_keys, document, signature, result)
    _check_digest(model, document, fmt, result)
    return result
