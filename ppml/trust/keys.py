"""The service's Ed25519 signing keys: one active key signs, retired keys stay to verify.

Keys live in one folder (``Settings.signing_keys_dir``, by default ``<data dir>/keys``): one
private key per file (``<key id>.pem``, mode 0600) and ``keys.json``, the public record of
every key with its validity (``created_at``, ``retired_at``). The embedded default generates
the first key on first use. With an object store (``PPML_STORAGE_URL``), API processes and
workers on other machines share :class:`StoredSigningKeys` instead: the whole keyring is one
document, ``keys/signing.json``, sealed with the data key (docs/storage.md says why).
:meth:`SigningKeys.rotate` makes a new active key and retires the
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
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from ppml.db.models import new_id, utcnow

if TYPE_CHECKING:
    from ppml.config import Settings
    from ppml.storage import ArtifactStore

__all__ = ["ALGORITHM", "Signature", "SigningKeys", "StoredSigningKeys", "canonical", "verify"]

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
        # (key id, public key) → the parsed private key: a key's private part never changes,
        # so each signature need not read and parse its PEM again (which key is active is
        # still read every time, so a rotation by another process is seen at once)
        self._parsed: dict[tuple[str, str], Ed25519PrivateKey] = {}
        # (identity of keys.json, its keys) as last read
        self._index: tuple[tuple[int, ...], list[dict[str, Any]]] | None = None

    @classmethod
    def for_settings(cls, settings: Settings, store: ArtifactStore | None = None) -> SigningKeys:
        """The service's keyring: in the object store when one is configured (shared by
        processes on other machines; ``store``: the process's store for the settings, if it
        has one already), else in ``settings.signing_keys_dir``."""
        if settings.storage_url:
            from ppml.storage import ArtifactStore

            return StoredSigningKeys(store or ArtifactStore.for_settings(settings))
        return cls(settings.signing_keys_dir)

    def __str__(self) -> str:
        """Where the keyring lives (for operators' messages)."""
        return str(self.folder)

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
        try:
            stat = os.stat(index)
        except FileNotFoundError:
            return []
        # keys.json is only ever replaced (os.replace: a new inode), so a file with the same
        # identity as the last one read holds the same keys
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
        if self._index is None or self._index[0] != identity:
            self._index = (identity, json.loads(index.read_text())["keys"])
        return [dict(key) for key in self._index[1]]  # copies: callers may change them

    def _write(self, keys: list[dict[str, Any]]) -> None:
        staged = self.folder / f".{_INDEX}.tmp"
        staged.write_text(json.dumps({"keys": keys}, indent=2, sort_keys=True))
        os.replace(staged, self.folder / _INDEX)

    def _new_key(self) -> dict[str, Any]:
        record, pem = _generate()
        path = self.folder / f"{record['key_id']}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return record

    def _private_pem(self, key_id: str) -> bytes:
        return (self.folder / f"{key_id}.pem").read_bytes()

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
        return Signature(key_id=key["key_id"], value=_b64(self._private(key).sign(payload)))

    def _private(self, key: Mapping[str, Any]) -> Ed25519PrivateKey:
        """The private key of the public record ``key``, parsed once per process."""
        cache_key = (str(key["key_id"]), str(key["public_key"]))
        private = self._parsed.get(cache_key)
        if private is None:
            loaded = serialization.load_pem_private_key(self._private_pem(cache_key[0]), None)
            assert isinstance(loaded, Ed25519PrivateKey)
            private = self._parsed[cache_key] = loaded
        return private

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


def _generate() -> tuple[dict[str, Any], bytes]:
    """A new key's public record (valid from now) and its private key as PEM."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    record = {
        "key_id": new_id("sk"),
        "algorithm": ALGORITHM,
        "public_key": _b64(public),
        "created_at": utcnow().isoformat(),
        "retired_at": None,
    }
    return record, pem


class StoredSigningKeys(SigningKeys):
    """The keyring as one sealed document in the artefact store, shared by every process
    that uses the store: ``{"keys": [public records], "private": {key id: PEM}}``.

    The first key is created with a conditional write (create-if-absent), so of processes
    starting together one keyring wins and every process signs with it. Only parsed private
    keys are cached (they never change): each signature reads the current document to find
    the active key, so a rotation reaches every process at once.
    """

    KEY = "keys/signing.json"

    def __init__(self, store: ArtifactStore) -> None:
        """Raises ValueError if ``store`` would not seal the keyring (it has no data key)."""
        if not store.seals(self.KEY):
            raise ValueError("a stored keyring needs a store with the data key, to seal it")
        self.store = store
        self._parsed = {}

    def __str__(self) -> str:
        return f"{self.KEY} of {self.store!r}"

    def _document(self) -> dict[str, Any] | None:
        try:
            with self.store.open_plain(self.KEY) as path:
                document: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        return document

    def _read(self) -> list[dict[str, Any]]:
        document = self._document()
        return [] if document is None else list(document["keys"])

    def _private_pem(self, key_id: str) -> bytes:
        document = self._document()
        if document is None or key_id not in document["private"]:
            raise KeyError(f"signing key {key_id} is not in the stored keyring")
        return str(document["private"][key_id]).encode()

    def _store(self, document: dict[str, Any], *, create: bool) -> bool:
        with self.store.staging(".json") as staged:
            staged.write_text(json.dumps(document, sort_keys=True))
            if create:
                return self.store.create(staged, self.KEY) is not None
            self.store.publish(staged, self.KEY)
            return True

    def public_keys(self) -> list[dict[str, Any]]:
        keys = self._read()
        if keys:
            return keys
        record, pem = _generate()
        self._store({"keys": [record], "private": {record["key_id"]: pem.decode()}}, create=True)
        return self._read()  # ours, or the keyring of the process that created it first

    def rotate(self) -> dict[str, Any]:
        """As :meth:`SigningKeys.rotate`. The store has no lock: rotate from one place at a
        time (an operator's command), or one of two concurrent new keys is lost."""
        self.public_keys()
        document = self._document()
        assert document is not None
        now = utcnow().isoformat()
        for key in document["keys"]:
            if key["retired_at"] is None:
                key["retired_at"] = now
        new, pem = _generate()
        document["keys"].append(new)
        document["private"][new["key_id"]] = pem.decode()
        self._store(document, create=False)
        return new
