"""PATE's pieces without a service: the keyed partition of the teachers, the vote counts,
GNMax's noisy argmax and its data-independent cost, and the job spec."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest

from ppml.datasets.arrays import DatasetArrays
from ppml.jobs.pate import teacher_partitions
from ppml.privacy import accounting as acc
from ppml.privacy import gnmax
from ppml.specs import JobSpec

SECRET = "ab" * 32


def _arrays(x: np.ndarray, y: np.ndarray) -> DatasetArrays:
    return DatasetArrays(
        x_train=x.astype(np.float32),
        y_train=y.astype(np.int64),
        x_test=x[:1].astype(np.float32),
        y_test=y[:1].astype(np.int64),
        classes=("a", "b", "c"),
        feature_names=("f0", "f1", "f2"),
    )


def test_every_record_is_in_exactly_one_teacher_and_removing_one_moves_no_other() -> None:
    # arrange
    rng = np.random.default_rng(0)
    x, y = rng.random((400, 3)), rng.integers(0, 3, 400)
    # act
    parts = teacher_partitions(_arrays(x, y), secret=SECRET, teachers=7, seed=0)
    without = teacher_partitions(_arrays(x[1:], y[1:]), secret=SECRET, teachers=7, seed=0)
    # assert
    rows = np.concatenate(parts)
    assert sorted(rows.tolist()) == list(range(400))  # disjoint and covering
    owner = {int(r): t for t, part in enumerate(parts) for r in part}
    owner_without = {int(r) + 1: t for t, part in enumerate(without) for r in part}
    assert all(owner[r] == owner_without[r] for r in range(1, 400))
    assert all(len(part) > 20 for part in parts)


def test_the_partition_depends_on_the_secret() -> None:
    # arrange
    rng = np.random.default_rng(1)
    arrays = _arrays(rng.random((200, 3)), rng.integers(0, 3, 200))
    # act
    one = teacher_partitions(arrays, secret=SECRET, teachers=4, seed=0)
    other = teacher_partitions(arrays, secret="cd" * 32, teachers=4, seed=0)
    # assert
    assert any(not np.array_equal(a, b) for a, b in zip(one, other, strict=True))


def test_each_teacher_casts_exactly_one_vote() -> None:
    # arrange
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 5, 3))
    # act
    counts = gnmax.vote_counts(logits, 3)
    # assert
    assert counts.shape == (6, 3) and (counts.sum(axis=1) == 5).all()
    assert (
        counts.argmax(axis=1)
        == np.array([np.bincount(r, minlength=3).argmax() for r in logits.argmax(axis=2)])
    ).all()


def test_noisy_argmax_follows_a_clear_majority_and_is_noisy_on_ties() -> None:
    # arrange
    rng = np.random.default_rng(3)
    clear = np.tile(np.array([[0, 90, 10]]), (200, 1))
    tie = np.tile(np.array([[50, 50, 0]]), (2000, 1))
    # act
    clear_answers = gnmax.noisy_argmax(clear, 5.0, rng)
    tie_answers = gnmax.noisy_argmax(tie, 5.0, rng)
    # assert
    assert (clear_answers == 1).all()
    assert 0.4 < (tie_answers == 0).mean() < 0.6


def test_a_batch_is_charged_at_least_n_over_sigma_squared_at_every_order() -> None:
    # arrange
    sigma, n = 7.3, 13
    # act
    curve = acc.rdp_curve(gnmax.gnmax_event(n, sigma))
    # assert: α·n/σ² in the ledger's units, never rounded down
    exact = [order * n / sigma**2 * acc.UNITS_PER_NAT for order in acc.ORDERS]
    assert all(units >= value for units, value in zip(curve, exact, strict=True))
    assert gnmax.gnmax_rho(n, sigma) >= n / sigma**2


@pytest.mark.parametrize("target", [0.1, 0.5, 2.0])
def test_sigma_for_a_query_epsilon_spends_at_most_that_epsilon(target: float) -> None:
    # act
    sigma = gnmax.sigma_for(query_epsilon=target, delta=1e-5)
    # assert: the ledger's curve of one answer converts to at most the target, and a
    # slightly smaller sigma would not
    assert acc.epsilon(acc.rdp_curve(gnmax.gnmax_event(1, sigma)), 1e-5) <= target
    smaller = gnmax.gnmax_event(1, sigma * 0.99)
    assert acc.epsilon(acc.rdp_curve(smaller), 1e-5) > target
    assert math.isfinite(sigma)


def _spec(**changes: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "name": "p",
        "dataset_id": "ds_x",
        "kind": "pate",
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
        "privacy": None,
        "pate": {"teachers": 4, "sigma": 10.0},
    }
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    "changes",
    [
        {"pate": None},
        {"pate": {"teachers": 4}},
        {"pate": {"teachers": 4, "sigma": 10.0, "query_epsilon": 1.0}},
        {"privacy": {"target_epsilon": 1.0}},
        {"kind": "train"},
        {"federated": {"num_clients": 2, "clients_per_round": 2, "rounds": 1}},
    ],
)
def test_wrong_pate_specs_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        JobSpec.model_validate(_spec(**changes))


def test_a_pate_spec_validates() -> None:
    spec = JobSpec.model_validate(_spec())
    assert spec.pate is not None and spec.pate.sigma == 10.0
