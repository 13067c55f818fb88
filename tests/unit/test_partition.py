"""Statistics of the federated partitioners (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from ppml.datasets.keys import record_keys
from ppml.training.federated.partition import column, dirichlet, iid, partition

N_CLASSES = 10
LABELS = np.repeat(np.arange(N_CLASSES), 200)  # 2,000 rows, balanced
SECRET = "5e" * 32


def keys_of(labels: np.ndarray, domain: str = "iid:0") -> np.ndarray:
    """Real record keys of distinct rows with these labels."""
    x = np.arange(len(labels), dtype=np.float32).reshape(-1, 1)
    return record_keys(SECRET, domain, x, labels.astype(str))


KEYS = keys_of(LABELS)


def _check_disjoint_and_complete(
    parts: list[np.ndarray], n: int, *, non_empty: bool = False
) -> None:
    joined = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert all(len(p) >= 1 for p in parts) or not non_empty
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def _mean_label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of the clients' label distributions from the global one."""
    overall = np.bincount(labels, minlength=N_CLASSES) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=N_CLASSES) / len(p) - overall).sum()
        for p in parts
        if len(p)
    ]
    return float(np.mean(distances))


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param(lambda: iid(KEYS, 7), id="iid"),
        pytest.param(lambda: dirichlet(LABELS, KEYS, 20, 0.1, seed=0), id="dirichlet-0.1"),
        pytest.param(lambda: dirichlet(LABELS, KEYS, 20, 100.0, seed=0), id="dirichlet-100"),
    ],
)
def test_keyed_partitions_are_disjoint_and_complete(parts: object) -> None:
    # act
    result = parts()  # type: ignore[operator]

    # assert
    _check_disjoint_and_complete(result, len(LABELS))


def test_column_partition_is_disjoint_complete_and_non_empty() -> None:
    _check_disjoint_and_complete(column(LABELS % 13), len(LABELS), non_empty=True)


def test_iid_sizes_are_binomial() -> None:
    # arrange: each record picks its client by its own key, so sizes are Binomial(n, 1/k)
    keys = keys_of(np.arange(1003) % 3)

    # act
    sizes = [len(p) for p in iid(keys, 10)]

    # assert
    assert sum(sizes) == 1003
    assert all(abs(s - 100.3) <= 6 * (1003 * 0.1 * 0.9) ** 0.5 for s in sizes)


def test_small_alpha_skews_labels_far_more_than_large_alpha() -> None:
    # act
    skew_small = _mean_label_skew(LABELS, dirichlet(LABELS, KEYS, 20, 0.1, seed=1))
    skew_large = _mean_label_skew(LABELS, dirichlet(LABELS, KEYS, 20, 100.0, seed=1))
    skew_iid = _mean_label_skew(LABELS, iid(KEYS, 20))

    # assert: alpha = 0.1 leaves most clients with a few classes; alpha = 100 is near iid
    assert skew_small > 0.5
    assert skew_large < 0.15
    assert skew_small > 4 * skew_large
    assert skew_iid < 0.15


def test_partitions_are_deterministic_for_keys_and_seed() -> None:
    first = dirichlet(LABELS, KEYS, 20, 0.5, seed=7)
    again = dirichlet(LABELS, KEYS, 20, 0.5, seed=7)
    other_seed = dirichlet(LABELS, KEYS, 20, 0.5, seed=8)
    other_keys = dirichlet(LABELS, keys_of(LABELS, "dirichlet:1"), 20, 0.5, seed=7)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_seed, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other_keys, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(iid(KEYS, 4), iid(KEYS, 4), strict=True))


def test_dirichlet_leaves_clients_empty_rather_than_moving_records() -> None:
    # arrange: 60 rows over 50 clients at a tiny alpha: most clients get nothing
    labels = np.arange(60) % 3

    # act
    parts = dirichlet(labels, keys_of(labels), 50, 0.01, seed=0)

    # assert: no refilling from other records
    _check_disjoint_and_complete(parts, 60)
    assert sum(len(p) == 0 for p in parts) > 0


def test_column_uses_the_distinct_ids_in_order() -> None:
    ids = np.array([5, 5, 9, 2, 9, 5], dtype=np.int64)

    parts = column(ids)

    assert [p.tolist() for p in parts] == [[3], [0, 1, 5], [2, 4]]
    with pytest.raises(ValueError, match="holds 3 clients"):
        partition("column", labels=np.zeros(6), num_clients=4, alpha=1.0, seed=0, clients_train=ids)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(KEYS[:5], 6), "must not exceed"),
        (lambda: iid(KEYS[:5], 0), "positive"),
        (lambda: iid(np.arange(5), 2), "uint64"),
        (lambda: dirichlet(LABELS, KEYS, 5, 0.0, seed=0), "alpha"),
        (lambda: dirichlet(LABELS, KEYS[:5], 5, 1.0, seed=0), "one entry per row"),
        (lambda: column(np.array([0, -1])), "negative"),
        (lambda: partition("column", labels=LABELS, num_clients=2, alpha=1, seed=0), "client col"),
        (lambda: partition("shards", labels=LABELS, num_clients=2, alpha=1, seed=0), "unknown"),
        (lambda: partition("iid", labels=LABELS, num_clients=2, alpha=1, seed=0), "one key"),
    ],
)
def test_partitioners_refuse_bad_arguments(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
