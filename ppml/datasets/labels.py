"""Labels and client ids mapped to dense ``int64`` codes, in sorted order of the raw values."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ppml.datasets.arrays import UploadLimits
from ppml.errors import InvalidInput, MalformedFile


def encode_labels(raw: Any, lim: UploadLimits) -> tuple[np.ndarray, tuple[str, ...]]:
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


def encode_clients(raw: Any) -> np.ndarray:
    codes, _ = pd.factorize(raw, sort=True)
    if (codes < 0).any():
        raise MalformedFile("the client column has missing values", field="client_column")
    return codes.astype(np.int64)
