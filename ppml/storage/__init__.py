"""The artefact store: one interface (:class:`ArtifactStore`), two backends.

* :class:`~ppml.storage.local.LocalStore`: files under the data dir (the embedded default).
* :class:`~ppml.storage.s3.S3Store`: an S3-compatible object store, when
  ``PPML_STORAGE_URL=s3://bucket/prefix`` (imported on demand: boto3 loads only then).

:meth:`ArtifactStore.for_settings` picks the backend; docs/storage.md describes both.
"""

from ppml.storage.base import SEALED_KINDS, Artifact, ArtifactStore, IntegrityError
from ppml.storage.local import LocalStore

__all__ = ["SEALED_KINDS", "Artifact", "ArtifactStore", "IntegrityError", "LocalStore"]
