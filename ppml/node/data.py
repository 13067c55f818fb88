"""The node's local data: read with ppml's own upload readers, checked against the federation's
schema. The rows never leave this machine; what is sent is a :class:`SchemaCheck` (pass or
fail, the row count, and a message that names the problem, never a value).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from ppml.datasets.arrays import UploadLimits
from ppml.datasets.schema import DatasetSchema, check_bounds, check_input_shape
from ppml.datasets.uploads import detect_format, parse_upload
from ppml.errors import PPMLError

__all__ = ["LocalData", "SchemaCheck", "load_local", "parse_federation_schema"]

# Keys a federation schema may hold besides DatasetSchema's own (checked here too).
_NAMES_KEYS = ("features", "feature_names")
_COUNT_KEY = "num_features"


@dataclass(frozen=True, kw_only=True)
class SchemaCheck:
    """What a node reports about its data: nothing but these three fields."""

    ok: bool
    rows: int | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": self.rows, "message": self.message}


@dataclass(frozen=True, eq=False, kw_only=True)
class LocalData:
    """The node's rows as training reads them (every row trains: nodes hold nothing out).

    Attributes:
        x: float32 features ``(n, d)``, C-contiguous.
        y: int64 class indices, in the order of the schema's classes.
        classes: The federation's declared classes.
        feature_names: One name per feature column.
        check: The schema check the server is told.
    """

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    feature_names: tuple[str, ...]
    check: SchemaCheck

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])


class SchemaMismatch(PPMLError):
    """The local data does not fit the federation's schema (the message names the problem)."""

    code = "schema-mismatch"
    title = "Schema mismatch"


def parse_federation_schema(raw: dict[str, Any]) -> tuple[DatasetSchema, dict[str, Any]]:
    """The federation's schema as the dataset schema uploads declare, and the extra keys.

    Raises:
        SchemaMismatch: the schema is not one this node can check (unknown keys fail closed:
            a constraint this version cannot check must not pass silently).
    """
    known = set(DatasetSchema.model_fields)
    extra = {k: v for k, v in raw.items() if k not in known}
    unknown = sorted(set(extra) - {*_NAMES_KEYS, _COUNT_KEY})
    if unknown:
        raise SchemaMismatch(
            f"the federation's schema declares {', '.join(unknown)}, which this node's "
            "version cannot check; upgrade ppml"
        )
    try:
        schema = DatasetSchema.model_validate({k: v for k, v in raw.items() if k in known})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "schema"
        raise SchemaMismatch(
            f"the federation's schema is invalid: {where}: {first['msg']}"
        ) from None
    return schema, extra


def load_local(path: Path, *, target: str, schema: dict[str, Any]) -> LocalData:
    """Read ``path`` (CSV, Parquet or NPZ) and check it against the federation's ``schema``.

    Args:
        path: The local data file.
        target: The label column (CSV and Parquet; NPZ uses its ``y`` array).
        schema: The federation's schema object (``classes``, optionally ``input_shape``,
            ``bounds``, ``features``/``feature_names`` or ``num_features``).

    Returns:
        The rows and a passing check.

    Raises:
        SchemaMismatch: the file cannot be read, or does not fit the schema; its message is
            what the server is told (it names columns and counts, never values).
    """
    declared, extra = parse_federation_schema(schema)
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise SchemaMismatch(f"the data file cannot be read ({exc.strerror})") from None
    try:
        file_format = detect_format(path.name, head)
        arrays = parse_upload(
            path,
            file_format=file_format,
            target=target,
            limits=UploadLimits(),
            schema=declared,
        )
        check_input_shape(declared.input_shape, arrays.num_features)
        check_bounds(declared, arrays.num_features)
    except PPMLError as exc:
        raise SchemaMismatch(exc.detail) from None
    _check_features(arrays.feature_names, extra, by_name=file_format != "npz")
    x = np.ascontiguousarray(np.concatenate([arrays.x_train, arrays.x_test]))
    y = np.concatenate([arrays.y_train, arrays.y_test])
    rows = int(x.shape[0])
    message = (
        f"{rows} rows, {arrays.num_features} features, labels within the "
        f"{len(declared.classes)} declared classes"
    )
    return LocalData(
        x=x,
        y=y,
        classes=tuple(declared.classes),
        feature_names=arrays.feature_names,
        check=SchemaCheck(ok=True, rows=rows, message=message),
    )


def _check_features(names: tuple[str, ...], extra: dict[str, Any], *, by_name: bool) -> None:
    """Declared feature columns: their count, and for tables their names in order (an NPZ
    array's columns have no names)."""
    count = extra.get(_COUNT_KEY)
    if count is not None and int(count) != len(names):
        raise SchemaMismatch(
            f"the federation's schema declares {int(count)} features; the data has {len(names)}"
        )
    declared = next((extra[k] for k in _NAMES_KEYS if extra.get(k) is not None), None)
    if declared is None:
        return
    wanted = [str(n) for n in declared]
    if len(wanted) != len(names):
        raise SchemaMismatch(
            f"the federation's schema declares {len(wanted)} features; the data has {len(names)}"
        )
    if not by_name:
        return
    for i, (want, have) in enumerate(zip(wanted, names, strict=True)):
        if want != have:
            raise SchemaMismatch(
                f"feature {i + 1} must be {want!r} (in the schema's order); the data has "
                f"{_shown(have)!r} there"
            )


def _shown(name: str) -> str:
    return name if len(name) <= 64 else name[:64] + "..."
