"""The stratified train/test split, and the row-count and seed checks shared by all sources."""

from __future__ import annotations

import numpy as np

from ppml.datasets.arrays import DatasetArrays
from ppml.errors import InvalidInput

_MIN_ROWS = 10


def split(
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

    check_min_rows(len(y))
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


def check_min_rows(n: int) -> None:
    if n < _MIN_ROWS:
        raise InvalidInput(f"the dataset needs at least {_MIN_ROWS} rows", field="file")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InvalidInput("seed must be an integer in 0..2**32-1", field="seed")
