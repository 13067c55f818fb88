"""Typed records of what the service signs, as stored on a row (no cryptography here).

Kept apart from :mod:`ppml.trust.keys` so that the typed JSON columns of ``ppml.db.models``
can hold them without importing the keyring.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SignatureRecord", "SignedReceipt"]


class SignatureRecord(BaseModel):
    """An Ed25519 signature: the key that made it and its 64 bytes in base64."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: str = Field(examples=["Ed25519"])
    key_id: str = Field(description="The signing key, as listed at the well-known keys route.")
    value: str = Field(description="The signature's 64 bytes, base64.")


class SignedReceipt(BaseModel):
    """A receipt as the service signed it: the exact bytes signed and their signature.

    The payload is kept as the signed text (canonical JSON), never re-serialised from a
    parsed form, so a later version of ppml (new fields, new defaults) still serves the very
    bytes its signature covers.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    payload: str = Field(description="The signed receipt document, canonical JSON.")
    signature: SignatureRecord

    def document(self) -> dict[str, Any]:
        """The signed receipt document, parsed."""
        parsed: dict[str, Any] = json.loads(self.payload)
        return parsed
