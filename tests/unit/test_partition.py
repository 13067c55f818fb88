"""Statistics of the federated partitioners (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from ppml.training.federated.partition import column, dirichlet, iid, partition

N_CLASSES = 10
LABELS = np.repeat(np.arange(N_CLASSES), 200)  # 2,000 rows, balanced


def _check_disjoint_and_complete(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert all(len(p) >= 1 for p in parts)
    assert len(joined) == n
    assert np.array_equal(np.sort(joined), np.arange(n))


def _mean_label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance of the clients' label distributions from the global one."""
    overall = np.bincount(labels, minlength=N_CLASSES) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=N_CLASSES) / len(p) - overall).sum()
        for p in parts
    ]
    return float(np.mean(distances))


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param(lambda: iid(len(LABELS), 7, seed=0), id="iid"),
        pytest.param(lambda: dirichlet(LABELS, 20, 0.1, seed=0), id="dirichlet-0.1"),
        pytest.param(lambda: dirichlet(LABELS, 20, 100.0, seed=0), id="dirichlet-100"),
        pytest.param(lambda: column(LABELS % 13), id="column"),
    ],
)
def test_partitions_are_disjoint_complete_and_non_empty(parts: object) -> None:
    # act
    result = parts()  # type: ignore[operator]

    # assert
    _check_disjoint_and_complete(result, len(LABELS))


def test_iid_sizes_are_balanced() -> None:
    sizes = [len(p) for p in iid(1003, 10, seed=3)]

    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1003


def test_small_alpha_skews_labels_far_more_than_large_alpha() -> None:
    # act
    skew_small = _mean_label_skew(LABELS, dirichlet(LABELS, 20, 0.1, seed=1))
    skew_large = _mean_label_skew(LABELS, dirichlet(LABELS, 20, 100.0, seed=1))
    skew_iid = _mean_label_skew(LABELS, iid(len(LABELS), 20, seed=1))

    # assert: alpha = 0.1 leaves most clients with a few classes; alpha = 100 is near iid
    assert skew_small > 0.5
    assert skew_large < 0.15
    assert skew_small > 4 * skew_large
    assert skew_iid < 0.15


def test_partitions_are_deterministic_for_a_seed() -> None:
    first = dirichlet(LABELS, 20, 0.5, seed=7)
    again = dirichlet(LABELS, 20, 0.5, seed=7)
    other = dirichlet(LABELS, 20, 0.5, seed=8)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(
        np.array_equal(a, b) for a, b in zip(iid(50, 4, seed=1), iid(50, 4, seed=1), strict=True)
    )


def test_dirichlet_rebalances_empty_clients_minimally() -> None:
    # arrange: 60 rows over 50 clients at a tiny alpha leaves most clients empty at first
    labels = np.arange(60) % 3

    # act
    parts = dirichlet(labels, 50, 0.01, seed=0)

    # assert: everyone has a row (the check includes non-emptiness)
    _check_disjoint_and_complete(parts, 60)


def test_column_uses_the_distinct_ids_in_order() -> None:
    ids = np.array([5, 5, 9, 2, 9, 5], dtype=np.int64)

    parts = column(ids)

    assert [p.tolist() for p in parts] == [[3], [0, 1, 5], [2, 4]]
    with pytest.raises(ValueError, match="holds 3 clients"):
        partition("column", labels=np.zeros(6), num_clients=4, alpha=1.0, seed=0, clients_train=ids)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: iid(5, 6, seed=0), "must not exceed"),
        (lambda: iid(5, 0, seed=0), "positive"),
        (lambda: dirichlet(LABELS, 5, 0.0, seed=0), "alpha"),
        (lambda: column(np.array([0, -1])), "negative"),
        (lambda: partition("column", labels=LABELS, num_clients=2, alpha=1, seed=0), "client col"),
        (lambda: partition("shards", labels=LABELS, num_clients=2, alpha=1, seed=0), "unknown"),
    ],
)
def test_partitioners_refuse_bad_arguments(call: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()  # type: ignore[operator]
