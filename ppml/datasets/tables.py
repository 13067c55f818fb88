"""CSV and Parquet uploads read into a feature matrix, a label column and a client column."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ppml.datasets.arrays import UploadLimits
from ppml.datasets.split import check_min_rows
from ppml.errors import InvalidInput, MalformedFile, PayloadTooLarge

# Header names may average this many bytes; a longer first line is refused unread.
_HEADER_BYTES_PER_COLUMN = 1024
_NAME_SHOWN_CHARS = 64


def read_table(
    path: Path, file_format: str, target: str | None, client_column: str | None, lim: UploadLimits
) -> tuple[np.ndarray, Any, Any, tuple[str, ...]]:
    if target is None:
        raise InvalidInput("a target (label) column is required", field="target")
    if file_format == "csv":
        header = read_csv_header(path, lim)
        check_columns(header, target, client_column)
        frame = _read_csv_body(path, header, lim)
    else:
        frame = _read_parquet(path, target, client_column, lim)
    if len(frame) > lim.max_rows:
        raise PayloadTooLarge(f"the file has more than {lim.max_rows} rows", field="rows")
    check_min_rows(len(frame))
    x, names = _features(frame, (target, client_column))
    clients = frame[client_column] if client_column is not None else None
    return x, frame[target], clients, names


def read_csv_header(path: Path, lim: UploadLimits) -> list[str]:
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
    check_columns(names, target, client_column)
    try:
        frame: pd.DataFrame = pf.read().to_pandas()  # pyarrow is untyped
        return frame
    except MemoryError:
        raise
    except Exception:
        raise MalformedFile("the Parquet file could not be read", field="file") from None


def check_columns(names: list[str], target: str, client_column: str | None) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name.strip():
            raise MalformedFile(f"column {i + 1} has an empty name", field="file")
        if name in seen:
            raise MalformedFile(f"duplicate column name: {column_label(name, i)}", field="file")
        seen.add(name)
    if target not in seen:
        raise InvalidInput(
            f"target column {shown(target)!r} is not in the file's header", field="target"
        )
    if client_column is not None and client_column not in seen:
        raise InvalidInput(
            f"client column {shown(client_column)!r} is not in the file's header",
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
            raise MalformedFile(f"{column_label(name, i)} is not numeric", field="file")
        if series.isna().any():
            raise MalformedFile(f"{column_label(name, i)} has missing values", field="file")
        with np.errstate(over="ignore", invalid="ignore"):
            x[:, j] = series.to_numpy(dtype=np.float64)
        if not np.isfinite(x[:, j]).all():
            raise MalformedFile(
                f"{column_label(name, i)} has infinite values or values beyond float32 range",
                field="file",
            )
    return x, tuple(name for _, name in cols)


def column_label(name: str, index: int) -> str:
    """How an error names a column: its position, and its name unless it looks like data."""
    # A numeric-looking "name" usually means the header row is data: show its position only.
    with contextlib.suppress(ValueError):
        float(name)
        return f"column {index + 1}"
    return f"column {index + 1} ({shown(name)!r})"


def shown(name: str) -> str:
    return name if len(name) <= _NAME_SHOWN_CHARS else name[:_NAME_SHOWN_CHARS] + "..."
