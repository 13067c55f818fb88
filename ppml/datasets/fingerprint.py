"""Content fingerprints: a keyed hash of a dataset's normalised rows, whatever their order.

Two registrations of the same rows (the same file uploaded twice, the same built-in twice)
get the same fingerprint, so a tenant cannot open a fresh budget on data whose budget it has
spent (``ppml.services.fingerprints``). What it hashes is what training reads: the float32
feature matrix and each row's declared class name, after decoding and the fixed transforms,
train and held-out rows together (the split is per dataset, so it is undone first).

What it does not catch, by construction: a copy with any value changed, rows added or
removed, features rescaled or reordered, or labels renamed, hashes to something else
(docs/privacy.md, "Deletion and fingerprints").

Pure numpy and hashlib: the API process imports this module.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ppml.datasets.arrays import DatasetArrays

__all__ = ["FINGERPRINT_BYTES", "content_fingerprint"]

FINGERPRINT_BYTES = 32  # 64 hex characters
_PERSON = b"ppml-content-v1"
_LABEL_BYTES = 16


def _label_table(classes: tuple[str, ...]) -> np.ndarray:
    """One fixed-width code per class name: the same name gets the same code whatever the
    order or the number of declared classes."""
    codes = [
        hashlib.blake2b(name.encode("utf-8"), digest_size=_LABEL_BYTES).digest() for name in classes
    ]
    return np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(classes), _LABEL_BYTES)


def _canonical_rows(arrays: DatasetArrays) -> np.ndarray:
    """Each row as bytes (little-endian float32 features, ``-0.0`` as ``0.0``, then its class
    code), sorted bytewise: the multiset of rows, independent of their order."""
    x = np.concatenate([arrays.x_train, arrays.x_test]).astype("<f4", copy=False)
    x = x + np.float32(0.0)  # -0.0 + 0.0 == +0.0: one encoding per value
    y = np.concatenate([arrays.y_train, arrays.y_test])
    features = np.ascontiguousarray(x).view(np.uint8).reshape(len(y), -1)
    rows = np.ascontiguousarray(np.concatenate([features, _label_table(arrays.classes)[y]], axis=1))
    return np.sort(rows.view(np.dtype((np.void, rows.shape[1]))).ravel())


def content_fingerprint(arrays: DatasetArrays, *, key: bytes, tenant_id: str) -> str:
    """The keyed fingerprint of a dataset's rows, for one tenant.

    Args:
        arrays: The decoded, normalised dataset (train and held-out rows).
        key: The service's secret fingerprint key (16 to 64 bytes), never stored in the
            database: without it, a fingerprint cannot be tested against guessed data.
        tenant_id: Fingerprints of equal data differ between tenants, so they link no
            tenant's data to another's.

    Returns:
        64 hex characters.
    """
    if not 16 <= len(key) <= 64:
        raise ValueError("the fingerprint key must hold 16 to 64 bytes")
    hasher = hashlib.blake2b(key=key, digest_size=FINGERPRINT_BYTES, person=_PERSON)
    tenant = tenant_id.encode("utf-8")
    n, d = len(arrays.y_train) + len(arrays.y_test), arrays.num_features
    # Length-prefixed fields, then rows of a fixed width: an unambiguous encoding.
    for number in (len(tenant), n, d):
        hasher.update(number.to_bytes(8, "little"))
    hasher.update(tenant)
    hasher.update(_canonical_rows(arrays).tobytes())
    return hasher.hexdigest()
