"""Secrets at rest: files and values sealed with AES-256-GCM under the service's data key.

The data key comes from the settings (``PPML_ENCRYPTION_KEY``, the base64 of 32 bytes; in
local use one is generated once into ``<data dir>/encryption_key``). Retired keys stay
configured for reading (``PPML_ENCRYPTION_OLD_KEYS``); everything new is sealed under the
active key. A key's id is a hash of the key itself, so a sealed file or value names the
key that opens it without the configuration having to name keys.

**Files** (``seal_stream`` / ``open_stream``) are sealed in chunks of 1 MiB, so a dataset of
hundreds of MB is never held twice in memory. The layout (all integers big-endian)::

    header: b"PPMLSEAL" | version (1) | key id (8) | chunk size (4) | salt (32) | prefix (7)
    chunks: AES-GCM(ciphertext | 16-byte tag), one per chunk, the last one flagged final

Each file has its own AES key, ``HKDF-SHA256(data key, salt)``, and chunk ``i`` the nonce
``prefix | i (4 bytes) | final (1 byte)``: nonces never repeat under one key. Every chunk's
associated data is the header, the *context* (the artefact's key, e.g.
``datasets/ds_1.npz``), the chunk index and the final flag, so a chunk cannot be altered,
moved, dropped or reordered, a file cannot be truncated or extended, and a file moved to
another artefact's name no longer opens.

**Values** (``seal_value`` / ``open_value``), such as a dataset's split secret, become
``v1:<key id>:<base64 of nonce | ciphertext | tag>`` under an AES key derived from the data
key, with the context (e.g. the dataset's id) as associated data.

Losing the data key loses everything sealed under it: back it up apart from the data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

if TYPE_CHECKING:
    from ppml.config import Settings

__all__ = [
    "CHUNK_BYTES",
    "KEY_BYTES",
    "MAGIC",
    "DataKeys",
    "SealError",
    "TamperedData",
    "UnknownKey",
    "decode_key",
    "is_sealed_value",
    "new_data_key",
    "sealed_key_id",
]

MAGIC = b"PPMLSEAL"
KEY_BYTES = 32
CHUNK_BYTES = 1 << 20
_VERSION = 1
_TAG = 16
_ID_BYTES = 8
_SALT = 32
_PREFIX = 7
_HEADER = struct.Struct(f">8sB{_ID_BYTES}sI{_SALT}s{_PREFIX}s")
_MAX_CHUNK = 64 << 20  # what a reader accepts from a header, so no header makes it allocate more
_VALUE_VERSION = "v1"
_VALUE_NONCE = 12


class SealError(RuntimeError):
    """A sealed file or value that cannot be opened."""


class UnknownKey(SealError):
    """Sealed under a key this service was not given."""


class TamperedData(SealError):
    """The authentication failed: altered, truncated, moved to another name, or not sealed."""


def new_data_key() -> str:
    """A fresh data key: 32 random bytes from the OS, as base64."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def decode_key(encoded: str) -> bytes:
    """The 32 bytes of a base64 data key.

    Raises:
        ValueError: If it is not the base64 of exactly 32 bytes.
    """
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an encryption key must be base64 (of 32 random bytes)") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"an encryption key must be the base64 of {KEY_BYTES} bytes")
    return raw


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"ppml-data-key-id-v1\x00" + key).digest()[:_ID_BYTES]


