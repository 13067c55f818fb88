"""Content fingerprints of registered data, and the refusal of a second budget on the same rows.

A budgeted dataset's fingerprint (:func:`ppml.datasets.fingerprint.content_fingerprint`) is
stored once its rows are known: at registration for built-ins, by the ingestion for uploads.
A budgeted registration whose rows have the fingerprint of one of the tenant's budgeted
datasets, deleted ones included, is refused with 409 ``dataset-already-registered`` naming
that dataset: the spent ε of data stays spent, re-registering cannot refund it. Public data
(no budget) is neither refused nor compared with.

The key is the service's, derived from its data key (``ppml.trust.sealing.DataKeys.derive``:
HKDF with a label of its own, from the oldest configured data key, so rotations leave it
unchanged), which the API and the workers share; it is never written anywhere.
:func:`fingerprint_key` is the one place that makes it.
"""

from __future__ import annotations

from ppml.config import Settings
from ppml.datasets.arrays import DatasetArrays
from ppml.datasets.fingerprint import content_fingerprint
from ppml.db.repositories import Repositories
from ppml.errors import DatasetAlreadyRegistered
from ppml.trust.sealing import DataKeys

__all__ = ["check_not_registered", "fingerprint_key", "fingerprint_of"]

_KEY_LABEL = "content-fingerprint"


def fingerprint_key(settings: Settings) -> bytes:
    """The service's fingerprint key (32 bytes), derived from its data key. With another data
    key, stored fingerprints match nothing: the data key's backup covers it."""
    return DataKeys.from_settings(settings).derive(_KEY_LABEL)


def fingerprint_of(settings: Settings, tenant_id: str, arrays: DatasetArrays) -> str:
    """The tenant's fingerprint of these rows, under the service's key."""
    return content_fingerprint(arrays, key=fingerprint_key(settings), tenant_id=tenant_id)


def check_not_registered(
    repos: Repositories,
    *,
    tenant_id: str,
    fingerprint: str,
    budgeted: bool,
    excluding: str | None = None,
) -> None:
    """Refuse a budgeted registration of rows the tenant registered with a budget before.

    Call it under the tenant row's lock, so two registrations of the same rows cannot both
    pass.

    Raises:
        DatasetAlreadyRegistered: such a dataset exists (deleted or not); it is named.
    """
    if not budgeted:
        return
    existing = repos.budgeted_dataset_with_fingerprint(tenant_id, fingerprint, excluding=excluding)
    if existing is None:
        return
    deleted = existing.deleted_at is not None
    if deleted:
        detail = (
            f"these rows were registered with a privacy budget as dataset {existing.id}, "
            "since deleted: its budget still binds them, so they cannot get a new one"
        )
    else:
        detail = (
            f"these rows are registered with a privacy budget as dataset {existing.id}: "
            "submit jobs to it; a second budget on the same rows would let them spend twice"
        )
    raise DatasetAlreadyRegistered(detail, dataset_id=existing.id, dataset_deleted=deleted)
