"""The service's Ed25519 signing keys: one active key signs, retired keys stay to verify.

Keys live in one folder (``Settings.signing_keys_dir``, by default ``<data dir>/keys``): one
private key per file (``<key id>.pem``, mode 0600) and ``keys.json``, the public record of
every key with its validity (``created_at``, ``retired_at``). The embedded default generates
the first key on first use; production mounts the folder (a secret volume shared by the API
processes and the workers). :meth:`SigningKeys.rotate` makes a new active key and retires the
old one, whose signatures still verify: a signature is valid when its key existed and was not
yet retired at the time the signed payload states.

Verification needs only the public record (:func:`verify`), so a receipt can be checked
offline with the keys served at ``/.well-known/ppml-signing-keys.json``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ppml.db.models import new_id, utcnow

__all__ = ["ALGORITHM", "Signature", "SigningKeys", "canonical", "verify"]

ALGORITHM = "Ed25519"
_INDEX = "keys.json"


def canonical(document: Any) -> bytes:
    """The bytes a signature covers: JSON with sorted keys and no insignificant spaces."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


@dataclass(frozen=True)
class Signature:
    key_id: str
    value: str  # base64 of the 64 signature bytes

    def as_dict(self) -> dict[str, str]:
        return {"algorithm": ALGORITHM, "key_id": self.key_id, "value": self.value}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def verify(
    public_keys: Sequence[Mapping[str, Any]],
    payload: bytes,
    signature: Mapping[str, Any],
    *,
    signed_at: datetime | None = None,
) -> str | None:
    """Why ``signature`` does not hold for ``payload`` under ``public_keys`` (the
    ``keys`` of the public record), or None when it holds. With ``signed_at``, the key must
    have been valid then: created before it, and not retired before it."""
    if signature.get("algorithm") != ALGORITHM:
        return f"unknown signature algorithm {signature.get('algorithm')!r}"
    key = next((k for k in public_keys if k.get("key_id") == signature.get("key_id")), None)
    if key is None:
        return f"unknown signing key {signature.get('key_id')!r}"
    if signed_at is not None:
        created, retired = _when(key.get("created_at")), _when(key.get("retired_at"))
        if created is not None and signed_at < created:
            return f"key {key['key_id']} did not exist at {signed_at.isoformat()}"
        if retired is not None and signed_at > retired:
            return f"key {key['key_id']} was retired at {retired.isoformat()}"
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
        public.verify(base64.b64decode(str(signature.get("value", ""))), payload)
    except (InvalidSignature, ValueError, KeyError):
        return "the signature does not match"
    return None


class SigningKeys:
    """The keyring in one folder. Safe across processes: changes happen under a file lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> list[dict[str, Any]]:
        index = self.folder / _INDEX
        if not index.exists():
            return []
        keys: list[dict[str, Any]] = json.loads(index.read_text())["keys"]
        return keys

    def _write(self, keys: list[dict[str, Any]]) -> None:
        staged = self.folder / f".{_INDEX}.tmp"
        staged.write_text(json.dumps({"keys": keys}, indent=2, sort_keys=True))
        os.replace(staged, self.folder / _INDEX)

    def _new_key(self) -> dict[str, Any]:
        private = Ed25519PrivateKey.generate()
        key_id = new_id("sk")
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = self.folder / f"{key_id}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {
            "key_id": key_id,
            "algorithm": ALGORITHM,
            "public_key": _b64(public),
            "created_at": utcnow().isoformat(),
            "retired_at": None,
        }

    def public_keys(self) -> list[dict[str, Any]]:
        """Every key's public record (the active one last), creating the first if none."""
        keys = self._read()
        if keys:
            return keys
        with self._locked():
            keys = self._read()
            if not keys:
                keys = [self._new_key()]
                self._write(keys)
        return keys

    def active(self) -> dict[str, Any]:
        return next(k for k in reversed(self.public_keys()) if k["retired_at"] is None)

    def sign(self, payload: bytes) -> Signature:
        """Sign with the active key."""
        key = self.active()
        pem = (self.folder / f"{key['key_id']}.pem").read_bytes()
        private = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(private, Ed25519PrivateKey)
        return Signature(key_id=key["key_id"], value=_b64(private.sign(payload)))

    def rotate(self) -> dict[str, Any]:
        """A new active key; the old active key is retired now (it keeps verifying what it
        signed before)."""
        self.public_keys()
        with self._locked():
            keys = self._read()
            now = utcnow().isoformat()
            for key in keys:
                if key["retired_at"] is None:
                    key["retired_at"] = now
            new = self._new_key()
            self._write([*keys, new])
        return new
