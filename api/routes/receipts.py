"""Signed receipts of released models, and the public keys that check them offline.

The keys are open to anyone (``/.well-known/ppml-signing-keys.json``): they prove nothing by
themselves and are what a verifier needs. A receipt is its job's tenant's, like the model.
"""

from __future__ import annotations

import hashlib
import json

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.deps import OwnedJob
from api.routes.common import CheckedRoute, Router, errors
from api.routes.models import ModelNotReady
from api.schemas import SignedReceiptFile, SigningKeys
from ppml.config import Settings
from ppml.db.models import Job, JobStatus
from ppml.errors import Conflict
from ppml.trust import keys as keyring
from ppml.trust.receipts import receipt_file
from ppml.trust.records import SignedReceipt

__all__ = ["router", "well_known"]

router = Router(prefix="/v1/jobs", tags=["receipts"])
well_known = APIRouter(tags=["receipts"], route_class=CheckedRoute)

KEYS_PATH = "/.well-known/ppml-signing-keys.json"
# Short: a verifier that holds the keys from before a rotation fetches them again soon.
_KEYS_MAX_AGE_S = 60


class ReceiptNotSigned(Conflict):
    code = "receipt-not-signed"
    title = "Receipt not signed"


@well_known.get(
    KEYS_PATH,
    operation_id="get_signing_keys",
    response_model=SigningKeys,
    responses={200: {"description": "The public signing keys (cacheable)."}},
)
def get_signing_keys(request: Request) -> Response:
    """The public keys of the service's receipt signatures, each with its validity (no auth).

    A receipt verifies when its key is listed here and was in service (created, not yet
    retired) at the receipt's `issued_at`. Keys are never removed: a rotation retires the
    active key and adds a new one, so old receipts keep verifying.
    """
    settings: Settings = request.app.state.settings
    store = request.app.state.store
    public = keyring.SigningKeys.for_settings(settings, store).public_keys()
    body = json.dumps({"keys": public}, sort_keys=True, indent=2).encode()
    headers = {
        "Cache-Control": f"public, max-age={_KEYS_MAX_AGE_S}",
        "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
    }
    return Response(body, media_type="application/json", headers=headers)


def _signed(job: Job) -> SignedReceipt:
    if job.status != JobStatus.SUCCEEDED or job.artifacts is None or job.receipt is None:
        raise ModelNotReady(f"the job is {job.status}; receipts exist for released models")
    if job.receipt.signed is None:
        raise ReceiptNotSigned(
            "this model was released before receipts were signed; its files' metadata hold "
            "its unsigned receipt"
        )
    return job.receipt.signed


@router.get(
    "/{job_id}/receipt",
    operation_id="get_receipt",
    response_model=SignedReceiptFile,
    responses={
        **errors(404, 409),
        200: {"description": "The signed receipt, canonical JSON: save it byte for byte."},
    },
)
async def get_receipt(job: OwnedJob) -> Response:
    """The signed receipt of a job's released model, to check offline with
    `ppml receipts verify MODEL --receipt RECEIPT --keys KEYS`.

    It binds the model files' sha256, the dataset's id and content fingerprint, each
    mechanism with its ε, the job's ledger entries and the ledger's chain head at release.
    A job without a released model answers 409.
    """
    body = receipt_file(_signed(job))
    headers = {
        "Content-Disposition": f'attachment; filename="{job.id}.receipt.json"',
        "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
    }
    return Response(body, media_type="application/json", headers=headers)
