"""The keyed train/test split, and the row-count and seed checks shared by all sources.

Each privacy unit is held out by itself: a record (record unit) or a whole client (client
unit) goes to the test side iff ``uniform(key) < test_fraction``, where the key is a keyed
hash of the unit alone under the dataset's secret (``ppml.datasets.keys``). Adding,
removing or changing one unit therefore moves no other, which a stratified split or a
permutation by position cannot promise (PRIVACY.md, "Every release is a mechanism"). The
test side's size is a sum of independent coin flips, so it varies around
``test_fraction · n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ppml.datasets.arrays import DatasetArrays
from ppml.datasets.keys import record_keys, uniform, unit_keys
from ppml.errors import InvalidInput

__all__ = ["PRIVACY_UNITS", "SPLIT_DOMAIN", "check_min_rows", "check_seed", "held_out", "split"]

PRIVACY_UNITS = ("record", "client")
SPLIT_DOMAIN = "split"
_MIN_ROWS = 10


def held_out(
    x: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    *,
    secret: str,
    test_fraction: float,
    client_ids: Sequence[str] | None = None,
    clients: np.ndarray | None = None,
) -> np.ndarray:
    """Which rows the split holds out, ``(n,)`` bool.

    Args:
        x: Features ``(n, d)``.
        labels: Each row's label string.
        secret: The dataset's secret (hex).
        test_fraction: Probability that a unit is held out.
        client_ids: The raw id of each client code (client unit only): the key of a client.
        clients: Each row's client code (client unit only).

    Returns:
        The held-out mask; a client's rows all share one side.
    """
    if client_ids is None or clients is None:
        return uniform(record_keys(secret, SPLIT_DOMAIN, x, labels)) < test_fraction
    per_client = uniform(unit_keys(secret, SPLIT_DOMAIN, client_ids)) < test_fraction
    return np.asarray(per_client[clients], dtype=bool)


def split(
    x: np.ndarray,
    y: np.ndarray,
    clients: np.ndarray | None,
    classes: tuple[str, ...],
    feature_names: tuple[str, ...],
    *,
    secret: str,
    test_fraction: float,
    unit: str = "record",
    client_ids: Sequence[str] | None = None,
) -> DatasetArrays:
    """Splits rows into train and test by keyed hashes of each privacy unit.

    Args:
        x: Features ``(n, d)``.
        y: Class indices ``(n,)`` into ``classes``.
        clients: Client code of each row, or None.
        classes: The class names (keys hash the name, not the index).
        feature_names: One per column of ``x``.
        secret: The dataset's secret (hex).
        test_fraction: Probability that a unit is held out, in (0, 1).
        unit: ``"record"``, or ``"client"``: with a client column, whole clients are held
            out, keyed by their raw ids.
        client_ids: The raw id (as a string) of each client code; required for the client
            unit.

    Returns:
        The split dataset.

    Raises:
        InvalidInput: Too few rows, or the split leaves the train or the test side empty.
    """
    if unit not in PRIVACY_UNITS:
        raise InvalidInput(
            f"privacy_unit must be one of {', '.join(PRIVACY_UNITS)}", field="privacy_unit"
        )
    check_min_rows(len(y))
    by_client = unit == "client" and clients is not None
    if by_client and client_ids is None:
        raise ValueError("a client-unit split needs the clients' raw ids")
    test = held_out(
        x,
        np.asarray(classes)[y],
        secret=secret,
        test_fraction=test_fraction,
        client_ids=client_ids if by_client else None,
        clients=clients if by_client else None,
    )
    train_rows, test_rows = np.flatnonzero(~test), np.flatnonzero(test)
    if len(train_rows) == 0 or len(test_rows) == 0:
        raise InvalidInput(
            "test_fraction leaves the train or the test split empty", field="test_fraction"
        )
    return DatasetArrays(
        x_train=np.ascontiguousarray(x[train_rows], dtype=np.float32),
        y_train=np.ascontiguousarray(y[train_rows], dtype=np.int64),
        x_test=np.ascontiguousarray(x[test_rows], dtype=np.float32),
        y_test=np.ascontiguousarray(y[test_rows], dtype=np.int64),
        classes=classes,
        feature_names=feature_names,
        clients_train=_renumbered(clients, train_rows),
        clients_test=_renumbered(clients, test_rows) if by_client else None,
    )


def _renumbered(clients: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    """Client codes renumbered over ``rows``, so that every index owns a row there."""
    if clients is None:
        return None
    return np.unique(clients[rows], return_inverse=True)[1].astype(np.int64).reshape(-1)


def check_min_rows(n: int) -> None:
    if n < _MIN_ROWS:
        raise InvalidInput(f"the dataset needs at least {_MIN_ROWS} rows", field="file")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise InvalidInput("seed must be an integer in 0..2**32-1", field="seed")
