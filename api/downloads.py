"""Serving a published artefact: small files from memory, large ones streamed with ranges.

A published artefact never changes (its sha256 is in the job row), so ``(key, sha256)``
names its content. Small files are kept in memory, which saves the thread-pool hops of a
streamed file on every download. Large files and range requests are streamed: from disk
with the local store (``FileResponse``), by ranged GETs from an object store, in chunks of
1 MiB, so a model is never held whole in the API's memory.
"""

from __future__ import annotations

import hashlib
import os
import re

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse

from api.errors import problem
from ppml.cache import LRUCache
from ppml.storage import ArtifactStore, IntegrityError, LocalStore

__all__ = ["serve_artifact"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _SmallFiles:
    """The bytes of small published artefacts, kept in memory."""

    def __init__(self, *, max_file: int = 4 << 20, max_total: int = 64 << 20) -> None:
        self.max_file = max_file
        self._files: LRUCache[tuple[str, str], bytes] = LRUCache(
            4096, max_weight=max_total, weigh=len
        )

    def get(self, key: str, digest: str) -> bytes | None:
        return self._files.get((key, digest))

    def load(self, store: ArtifactStore, key: str, digest: str) -> bytes | None:
        """Read and keep the file if it is small; None (nothing read) if it is not."""
        if isinstance(store, LocalStore):
            with store.path(key).open("rb") as handle:
                if os.fstat(handle.fileno()).st_size > self.max_file:
                    return None
                data = handle.read(self.max_file + 1)
            if len(data) > self.max_file:  # grew since the stat: not a published artefact
                return None
        else:
            if store.stat(key).size > self.max_file:
                return None
            data = b"".join(store.read_range(key))
            if hashlib.sha256(data).hexdigest() != digest:
                raise IntegrityError(f"{key} does not match the sha256 recorded for it")
        self._files.put((key, digest), data)
        return data


_small_files = _SmallFiles()


def _span(header: str | None, size: int) -> tuple[int, int] | str | None:
    """``(first, last)`` byte of a single satisfiable range; None: the whole file (no
    header, or one this server ignores, as RFC 9110 allows); "unsatisfiable" otherwise."""
    found = _RANGE.match(header.strip()) if header else None
    if found is None or found[1] == found[2] == "":
        return None
    if found[1] == "":  # the last n bytes
        suffix = int(found[2])
        return (max(0, size - suffix), size - 1) if suffix and size else "unsatisfiable"
    first = int(found[1])
    last = min(int(found[2]), size - 1) if found[2] else size - 1
    if first >= size or last < first:
        return "unsatisfiable"
    return first, last


def _unsatisfiable(size: int) -> Response:
    return problem(
        416,
        "range-not-satisfiable",
        "Range not satisfiable",
        f"the requested range starts past the end of the file ({size} bytes)",
        headers={"Content-Range": f"bytes */{size}"},
    )


def _streamed(
    store: ArtifactStore, key: str, digest: str, headers: dict[str, str], span_header: str | None
) -> Response:
    stored = store.stat(key)
    if stored.sha256 != digest:
        raise IntegrityError(f"{key} does not match the sha256 recorded for it")
    span = _span(span_header, stored.size)
    if span == "unsatisfiable":
        return _unsatisfiable(stored.size)
    first, last = span if isinstance(span, tuple) else (0, stored.size - 1)
    headers = {**headers, "Content-Length": str(last - first + 1)}
    if isinstance(span, tuple):
        headers["Content-Range"] = f"bytes {first}-{last}/{stored.size}"
    body = store.read_range(key, first, last) if stored.size else iter(())
    return StreamingResponse(
        body,
        status_code=206 if isinstance(span, tuple) else 200,
        media_type="application/octet-stream",
        headers=headers,
    )


async def serve_artifact(
    store: ArtifactStore, key: str, digest: str, filename: str, range_header: str | None
) -> Response:
    """The artefact ``key`` (recorded ``digest``) as an attachment named ``filename``."""
    headers = {
        "X-Content-SHA256": digest,
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
    }
    if range_header is None:
        data = _small_files.get(key, digest)
        if data is None:
            data = await run_in_threadpool(_small_files.load, store, key, digest)
        if data is not None:
            return Response(data, media_type="application/octet-stream", headers=headers)
    if isinstance(store, LocalStore):
        path = store.path(key)
        if range_header is not None:
            size = (await run_in_threadpool(path.stat)).st_size
            if _span(range_header, size) == "unsatisfiable":
                return _unsatisfiable(size)
        # Streamed from disk (stat, open and reads in threads), ranges included.
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=filename,
            headers={"X-Content-SHA256": digest},
        )
    return await run_in_threadpool(_streamed, store, key, digest, headers, range_header)
