"""The embedded default: artefacts as files under one folder (the data dir).

Publishing is fsync, rename, fsync of the folder: readers see the old file or the whole new
one, and a published file survives a power cut. Staged files and decrypted copies live in
``<root>/tmp``, on the same filesystem, so publishing is a rename.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ppml.storage.base import CHUNK, Artifact, ArtifactStore, check_key, digest_of
from ppml.trust.sealing import DataKeys

__all__ = ["LocalStore"]


def _fsync(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _sync_folder(folder: Path) -> None:
    # A rename is durable once the folder holding the new entry is flushed too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(ArtifactStore):
    """Files under one root, addressed by ``kind/name`` keys."""

    def __init__(self, root: Path, *, keys: DataKeys | None = None) -> None:
        """``keys``: the data keys that seal the sealed kinds; None stores every file plain
        (caches and tests; the service builds its store with :meth:`for_settings`)."""
        self.root = root.resolve()
        self.keys = keys

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Where ``key``'s stored bytes lie. A sealed kind's file holds ciphertext: read it
        through :meth:`open_plain`."""
        return self.root / check_key(key)

    def _scratch(self) -> Path:
        return self.root / "tmp"

    def _put(self, staged: Path, key: str, *, sha256: str) -> None:
        target = self.path(key)
        _fsync(staged)
        new_folder = not target.parent.is_dir()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        _sync_folder(target.parent)
        if new_folder:
            _sync_folder(self.root)

    def _create(self, staged: Path, key: str, *, sha256: str) -> bool:
        target = self.path(key)
        _fsync(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(staged, target)  # fails if the name exists: of two creators, one wins
        except FileExistsError:
            return False
        _sync_folder(target.parent)
        return True

    @contextmanager
    def fetch(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(key)
        yield path

    def stat(self, key: str) -> Artifact:
        sha256, size = digest_of(self.path(key))
        return Artifact(key=key, sha256=sha256, size=size)

    def read_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with self.path(key).open("rb") as handle:
            handle.seek(start)
            left = None if end is None else end - start + 1
            while left is None or left > 0:
                chunk = handle.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def list(self, kind: str, prefix: str = "") -> list[str]:
        folder = self.root / kind
        entries = folder.iterdir() if folder.is_dir() else []
        return sorted(
            f"{kind}/{path.name}"
            for path in entries
            if path.name.startswith(prefix) and path.is_file()
        )

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()
