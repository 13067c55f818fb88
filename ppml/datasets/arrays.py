"""The dataset value type, upload size limits, and the ``.npz`` store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ppml.errors import MalformedFile

_STORE_VERSION = 1


@dataclass(frozen=True)
class UploadLimits:
    """Upper bounds on an upload, checked before the expensive parts of parsing."""

    max_rows: int = 1_000_000
    max_columns: int = 10_000
    max_classes: int = 1_000
    max_uncompressed_bytes: int = 2 * 1024**3  # NPZ members and Parquet (zip-bomb guard)
    # The decoded size estimated from the headers, before decoding (``ppml.datasets.inspect``).
    max_decoded_bytes: int = 512 * 1024**2


@dataclass(frozen=True, eq=False)
class DatasetArrays:
    """A classification dataset split into train and held-out test arrays.

    Attributes:
        x_train: float32 features, shape ``(n_train, d)``, C-contiguous.
        y_train: int64 class indices in ``0..num_classes-1``.
        x_test: float32 features, shape ``(n_test, d)``, C-contiguous.
        y_test: int64 class indices.
        classes: the original label of each class index, as strings.
        feature_names: one name per feature column.
        clients_train: int64 client index (``0..num_clients-1``) of each train row, when the
            data came with a client column; every index has at least one train row.
        clients_test: int64 client index (``0..num_test_clients-1``) of each test row, when
            the privacy unit is the client: those clients are wholly held out, and number
            apart from the train clients.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    clients_train: np.ndarray | None = None
    clients_test: np.ndarray | None = None

    def __post_init__(self) -> None:
        d = len(self.feature_names)
        for name in ("x_train", "x_test"):
            x = getattr(self, name)
            if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != d:
                raise ValueError(f"{name} must be float32 of shape (n, {d})")
            if not x.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous")
        for x_name, y_name in (("x_train", "y_train"), ("x_test", "y_test")):
            y = getattr(self, y_name)
            if y.dtype != np.int64 or y.shape != (getattr(self, x_name).shape[0],):
                raise ValueError(f"{y_name} must be int64 with one entry per row of {x_name}")
            if y.size and (y.min() < 0 or y.max() >= len(self.classes)):
                raise ValueError(f"{y_name} holds a class index outside 0..num_classes-1")
        c = self.clients_train
        if c is not None and (c.dtype != np.int64 or c.shape != self.y_train.shape):
            raise ValueError("clients_train must be int64 with one entry per train row")
        if c is not None and c.size and c.min() < 0:
            raise ValueError("clients_train holds a negative client index")
        t = self.clients_test
        if t is not None and (t.dtype != np.int64 or t.shape != self.y_test.shape):
            raise ValueError("clients_test must be int64 with one entry per test row")
        if t is not None and t.size and t.min() < 0:
            raise ValueError("clients_test holds a negative client index")

    @property
    def num_features(self) -> int:
        """Number of feature columns."""
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def n_train(self) -> int:
        """Number of train rows."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of held-out test rows."""
        return int(self.x_test.shape[0])

    @property
    def num_clients(self) -> int | None:
        """Number of clients in the train split, or None without a client column."""
        if self.clients_train is None:
            return None
        return int(self.clients_train.max()) + 1 if self.clients_train.size else 0

    @property
    def num_test_clients(self) -> int | None:
        """Number of wholly held-out clients (client unit), or None."""
        if self.clients_test is None:
            return None
        return int(self.clients_test.max()) + 1 if self.clients_test.size else 0


def save_arrays(arrays: DatasetArrays, path: Path) -> None:
    """Write a dataset to ``path`` as an uncompressed ``.npz`` (a plain write).

    Publish it through ``ArtifactStore.write`` where readers may look: the store makes it
    appear whole or not at all.

    Args:
        arrays: the dataset.
        path: destination file; its directory must exist.
    """
    payload: dict[str, Any] = {
        "version": np.asarray(_STORE_VERSION, dtype=np.int64),
        "x_train": arrays.x_train,
        "y_train": arrays.y_train,
        "x_test": arrays.x_test,
        "y_test": arrays.y_test,
        "classes": np.asarray(arrays.classes, dtype=np.str_),
        "feature_names": np.asarray(arrays.feature_names, dtype=np.str_),
    }
    if arrays.clients_train is not None:
        payload["clients_train"] = arrays.clients_train
    if arrays.clients_test is not None:
        payload["clients_test"] = arrays.clients_test
    with Path(path).open("wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, **payload)


def load_arrays(path: Path) -> DatasetArrays:
    """Read a dataset written by :func:`save_arrays` (never unpickles).

    Args:
        path: the ``.npz`` file.

    Returns:
        The dataset.

    Raises:
        MalformedFile: the file is missing, damaged or not in this format.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            if int(npz["version"]) != _STORE_VERSION:
                raise ValueError("unsupported store version")
            return DatasetArrays(
                x_train=np.ascontiguousarray(npz["x_train"]),
                y_train=npz["y_train"],
                x_test=np.ascontiguousarray(npz["x_test"]),
                y_test=npz["y_test"],
                classes=tuple(str(c) for c in npz["classes"]),
                feature_names=tuple(str(f) for f in npz["feature_names"]),
                clients_train=npz["clients_train"] if "clients_train" in npz.files else None,
                # Absent from files written before client-unit splits: still loadable.
                clients_test=npz["clients_test"] if "clients_test" in npz.files else None,
            )
    except Exception:
        raise MalformedFile("the stored dataset is missing or damaged", field="file") from None
