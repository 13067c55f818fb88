"""Keyed hashes that place each privacy unit by itself: the train/test split and partitions.

A record's side of the split and its simulated federated client must be a function of that
record alone and of secret randomness (PRIVACY.md, "Every release is a mechanism"), so
that adding, removing or changing one record moves no other. Each unit gets a 64-bit key,
a keyed BLAKE2b of its own content under the dataset's secret and a domain string that
separates uses ("split", "iid:<seed>", ...); :func:`uniform` turns keys into numbers in
``[0, 1)``. The secret is drawn once per dataset (:func:`new_secret`) and never released.

The database never holds it in plain text: the row stores it sealed under the service's
data key, bound to the dataset's id (:func:`seal_secret`), and :func:`open_secret` is the one
place that reads it. Rows written before sealing hold the plain hex; they are read as they
are, and sealed in place at the next ``ppml serve`` or ``ppml db upgrade``
(``ppml.services.datasets.seal_split_secrets``).

Pure numpy, hashlib and ``cryptography``: the API process imports this module.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ppml.trust.sealing import DataKeys, UnknownKey, is_sealed_value

__all__ = [
    "derived_seed",
    "new_secret",
    "open_secret",
    "partition_keys",
    "record_keys",
    "seal_secret",
    "uniform",
    "unit_keys",
]

_SECRET_BYTES = 32
_DIGEST_BYTES = 8
# BLAKE2b personalisation: record keys, unit keys and seeds never collide, whatever the domain.
_RECORD_PERSON = b"ppml-record-v1"
_UNIT_PERSON = b"ppml-unit-v1"
_SEED_PERSON = b"ppml-seed-v1"
_MANTISSA_BITS = 53


def new_secret() -> str:
    """A fresh per-dataset secret: 32 random bytes from the OS, as hex."""
    return secrets.token_hex(_SECRET_BYTES)


def _secret_context(dataset_id: str) -> str:
    return f"datasets/{dataset_id}:split_secret"


def seal_secret(keys: DataKeys, dataset_id: str, secret: str) -> str:
    """What the dataset's row stores: its secret sealed under the active data key
    (``v1:<key id>:<base64>``), bound to its id (no other row's secret opens as it)."""
    return keys.seal_value(secret, context=_secret_context(dataset_id))


def open_secret(keys: DataKeys | None, dataset_id: str, stored: str | None) -> str | None:
    """The secret a dataset's row stores (a legacy plain value is returned as it is).

    Raises:
        ppml.trust.sealing.UnknownKey: Sealed under a key that is not configured.
        ppml.trust.sealing.TamperedData: Altered, or copied from another dataset's row.
    """
    if stored is None or not is_sealed_value(stored):
        return stored
    if keys is None:
        raise UnknownKey(f"the split secret of dataset {dataset_id} is sealed; no data key")
    return keys.open_value(stored, context=_secret_context(dataset_id))


def _hasher(secret: str, domain: str, person: bytes) -> hashlib.blake2b:
    try:
        key = bytes.fromhex(secret)
    except (TypeError, ValueError):
        raise ValueError("secret must be a hex string") from None
    if not 16 <= len(key) <= 64:
        raise ValueError("secret must hold 16 to 64 bytes")
    hasher = hashlib.blake2b(key=key, digest_size=_DIGEST_BYTES, person=person)
    encoded = domain.encode("utf-8")
    # Length-prefixed, so that no domain is a prefix of another's input.
    hasher.update(len(encoded).to_bytes(8, "little") + encoded)
    return hasher


def _finish(digests: bytearray) -> npt.NDArray[np.uint64]:
    return np.frombuffer(bytes(digests), dtype="<u8").astype(np.uint64)


def record_keys(
    secret: str, domain: str, x: npt.ArrayLike, labels: Sequence[str] | npt.ArrayLike
) -> npt.NDArray[np.uint64]:
    """One key per record: a keyed hash of its float32 features and its label string.

    Two equal records get equal keys; ``-0.0`` and ``0.0`` count as equal.

    Args:
        secret: The dataset's secret (hex, 16 to 64 bytes).
        domain: Separates uses, e.g. ``"split"`` or ``"iid:<seed>"``.
        x: Features ``(n, d)``, converted to float32.
        labels: Each record's label as a string (the declared class name), ``(n,)``.

    Returns:
        ``(n,)`` uint64 keys.
    """
    rows = np.ascontiguousarray(x, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError("x must be two-dimensional")
    names = np.asarray(labels)
    if names.shape != (rows.shape[0],):
        raise ValueError("labels must hold one label per row of x")
    rows = rows + np.float32(0.0)  # -0.0 + 0.0 == +0.0: one encoding per value
    base = _hasher(secret, domain, _RECORD_PERSON)
    # The row bytes have a fixed width, so row + label is an unambiguous encoding.
    encoded = {name: str(name).encode("utf-8") for name in np.unique(names).tolist()}
    view, width = memoryview(rows.tobytes()), rows.shape[1] * rows.itemsize
    digests = bytearray()
    for i, name in enumerate(names.tolist()):
        hasher = base.copy()
        hasher.update(view[i * width : (i + 1) * width])
        hasher.update(encoded[name])
        digests += hasher.digest()
    return _finish(digests)


def unit_keys(secret: str, domain: str, ids: Sequence[str]) -> npt.NDArray[np.uint64]:
    """One key per unit id (for example a federated client's raw id, as a string).

    Args:
        secret: The dataset's secret (hex).
        domain: Separates uses, e.g. ``"split"``.
        ids: The units' ids.

    Returns:
        ``(len(ids),)`` uint64 keys.
    """
    base = _hasher(secret, domain, _UNIT_PERSON)
    digests = bytearray()
    for unit in ids:
        hasher = base.copy()
        hasher.update(str(unit).encode("utf-8"))
        digests += hasher.digest()
    return _finish(digests)


def derived_seed(secret: str, domain: str) -> int:
    """A secret 63-bit seed for data-independent draws (e.g. a partition's proportions)."""
    digest = _hasher(secret, domain, _SEED_PERSON).digest()
    return int.from_bytes(digest, "little") >> 1


def partition_keys(
    secret: str,
    *,
    scheme: str,
    seed: int,
    x: npt.ArrayLike,
    labels: Sequence[str] | npt.ArrayLike,
) -> tuple[npt.NDArray[np.uint64], int]:
    """The keys and the proportions seed of a job's keyed partition (``iid``, ``dirichlet``).

    Args:
        secret: The dataset's secret (hex).
        scheme: The partition scheme; with ``seed`` it names the domain.
        seed: The job's seed: another seed places the records afresh.
        x: Training features ``(n, d)``.
        labels: Each training row's class name.

    Returns:
        ``record_keys(secret, "<scheme>:<seed>", x, labels)`` and a secret seed for the
        Dirichlet proportions.
    """
    domain = f"{scheme}:{seed}"
    return record_keys(secret, domain, x, labels), derived_seed(secret, f"{domain}:proportions")


def uniform(keys: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Maps uint64 keys to floats in ``[0, 1)`` through their top 53 bits (exact in float64)."""
    k = np.asarray(keys, dtype=np.uint64)
    return (k >> np.uint64(64 - _MANTISSA_BITS)).astype(np.float64) * 2.0**-_MANTISSA_BITS