def _hkdf(key: bytes, *, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(key)


def _chunk_data(header: bytes, context: bytes, index: int, final: bool) -> tuple[bytes, bytes]:
    """The nonce suffix and the associated data of chunk ``index``."""
    suffix = struct.pack(">IB", index, final)
    aad = header + struct.pack(">I", len(context)) + context + struct.pack(">QB", index, final)
    return suffix, aad


def is_sealed_value(stored: str) -> bool:
    """Whether a stored value is sealed (``v1:…``) rather than legacy plain text."""
    return stored.startswith(f"{_VALUE_VERSION}:")


def sealed_key_id(head: bytes) -> str | None:
    """The key id (hex) named by a sealed file's first bytes, or None if they are not sealed."""
    if len(head) < _HEADER.size or not head.startswith(MAGIC):
        return None
    key_id: bytes = _HEADER.unpack(head[: _HEADER.size])[2]
    return key_id.hex()


class DataKeys:
    """The active data key, which seals, and the retired ones, which still open.

    Build it with :meth:`from_settings`; the raw keys never leave this object (no repr).
    """

    def __init__(self, active: bytes, retired: Iterable[bytes] = ()) -> None:
        """``retired``: the keys retired by rotations, oldest first."""
        retired = list(retired)
        if any(len(key) != KEY_BYTES for key in (*retired, active)):
            raise ValueError(f"a data key holds {KEY_BYTES} bytes")
        self._active_id = _key_id(active)
        self._keys = {_key_id(key): key for key in (*retired, active)}
        # The service's first key: what derived keys come from, so they outlive rotations.
        self._root = retired[0] if retired else active

    def __repr__(self) -> str:
        return f"DataKeys(active={self.active_id!r}, keys={len(self._keys)})"

    @classmethod
    def from_settings(cls, settings: Settings) -> DataKeys:
        """The keys of the settings (generating the local default key on first use)."""
        active = decode_key(settings.ensure_encryption_key())
        return cls(active, [decode_key(k) for k in settings.old_encryption_keys()])

    @property
    def active_id(self) -> str:
        """The active key's id (hex): what new files and values name."""
        return self._active_id.hex()

    def _key(self, key_id: bytes) -> bytes:
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKey(
                f"sealed under data key {key_id.hex()}, which this service does not have "
                "(set PPML_ENCRYPTION_KEY, or PPML_ENCRYPTION_OLD_KEYS for a retired key)"
            )
        return key

    def derive(self, label: str) -> bytes:
        """A 32-byte key for another use (HKDF, one label per use), from the service's first
        data key: the oldest retired key, else the active one. It stays the same across
        rotations, as long as retired keys are listed oldest first, so what was keyed with it
        (content fingerprints) still matches."""
        return _hkdf(self._root, info=b"ppml-derived-v1\x00" + label.encode())

    # Files ---------------------------------------------------------------------------------

    def seal_stream(self, source: BinaryIO, sink: BinaryIO, *, context: str) -> None:
        """Seal everything ``source`` reads into ``sink`` (chunked; see the module doc)."""
        salt, prefix = os.urandom(_SALT), os.urandom(_PREFIX)
        header = _HEADER.pack(MAGIC, _VERSION, self._active_id, CHUNK_BYTES, salt, prefix)
        aead = AESGCM(_hkdf(self._keys[self._active_id], info=b"ppml-seal-v1 file", salt=salt))
        sink.write(header)
        label, index = context.encode(), 0
        current = source.read(CHUNK_BYTES)
        while True:
            following = source.read(CHUNK_BYTES) if len(current) == CHUNK_BYTES else b""
            final = not following
            suffix, aad = _chunk_data(header, label, index, final)
            sink.write(aead.encrypt(prefix + suffix, current, aad))
            if final:
                return
            current, index = following, index + 1
            if index > 0xFFFFFFFF:
                raise SealError("file too large to seal")

    def open_stream(self, source: BinaryIO, sink: BinaryIO, *, context: str) -> None:
        """Write what ``source`` (a sealed file) holds into ``sink``.

        Raises:
            UnknownKey: Sealed under a key that is not configured.
            TamperedData: Not sealed, altered, truncated, or sealed for another ``context``;
                ``sink`` may then hold a verified prefix of the content: discard it.
        """
        header = source.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise TamperedData("not a sealed file (too short)")
        magic, version, key_id, chunk, salt, prefix = _HEADER.unpack(header)
        if magic != MAGIC:
            raise TamperedData("not a sealed file")
        if version != _VERSION or not 0 < chunk <= _MAX_CHUNK:
            raise TamperedData(f"unsupported sealed file (version {version})")
        aead = AESGCM(_hkdf(self._key(key_id), info=b"ppml-seal-v1 file", salt=salt))
        label, index = context.encode(), 0
        current = source.read(chunk + _TAG)
        while True:
            following = source.read(chunk + _TAG) if len(current) == chunk + _TAG else b""
            final = not following
            suffix, aad = _chunk_data(header, label, index, final)
            try:
                sink.write(aead.decrypt(prefix + suffix, current, aad))
            except InvalidTag:
                raise TamperedData(
                    f"sealed file {context} does not authenticate: altered, truncated, "
                    "or sealed for another name"
                ) from None
            if final:
                return
            current, index = following, index + 1

    # Values --------------------------------------------------------------------------------

    def _value_aead(self, key_id: bytes) -> AESGCM:
        return AESGCM(_hkdf(self._key(key_id), info=b"ppml-seal-v1 value"))

    def seal_value(self, value: str, *, context: str) -> str:
        """``v1:<key id>:<base64>``: ``value`` sealed under the active key, bound to
        ``context`` (for example a dataset's id)."""
        nonce = os.urandom(_VALUE_NONCE)
        sealed = self._value_aead(self._active_id).encrypt(nonce, value.encode(), context.encode())
        body = base64.b64encode(nonce + sealed).decode()
        return f"{_VALUE_VERSION}:{self.active_id}:{body}"

    def open_value(self, stored: str, *, context: str) -> str:
        """The value :meth:`seal_value` sealed.

        Raises:
            UnknownKey: Sealed under a key that is not configured.
            TamperedData: Malformed, altered, or sealed for another ``context``.
        """
        try:
            version, key_hex, body = stored.split(":")
            key_id, raw = bytes.fromhex(key_hex), base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error):
            raise TamperedData("not a sealed value") from None
        if version != _VALUE_VERSION or len(raw) < _VALUE_NONCE + _TAG:
            raise TamperedData("not a sealed value")
        try:
            plain = self._value_aead(key_id).decrypt(
                raw[:_VALUE_NONCE], raw[_VALUE_NONCE:], context.encode()
            )
        except InvalidTag:
            raise TamperedData(f"sealed value of {context} does not authenticate") from None
        return plain.decode()
