"""Labels mapped to ``int64`` class indices, and client ids to dense codes with their names.

Declared labels (the upload's ``schema.classes``): class ``i`` is the ``i``-th declared
name, and a row whose label is not declared is refused without echoing it. Without a
declaration (public data only), the classes are the distinct values in sorted order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ppml.datasets.arrays import UploadLimits
from ppml.datasets.schema import canonical_label
from ppml.errors import InvalidInput, MalformedFile


def _factorize(raw: Any, missing: MalformedFile) -> tuple[np.ndarray, list[str]]:
    """Codes of the distinct values and each value's canonical spelling."""
    try:
        codes, uniques = pd.factorize(raw, sort=True)
    except TypeError:  # values of mixed types that do not sort together
        codes, uniques = pd.factorize(raw, sort=False)
    if (codes < 0).any():
        raise missing
    names = [canonical_label(u) for u in uniques]
    if any("\x00" in name for name in names):  # text the database cannot store
        raise MalformedFile("a value holds a NUL character", field=missing.field)
    return codes.astype(np.int64), names


def encode_labels(
    raw: Any, lim: UploadLimits, declared: tuple[str, ...] | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    codes, names = _factorize(
        raw, MalformedFile("the target column has missing labels", field="target")
    )
    if declared is not None:
        index = {canonical_label(name): i for i, name in enumerate(declared)}
        mapping = np.array([index.get(name, -1) for name in names], dtype=np.int64)
        if (mapping < 0).any():
            raise InvalidInput(
                "the target column holds a label that schema.classes does not declare",
                field="schema.classes",
            )
        return mapping[codes], declared
    classes = tuple(dict.fromkeys(names))  # sorted distinct values, spellings merged
    if len(classes) < 2:
        raise InvalidInput("the target column needs at least 2 distinct classes", field="target")
    if len(classes) > lim.max_classes:
        raise InvalidInput(
            f"the target column has more than {lim.max_classes} classes", field="target"
        )
    position = {name: i for i, name in enumerate(classes)}
    mapping = np.array([position[name] for name in names], dtype=np.int64)
    return mapping[codes], classes


def encode_clients(raw: Any) -> tuple[np.ndarray, tuple[str, ...]]:
    """Dense client codes ``0..C-1`` and each code's id as a string (the id keys the split)."""
    codes, names = _factorize(
        raw, MalformedFile("the client column has missing values", field="client_column")
    )
    ids = tuple(dict.fromkeys(names))
    position = {name: i for i, name in enumerate(ids)}
    mapping = np.array([position[name] for name in names], dtype=np.int64)
    return mapping[codes], ids
