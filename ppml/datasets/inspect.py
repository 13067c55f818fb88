"""What an upload would decode to, from its headers alone: the decompression-bomb guard.

A few hundred kilobytes of Parquet or NPZ can decode to gigabytes (constant columns compress
almost to nothing), and a short CSV line per row becomes a full row of missing values. So
before anything decodes a file, its decoded size is bounded from what the format declares:

* CSV: the header's columns times the number of lines (a row cannot span less than a line;
  lines are counted by streaming the file, in constant memory);
* Parquet: the footer's row count times each column's item size (the footer alone is read,
  and its declared length is checked first); ``total_byte_size``, which the file states
  about itself, is never trusted alone;
* NPZ: each used array's shape times its item size, from its ``.npy`` header.

Feature cells also count the float32 matrix that validation builds from them. A file whose
bound passes ``UploadLimits.max_decoded_bytes`` is refused before it is stored or read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ppml.datasets.arrays import UploadLimits
from ppml.datasets.npz import npz_headers
from ppml.datasets.tables import check_columns, column_label, read_csv_header
from ppml.errors import InvalidInput, MalformedFile, PayloadTooLarge

__all__ = ["UploadShape", "inspect_upload"]

_FLOAT32 = 4  # each feature cell again, as the float32 matrix validation builds
_CSV_CELL = 8  # pandas decodes numbers to 64 bits
_TEXT_CELL = 64  # a label or client id held as a Python string (pandas object column)
_MAX_PARQUET_FOOTER = 16 * 1024**2
_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadShape:
    """An upload as its headers declare it.

    Attributes:
        file_format: ``"csv"``, ``"parquet"`` or ``"npz"``.
        rows: the rows it declares (CSV: an upper bound, its lines after the header).
        columns: its columns (NPZ: the features of ``x``).
        decoded_bytes: the bound on what decoding and validating it would hold in memory.
        features: the feature values of a row (the columns but the target and client ones;
            NPZ: the product of a row's shape in ``x``).
        row_shape: an NPZ image's shape, ``(C, H, W)`` (``(1, H, W)`` for an ``(n, H, W)``
            array); None for a flat ``x`` and for tables.
    """

    file_format: str
    rows: int
    columns: int
    decoded_bytes: int
    features: int
    row_shape: tuple[int, ...] | None = None


def inspect_upload(
    path: Path,
    *,
    file_format: str,
    target: str | None,
    client_column: str | None,
    limits: UploadLimits,
) -> UploadShape:
    """Check an upload's declared shape and decoded size without decoding it.

    Args:
        path: the stored upload.
        file_format: ``"csv"``, ``"parquet"`` or ``"npz"``.
        target: the label column (CSV and Parquet).
        client_column: the client column or array, if any.
        limits: the row, column and decoded-size limits.

    Returns:
        The declared shape and decoded-size bound.

    Raises:
        PayloadTooLarge: too many rows or columns, or a decoded size over
            ``limits.max_decoded_bytes`` (with ``decoded_bytes`` and ``limit``).
        MalformedFile: headers that cannot be read, or a non-numeric Parquet feature column.
        InvalidInput: a missing target or client column.
    """
    if client_column is not None and client_column == target:
        raise InvalidInput("client_column must differ from target", field="client_column")
    if file_format == "npz":
        shape = _npz(path, client_column, limits)
    elif target is None:
        raise InvalidInput("a target (label) column is required", field="target")
    elif file_format == "csv":
        shape = _csv(path, target, client_column, limits)
    elif file_format == "parquet":
        shape = _parquet(path, target, client_column, limits)
    else:
        raise InvalidInput("file format must be one of csv, parquet, npz", field="file")
    if shape.rows > limits.max_rows and file_format != "csv":
        raise PayloadTooLarge(f"the file has more than {limits.max_rows} rows", field="rows")
    if shape.decoded_bytes > limits.max_decoded_bytes:
        raise PayloadTooLarge(
            f"the file would decode to about {shape.decoded_bytes} bytes "
            f"({shape.rows} rows × {shape.columns} columns); "
            f"at most {limits.max_decoded_bytes} are allowed",
            field="file",
            decoded_bytes=shape.decoded_bytes,
            limit=limits.max_decoded_bytes,
        )
    return shape


def _csv(path: Path, target: str, client_column: str | None, lim: UploadLimits) -> UploadShape:
    header = read_csv_header(path, lim)
    check_columns(header, target, client_column)
    # Quoted line breaks make this an over-count, never an under-count.
    rows = min(_data_lines(path), lim.max_rows + 1)
    text = 1 + (client_column is not None)
    features = len(header) - text
    per_row = features * (_CSV_CELL + _FLOAT32) + text * _TEXT_CELL
    return UploadShape("csv", rows, len(header), rows * per_row, features)


def _data_lines(path: Path) -> int:
    """Lines after the header (a last line without a newline counts)."""
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return max(lines + (last != b"\n") - 1, 0)


def _parquet(path: Path, target: str, client_column: str | None, lim: UploadLimits) -> UploadShape:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _check_parquet_footer(path)
    try:
        pf = pq.ParquetFile(path)  # reads the footer only
        meta, schema = pf.metadata, pf.schema_arrow
    except Exception:  # reader messages may quote data: never chain or echo them
        raise MalformedFile("the file is not a valid Parquet file", field="file") from None
    names = [str(n) for n in schema.names]
    if max(meta.num_columns, len(names)) > lim.max_columns:
        raise PayloadTooLarge(f"the file has more than {lim.max_columns} columns", field="columns")
    check_columns(names, target, client_column)
    per_row = 0
    for i, field in enumerate(schema):
        if field.name in (target, client_column):
            kind = field.type
            fixed = pa.types.is_integer(kind) or pa.types.is_floating(kind)
            per_row += max(kind.bit_width // 8, 1) if fixed else _TEXT_CELL
        else:
            per_row += _parquet_feature_bytes(field, i, pa)
    rows = int(meta.num_rows)
    features = len(names) - 1 - (client_column is not None)
    return UploadShape("parquet", rows, len(names), rows * per_row, features)


def _check_parquet_footer(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as handle:
        handle.seek(max(size - 8, 0))
        tail = handle.read(8)
    if len(tail) < 8 or tail[4:] != b"PAR1":
        raise MalformedFile("the file is not a valid Parquet file", field="file")
    footer = int.from_bytes(tail[:4], "little")
    if footer > size - 12:
        raise MalformedFile("the file is not a valid Parquet file", field="file")
    if footer > _MAX_PARQUET_FOOTER:
        raise PayloadTooLarge(
            f"the Parquet metadata is larger than {_MAX_PARQUET_FOOTER} bytes", field="file"
        )


def _parquet_feature_bytes(field: Any, index: int, pa: Any) -> int:
    kind = field.type
    if pa.types.is_boolean(kind):
        return 1 + _FLOAT32
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return int(kind.bit_width) // 8 + _FLOAT32
    # Refused now rather than after decoding: features must be numbers.
    raise MalformedFile(f"{column_label(str(field.name), index)} is not numeric", field="file")


def _npz(path: Path, client_column: str | None, lim: UploadLimits) -> UploadShape:
    headers = npz_headers(path, client_column, lim)
    rows, *row = headers["x"][0]
    columns = math.prod(row)
    decoded = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
    image = tuple(row) if len(row) == 3 else (1, *row) if len(row) == 2 else None
    return UploadShape("npz", rows, columns, decoded + rows * columns * _FLOAT32, columns, image)
