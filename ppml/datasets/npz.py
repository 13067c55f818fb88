"""NPZ uploads: arrays ``x`` and ``y`` (and a client array), checked from headers before loading.

``x`` is ``(n, d)`` features, or images ``(n, C, H, W)`` or ``(n, H, W)``: an image's pixels
become one flat row in C order, and the image shape is the dataset's declared input shape
(:func:`ppml.datasets.inspect.inspect_upload` reads it from the header).
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from ppml.datasets.arrays import UploadLimits
from ppml.datasets.tables import shown
from ppml.errors import InvalidInput, MalformedFile, PayloadTooLarge

_X_KINDS = "biuf"  # bool, signed/unsigned int, float
_LABEL_KINDS = "biufU"


Headers = dict[str, tuple[tuple[int, ...], np.dtype[Any]]]


def npz_headers(path: Path, client_column: str | None, lim: UploadLimits) -> Headers:
    """The arrays an upload uses (``x``, ``y``, the client array), checked from their headers.

    Nothing is decompressed but each member's ``.npy`` header.
    """
    if client_column in ("x", "y"):
        raise InvalidInput(
            "client_column must name an array other than x and y", field="client_column"
        )
    wanted = ["x", "y"] + ([client_column] if client_column is not None else [])
    headers = inspect_npz(path, lim)
    for name in ("x", "y"):
        if name not in headers:
            raise MalformedFile(f"the NPZ archive has no array named {name!r}", field="file")
    if client_column is not None and client_column not in headers:
        raise InvalidInput(
            f"the NPZ archive has no array named {shown(client_column)!r}", field="client_column"
        )
    check_npz_shapes(headers, wanted, lim)
    return {name: headers[name] for name in wanted}


def read_npz(
    path: Path, client_column: str | None, lim: UploadLimits
) -> tuple[np.ndarray, Any, Any, tuple[str, ...]]:
    wanted = list(npz_headers(path, client_column, lim))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = [np.asarray(npz[name]) for name in wanted]
    except Exception:  # object arrays raise ValueError here; corrupt members anything
        raise MalformedFile(
            "the NPZ archive could not be loaded (object arrays and pickles are refused)",
            field="file",
        ) from None
    x = _npz_features(arrays[0].reshape(len(arrays[0]), -1))
    clients = arrays[2] if client_column is not None else None
    return x, arrays[1], clients, tuple(f"x{j}" for j in range(x.shape[1]))


def inspect_npz(path: Path, lim: UploadLimits) -> Headers:
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


def check_npz_shapes(headers: Headers, wanted: list[str], lim: UploadLimits) -> None:
    (x_shape, x_dtype), (y_shape, y_dtype) = headers["x"], headers["y"]
    if not 2 <= len(x_shape) <= 4 or x_dtype.kind not in _X_KINDS:
        raise MalformedFile(
            "array 'x' must be numeric, (n, d) features or (n, C, H, W) or (n, H, W) images",
            field="file",
        )
    if x_shape[0] > lim.max_rows:
        raise PayloadTooLarge(f"the file has more than {lim.max_rows} rows", field="rows")
    features = math.prod(x_shape[1:])
    if features > lim.max_columns:
        raise PayloadTooLarge(
            f"the file has more than {lim.max_columns} columns (features per row)",
            field="columns",
        )
    if features == 0:
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
