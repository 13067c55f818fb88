"""Datasets as validated numpy arrays: built-ins, user uploads, train/test split, ``.npz`` store.

Pure numpy/pandas/pyarrow; this module must never import torch, because the API process
imports it to validate uploads.

Privacy notes:

* No data-dependent preprocessing happens here. Statistics such as feature means computed
  on private rows would leak outside the DP guarantee, so only fixed transforms are used
  (digits / 16, ``log1p`` for breast cancer) and uploads are used exactly as given.
* Error messages name the problem and the column or request field, never a value from the
  file, and reader exceptions (whose messages may quote data) are never chained.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import random
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from ppml.errors import InvalidInput, MalformedFile, PayloadTooLarge, PPMLError

__all__ = [
    "BUILTINS",
    "FORMATS",
    "DatasetArrays",
    "UploadLimits",
    "detect_format",
    "load_arrays",
    "load_builtin",
    "parse_upload",
    "save_arrays",
]

BUILTINS: tuple[str, ...] = ("digits", "breast_cancer", "mnist1d")
FORMATS: tuple[str, ...] = ("csv", "parquet", "npz")

_MIN_ROWS = 10
_BUILTIN_TEST_FRACTION = 0.2
_MNIST1D_SAMPLES = 10_000
_MNIST1D_CACHE = "mnist1d-v1-seed{seed}.npz"
# Header names may average this many bytes; a longer first line is refused unread.
_HEADER_BYTES_PER_COLUMN = 1024
_NAME_SHOWN_CHARS = 64
_STORE_VERSION = 1
_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
_MAGIC = ((b"PAR1", "parquet"), (b"PK\x03\x04", "npz"), (b"PK\x05\x06", "npz"))
_X_KINDS = "biuf"  # bool, signed/unsigned int, float
_LABEL_KINDS = "biufU"


@dataclass(frozen=True)
class UploadLimits:
    """Upper bounds on an upload, checked before the expensive parts of parsing."""

    max_rows: int = 1_000_000
    max_columns: int = 10_000
    max_classes: int = 1_000
    max_uncompressed_bytes: int = 2 * 1024**3  # NPZ members and Parquet (zip-bomb guard)


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
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    clients_train: np.ndarray | None = None

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


# --------------------------------------------------------------------------- built-ins


def load_builtin(name: str, *, seed: int = 0, cache_dir: Path | None = None) -> DatasetArrays:
    """Load a built-in dataset, split into train and test.

    ``digits`` and ``breast_cancer`` come bundled with scikit-learn and are split 80/20,
    stratified, with ``seed``. ``mnist1d`` is generated locally (10,000 samples, its own
    80/20 split) from ``seed``. Only fixed, data-independent transforms are applied:
    digits are divided by 16 (their known pixel range), breast-cancer features go through
    ``log1p`` (all are non-negative), mnist1d is used as generated.

    Args:
        name: one of :data:`BUILTINS`.
        seed: seed of the split (and of the mnist1d generator), in ``0..2**32-1``.
        cache_dir: where to cache generated mnist1d arrays; None disables the cache.

    Returns:
        The split dataset.

    Raises:
        InvalidInput: unknown name (``field="source.builtin"``) or bad seed.
    """
    if name not in BUILTINS:
        raise InvalidInput(
            f"unknown built-in dataset; choose one of {', '.join(BUILTINS)}",
            field="source.builtin",
        )
    _check_seed(seed)
    if name == "mnist1d":
        return _load_mnist1d(seed, cache_dir)
    from sklearn import datasets as skd

    if name == "digits":
        bunch = skd.load_digits()
        x = bunch.data / 16.0
        classes = tuple(str(int(c)) for c in bunch.target_names)
    else:
        bunch = skd.load_breast_cancer()
        x = np.log1p(bunch.data)
        classes = tuple(str(c) for c in bunch.target_names)
    y = np.asarray(bunch.target, dtype=np.int64)
    names = tuple(str(f) for f in bunch.feature_names)
    return _split(x, y, None, classes, names, seed=seed, test_fraction=_BUILTIN_TEST_FRACTION)


def _load_mnist1d(seed: int, cache_dir: Path | None) -> DatasetArrays:
    cache = cache_dir / _MNIST1D_CACHE.format(seed=seed) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        with contextlib.suppress(MalformedFile):  # a damaged cache is regenerated
            return load_arrays(cache)
    arrays = _generate_mnist1d(seed)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_arrays(arrays, cache)
    return arrays


def _generate_mnist1d(seed: int) -> DatasetArrays:
    # Imported here: it pulls matplotlib and costs seconds at import.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = _MNIST1D_SAMPLES
    args.seed = seed
    with _global_rng_preserved():  # make_dataset reseeds the global generators
        data = make_dataset(args)
    x_train = np.ascontiguousarray(data["x"], dtype=np.float32)
    return DatasetArrays(
        x_train=x_train,
        y_train=np.asarray(data["y"], dtype=np.int64),
        x_test=np.ascontiguousarray(data["x_test"], dtype=np.float32),
        y_test=np.asarray(data["y_test"], dtype=np.int64),
        classes=tuple(str(i) for i in range(10)),
        feature_names=tuple(f"x{j}" for j in range(x_train.shape[1])),
    )


@contextlib.contextmanager
def _global_rng_preserved() -> Iterator[None]:
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


# --------------------------------------------------------------------------- uploads


def detect_format(filename: str, head: bytes) -> str:
    """Tell an upload's format from its first bytes, falling back to the file name's extension.

    Parquet (``PAR1``) and NPZ (a zip, ``PK\\x03\\x04``) are recognised by their magic bytes;
    a file without either is CSV only when its name ends in ``.csv``. The name is used only
    for its extension, never as a path.

    Args:
        filename: the client-supplied file name.
        head: the first bytes of the file (at least 4).

    Returns:
        ``"csv"``, ``"parquet"`` or ``"npz"``.

    Raises:
        MalformedFile: the content contradicts the extension, or neither is recognised.
    """
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    ext = "." + base.rsplit(".", 1)[-1] if "." in base else ""
    by_ext = _EXTENSIONS.get(ext)
    by_magic = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
    if by_magic is not None:
        if by_ext is not None and by_ext != by_magic:
            raise MalformedFile(
                f"the file's content does not match its {ext} extension", field="file"
            )
        return by_magic
    if by_ext == "csv":
        return "csv"
    if by_ext is not None:
        raise MalformedFile(f"the file is not a valid {by_ext} file", field="file")
    raise MalformedFile(
        "unrecognised file format; upload CSV (.csv), Parquet (.parquet) or NPZ (.npz)",
        field="file",
    )


def parse_upload(
    path: Path,
    *,
    file_format: str,
    target: str | None,
    client_column: str | None = None,
    limits: UploadLimits = UploadLimits(),
    seed: int = 0,
    test_fraction: float = 0.2,
) -> DatasetArrays:
    """Validate an uploaded file and split it into train and held-out test arrays.

    Features are used exactly as given: no scaling is fitted on the data, because such
    statistics would leak outside the DP guarantee. Owners should pre-scale features to a
    small range (for example [0, 1]) before uploading.

    CSV: comma-separated UTF-8 with a header row; every column but the target and the
    client column must be numeric, finite and present in every row. Parquet: the same
    rules. NPZ: arrays ``x`` (2-D numeric) and ``y`` (1-D labels); ``target`` is ignored,
    and ``client_column`` names a 1-D array of client ids (conventionally ``clients``).
    Labels may be any numbers or strings; they are mapped to ``0..K-1`` in sorted order.
    The split is stratified by label where every class has enough rows.

    Args:
        path: the stored upload (a server-side path).
        file_format: ``"csv"``, ``"parquet"`` or ``"npz"`` (see :func:`detect_format`).
        target: the label column (CSV and Parquet).
        client_column: the column (NPZ: array) holding each row's federated client.
        limits: size limits checked before the file is read in full.
        seed: seed of the split, in ``0..2**32-1``.
        test_fraction: fraction of rows held out for testing, in (0, 1).

    Returns:
        The split dataset; ``clients_train`` is set when ``client_column`` was given.

    Raises:
        MalformedFile: the file cannot be parsed, or holds missing, non-finite or
            non-numeric values.
        InvalidInput: bad arguments, a missing target or client column, fewer than 2 or
            more than ``limits.max_classes`` classes, or too few rows to split.
        PayloadTooLarge: the file exceeds ``limits``.
    """
    if file_format not in FORMATS:
        raise InvalidInput(f"file format must be one of {', '.join(FORMATS)}", field="file")
    if not 0.0 < test_fraction < 1.0:
        raise InvalidInput("test_fraction must be between 0 and 1", field="test_fraction")
    _check_seed(seed)
    if client_column is not None and client_column == target:
        raise InvalidInput("client_column must differ from target", field="client_column")
    try:
        if file_format == "npz":
            x, y_raw, c_raw, names = _read_npz(path, client_column, limits)
        else:
            x, y_raw, c_raw, names = _read_table(path, file_format, target, client_column, limits)
    except PPMLError:
        raise
    except MemoryError:
        raise PayloadTooLarge("the file is too large to load", field="file") from None
    except Exception:  # reader messages may quote data: never chain or echo them
        raise MalformedFile(f"the file could not be read as {file_format}", field="file") from None
    y, classes = _encode_labels(y_raw, limits)
    clients = _encode_clients(c_raw) if c_raw is not None else None
    return _split(x, y, clients, classes, names, seed=seed, test_fraction=test_fraction)


# --- CSV and Parquet


def _read_table(
    path: Path, file_format: str, target: str | None, client_column: str | None, lim: UploadLimits
) -> tuple[np.ndarray, Any, Any, tuple[str, ...]]:
    if target is None:
        raise InvalidInput("a target (label) column is required", field="target")
    if file_format == "csv":
        header = _read_csv_header(path, lim)
        _check_columns(header, target, client_column)
        frame = _read_csv_body(path, header, lim)
    else:
        frame = _read_parquet(path, target, client_column, lim)
    if len(frame) > lim.max_rows:
        raise PayloadTooLarge(f"the file has more than {lim.max_rows} rows", field="rows")
    _check_min_rows(len(frame))
    x, names = _features(frame, (target, client_column))
    clients = frame[client_column] if client_column is not None else None
    return x, frame[target], clients, names


def _read_csv_header(path: Path, lim: UploadLimits) -> list[str]:
    cap = lim.max_columns * _HEADER_BYTES_PER_COLUMN
    with path.open("rb") as f:
        raw = f.readline(cap + 1)
    if len(raw) > cap:
        raise PayloadTooLarge(
            f"the CSV header line is too long (at most {lim.max_columns} columns)",
            field="columns",
        )
    if not raw.strip():
        raise MalformedFile("the CSV file is empty or has no header row", field="file")
    try:
        line = raw.decode("utf-8-sig").rstrip("\r\n")
        header = next(csv.reader([line], strict=True))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        raise MalformedFile(
            "the CSV header row could not be parsed (expected UTF-8, comma-separated)",
            field="file",
        ) from None
    if len(header) > lim.max_columns:
        raise PayloadTooLarge(f"the file has more than {lim.max_columns} columns", field="columns")
    return header


def _read_csv_body(path: Path, header: list[str], lim: UploadLimits) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path,
            engine="c",
            sep=",",
            header=0,
            names=header,  # the header already parsed; keeps duplicate checks exact
            index_col=False,
            nrows=lim.max_rows + 1,
            encoding="utf-8",
            encoding_errors="strict",
            compression=None,  # never decompress: no bombs via pandas' inference
            on_bad_lines="error",
            low_memory=False,
        )
    except Exception:
        raise MalformedFile(
            "the CSV file could not be parsed: it must be UTF-8, comma-separated, with the "
            "same number of fields in every row as in the header",
            field="file",
        ) from None


def _read_parquet(
    path: Path, target: str, client_column: str | None, lim: UploadLimits
) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        meta, names = pf.metadata, list(pf.schema_arrow.names)
    except Exception:
        raise MalformedFile("the file is not a valid Parquet file", field="file") from None
    if max(meta.num_columns, len(names)) > lim.max_columns:
        raise PayloadTooLarge(f"the file has more than {lim.max_columns} columns", field="columns")
    if meta.num_rows > lim.max_rows:
        raise PayloadTooLarge(f"the file has more than {lim.max_rows} rows", field="rows")
    declared = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if declared > lim.max_uncompressed_bytes:
        raise PayloadTooLarge(
            f"the file expands to more than {lim.max_uncompressed_bytes} bytes", field="file"
        )
    _check_columns(names, target, client_column)
    try:
        return pf.read().to_pandas()
    except MemoryError:
        raise
    except Exception:
        raise MalformedFile("the Parquet file could not be read", field="file") from None


def _check_columns(names: list[str], target: str, client_column: str | None) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name.strip():
            raise MalformedFile(f"column {i + 1} has an empty name", field="file")
        if name in seen:
            raise MalformedFile(f"duplicate column name: {_column(name, i)}", field="file")
        seen.add(name)
    if target not in seen:
        raise InvalidInput(
            f"target column {_shown(target)!r} is not in the file's header", field="target"
        )
    if client_column is not None and client_column not in seen:
        raise InvalidInput(
            f"client column {_shown(client_column)!r} is not in the file's header",
            field="client_column",
        )


def _features(
    frame: pd.DataFrame, exclude: tuple[str | None, ...]
) -> tuple[np.ndarray, tuple[str, ...]]:
    cols = [(i, str(c)) for i, c in enumerate(frame.columns) if c not in exclude]
    if not cols:
        raise InvalidInput("the file has no feature columns besides the target", field="file")
    x = np.empty((len(frame), len(cols)), dtype=np.float32)
    for j, (i, name) in enumerate(cols):
        series = frame.iloc[:, i]
        if not pd.api.types.is_numeric_dtype(series) or pd.api.types.is_complex_dtype(series):
            raise MalformedFile(f"{_column(name, i)} is not numeric", field="file")
        if series.isna().any():
            raise MalformedFile(f"{_column(name, i)} has missing values", field="file")
        with np.errstate(over="ignore", invalid="ignore"):
            x[:, j] = series.to_numpy(dtype=np.float64)
        if not np.isfinite(x[:, j]).all():
            raise MalformedFile(
                f"{_column(name, i)} has infinite values or values beyond float32 range",
                field="file",
            )
    return x, tuple(name for _, name in cols)


def _column(name: str, index: int) -> str:
    # A numeric-looking "name" usually means the header row is data: show its position only.
    with contextlib.suppress(ValueError):
        float(name)
        return f"column {index + 1}"
    return f"column {index + 1} ({_shown(name)!r})"


def _shown(name: str) -> str:
    return name if len(name) <= _NAME_SHOWN_CHARS else name[:_NAME_SHOWN_CHARS] + "..."


# --- NPZ


def _read_npz(
    path: Path, client_column: str | None, lim: UploadLimits
) -> tuple[np.ndarray, Any, Any, tuple[str, ...]]:
    if client_column in ("x", "y"):
        raise InvalidInput(
            "client_column must name an array other than x and y", field="client_column"
        )
    wanted = ["x", "y"] + ([client_column] if client_column is not None else [])
    headers = _inspect_npz(path, lim)
    for name in ("x", "y"):
        if name not in headers:
            raise MalformedFile(f"the NPZ archive has no array named {name!r}", field="file")
    if client_column is not None and client_column not in headers:
        raise InvalidInput(
            f"the NPZ archive has no array named {_shown(client_column)!r}", field="client_column"
        )
    _check_npz_shapes(headers, wanted, lim)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [np.asarray(npz[name]) for name in wanted]
    except Exception:  # object arrays raise ValueError here; corrupt members anything
        raise MalformedFile(
            "the NPZ archive could not be loaded (object arrays and pickles are refused)",
            field="file",
        ) from None
    x = _npz_features(arrays[0])
    clients = arrays[2] if client_column is not None else None
    return x, arrays[1], clients, tuple(f"x{j}" for j in range(x.shape[1]))


def _inspect_npz(path: Path, lim: UploadLimits) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Read every member's declared size and ``.npy`` header without loading any data."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise MalformedFile("the file is not a valid NPZ (zip) archive", field="file") from None
    with zf:
        members = zf.infolist()
        if sum(m.file_size for m in members) > lim.max_uncompressed_bytes:
            raise PayloadTooLarge(
                f"the archive expands to more than {lim.max_uncompressed_bytes} bytes",
                field="file",
            )
        if any(m.is_dir() or not m.filename.endswith(".npy") for m in members):
            raise MalformedFile("the NPZ archive holds a member that is not .npy", field="file")
        headers = {}
        for m in members:
            with zf.open(m) as fp:
                shape, dtype = _npy_header(fp)
            if math.prod(shape) * dtype.itemsize > m.file_size:
                raise MalformedFile("an NPZ member is truncated", field="file")
            headers[m.filename[: -len(".npy")]] = (shape, dtype)
    return headers


def _npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[version]
        shape, _fortran, dtype = read(fp)
    except Exception:
        raise MalformedFile("an NPZ member has an invalid .npy header", field="file") from None
    if dtype.hasobject:
        raise MalformedFile(
            "the NPZ archive holds object arrays (pickles are refused)", field="file"
        )
    return tuple(int(s) for s in shape), dtype


def _check_npz_shapes(
    headers: dict[str, tuple[tuple[int, ...], np.dtype[Any]]], wanted: list[str], lim: UploadLimits
) -> None:
    (x_shape, x_dtype), (y_shape, y_dtype) = headers["x"], headers["y"]
    if len(x_shape) != 2 or x_dtype.kind not in _X_KINDS:
        raise MalformedFile("array 'x' must be 2-D with numeric values", field="file")
    if x_shape[0] > lim.max_rows:
        raise PayloadTooLarge(f"the file has more than {lim.max_rows} rows", field="rows")
    if x_shape[1] > lim.max_columns:
        raise PayloadTooLarge(f"the file has more than {lim.max_columns} columns", field="columns")
    if x_shape[1] == 0:
        raise InvalidInput("array 'x' has no feature columns", field="file")
    if y_shape != (x_shape[0],) or y_dtype.kind not in _LABEL_KINDS:
        raise MalformedFile(
            "array 'y' must be 1-D, numeric or string, one label per row of 'x'", field="file"
        )
    if len(wanted) == 3:
        c_shape, c_dtype = headers[wanted[2]]
        if c_shape != (x_shape[0],) or c_dtype.kind not in _LABEL_KINDS:
            raise InvalidInput(
                "the client array must be 1-D, numeric or string, one id per row of 'x'",
                field="client_column",
            )


def _npz_features(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(out).all(axis=0)
    if bad.any():
        j = int(np.argmax(bad))
        raise MalformedFile(
            f"column x{j} of array 'x' has missing, infinite or out-of-float32-range values",
            field="file",
        )
    return out


# --- labels, clients, split


def _encode_labels(raw: Any, lim: UploadLimits) -> tuple[np.ndarray, tuple[str, ...]]:
    codes, uniques = pd.factorize(raw, sort=True)
    if (codes < 0).any():
        raise MalformedFile("the target column has missing labels", field="target")
    if len(uniques) < 2:
        raise InvalidInput("the target column needs at least 2 distinct classes", field="target")
    if len(uniques) > lim.max_classes:
        raise InvalidInput(
            f"the target column has more than {lim.max_classes} classes", field="target"
        )
    return codes.astype(np.int64), tuple(str(u) for u in uniques)


def _encode_clients(raw: Any) -> np.ndarray:
    codes, _ = pd.factorize(raw, sort=True)
    if (codes < 0).any():
        raise MalformedFile("the client column has missing values", field="client_column")
    return codes.astype(np.int64)


def _split(
    x: np.ndarray,
    y: np.ndarray,
    clients: np.ndarray | None,
    classes: tuple[str, ...],
    feature_names: tuple[str, ...],
    *,
    seed: int,
    test_fraction: float,
) -> DatasetArrays:
    from sklearn.model_selection import train_test_split

    _check_min_rows(len(y))
    idx = np.arange(len(y))
    try:
        train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError:  # a class too small to stratify
        try:
            train, test = train_test_split(idx, test_size=test_fraction, random_state=seed)
        except ValueError:
            train = test = idx[:0]
    if len(train) == 0 or len(test) == 0:
        raise InvalidInput(
            "test_fraction leaves the train or the test split empty", field="test_fraction"
        )
    clients_train = None
    if clients is not None:
        # Renumber over the train rows so that every client index owns train data.
        clients_train = np.unique(clients[train], return_inverse=True)[1].astype(np.int64)
    return DatasetArrays(
        x_train=np.ascontiguousarray(x[train], dtype=np.float32),
        y_train=np.ascontiguousarray(y[train], dtype=np.int64),
        x_test=np.ascontiguousarray(x[test], dtype=np.float32),
        y_test=np.ascontiguousarray(y[test], dtype=np.int64),
        classes=classes,
        feature_names=feature_names,
        clients_train=clients_train,
    )


def _check_min_rows(n: int) -> None:
    if n < _MIN_ROWS:
        raise InvalidInput(f"the dataset needs at least {_MIN_ROWS} rows", field="file")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InvalidInput("seed must be an integer in 0..2**32-1", field="seed")


# --------------------------------------------------------------------------- store


def save_arrays(arrays: DatasetArrays, path: Path) -> None:
    """Write a dataset to ``path`` as an uncompressed ``.npz``, atomically.

    The arrays go to a temporary file in the same directory, which then replaces
    ``path``; readers never see a partial file.

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
            )
    except Exception:
        raise MalformedFile("the stored dataset is missing or damaged", field="file") from None
