"""Artefacts in an S3-compatible object store (AWS S3, MinIO, SeaweedFS), through boto3.

``s3://bucket/prefix``: every key ``kind/name`` is the object ``prefix/kind/name``. Credentials
come from boto3's own chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, or an instance role); ``endpoint_url`` names a server other than AWS.

An object becomes visible whole when its PUT (or its multipart upload's completion) succeeds,
never in part. Its sha256 is stored as user metadata (``x-amz-meta-sha256``); every fetch
hashes what it receives and refuses bytes that do not match. Reads of a byte range are ranged
GETs, streamed in chunks. Staged files and local copies live in a local scratch folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ppml.storage.base import (
    CHUNK,
    Artifact,
    ArtifactStore,
    IntegrityError,
    check_key,
)
from ppml.trust.sealing import DataKeys

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3Store"]

_MISSING = {"404", "NoSuchKey", "NotFound"}
_MULTIPART = 64 << 20  # files above this are sent as a multipart upload, in parts of 16 MiB
_PART = 16 << 20


def _missing(exc: Exception) -> bool:
    response: dict[str, Any] = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code")) in _MISSING


def _refused(exc: Exception) -> bool:
    response: dict[str, Any] = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code")) in {"PreconditionFailed", "412"}


class S3Store(ArtifactStore):
    """Objects under ``prefix/`` in one bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        scratch: Path,
        endpoint_url: str | None = None,
        keys: DataKeys | None = None,
        client: S3Client | None = None,
    ) -> None:
        """``scratch``: a local folder for staged files and copies (private to this
        process's machine); ``client``: a boto3 S3 client (default: one from the
        environment's credentials)."""
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.scratch, self.keys = scratch.resolve(), keys
        self.client = client or _client(endpoint_url)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        scratch: Path,
        endpoint_url: str | None = None,
        keys: DataKeys | None = None,
    ) -> S3Store:
        """The store of an ``s3://bucket/prefix`` URL.

        Raises:
            ValueError: If the URL is not ``s3://`` with a bucket.
        """
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"PPML_STORAGE_URL must be s3://bucket[/prefix], not {url!r}")
        return cls(
            parsed.netloc, parsed.path, scratch=scratch, endpoint_url=endpoint_url, keys=keys
        )

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    def _object(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _scratch(self) -> Path:
        return self.scratch

    def _put(self, staged: Path, key: str, *, sha256: str) -> None:
        from boto3.s3.transfer import TransferConfig

        # Above the threshold, parts go up in parallel and the object appears only when the
        # upload completes; an abandoned upload is never visible (a bucket lifecycle rule
        # removes its parts).
        config = TransferConfig(multipart_threshold=_MULTIPART, multipart_chunksize=_PART)
        extra = {"Metadata": {"sha256": sha256}}
        self.client.upload_file(
            str(staged), self.bucket, self._object(key), ExtraArgs=extra, Config=config
        )

    def _create(self, staged: Path, key: str, *, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with staged.open("rb") as body:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._object(key),
                    Body=body,
                    Metadata={"sha256": sha256},
                    IfNoneMatch="*",  # conditional write: of two creators, one wins
                )
        except ClientError as exc:
            if _refused(exc):
                return False
            raise
        return True

    def _get(self, key: str, span: str | None = None) -> Any:
        from botocore.exceptions import ClientError

        try:
            if span is None:
                return self.client.get_object(Bucket=self.bucket, Key=self._object(key))
            return self.client.get_object(Bucket=self.bucket, Key=self._object(key), Range=span)
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(key) from None
            raise

    @contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        with self.private_folder("fetch-") as folder:
            path = folder / Path(key).name
            response = self._get(key)
            expected = response.get("Metadata", {}).get("sha256")
            digest, body = hashlib.sha256(), response["Body"]
            with body, path.open("xb") as out:
                for chunk in body.iter_chunks(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if expected != digest.hexdigest():
                raise IntegrityError(f"{key} does not match the sha256 stored with it")
            yield path

    def stat(self, key: str) -> Artifact:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(key) from None
            raise
        sha256 = head.get("Metadata", {}).get("sha256", "")
        return Artifact(key=key, sha256=sha256, size=head["ContentLength"])

    def read_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        span = f"bytes={start}-{'' if end is None else end}"
        whole = start == 0 and end is None  # no Range: S3 refuses "bytes=0-" of an empty object
        body = self._get(key, None if whole else span)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def list(self, kind: str, prefix: str = "") -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{base}{kind}/{prefix}"
        )
        found = [item["Key"][len(base) :] for page in pages for item in page.get("Contents", [])]
        return sorted(found)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except FileNotFoundError:
            return False
        return True


def _client(endpoint_url: str | None) -> S3Client:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        # Path-style requests work with every S3-compatible server (MinIO, SeaweedFS); AWS
        # itself is addressed virtual-host style.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        max_pool_connections=16,
    )
    client: S3Client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
    return client
