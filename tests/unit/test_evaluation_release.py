"""Held-out metrics: exact per-unit sums from the model, a Gaussian release for analysts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ppml.privacy.evaluation import EvaluationPlan, release_metrics, release_outcome
from ppml.training.dp_sgd import evaluate


def fixed_model() -> nn.Module:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return model


def test_evaluate_sums_scores_per_unit_so_one_unit_moves_them_by_at_most_one() -> None:
    # arrange: rows 0-2 belong to client 0 (two right, one wrong), row 3 to client 1 (right)
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 0, 1])
    units = torch.tensor([0, 0, 0, 1])
    # act
    per_row = evaluate(fixed_model(), x, y, loss_clip=1.0)
    per_unit = evaluate(fixed_model(), x, y, loss_clip=1.0, units=units)
    # assert
    assert per_row["units"] == 4 and per_row["unit_correct_sum"] == 3.0
    assert per_unit["units"] == 2
    assert per_unit["unit_correct_sum"] == pytest.approx(2 / 3 + 1)
    assert per_unit["test_accuracy"] == per_row["test_accuracy"] == 0.75
    # the wrong row's loss (log(1 + e^2) ≈ 2.13) is clipped to 1 in the sums only
    assert per_row["test_loss"] > per_row["unit_clipped_loss_sum"] / 4
    assert per_row["unit_clipped_loss_sum"] <= 4 * 1.0


def gaussian_plan(z: float = 5.0) -> EvaluationPlan:
    return EvaluationPlan(mechanism="gaussian", noise_multiplier=z, loss_clip=4.0, releases=1)


AGGREGATES = {
    "test_accuracy": 0.9,
    "test_loss": 0.3,
    "rows": 400.0,
    "units": 400.0,
    "unit_correct_sum": 360.0,
    "unit_clipped_loss_sum": 120.0,
}


def test_the_released_accuracy_carries_noise_of_the_stated_size() -> None:
    rng = np.random.default_rng(0)
    draws = [release_metrics(AGGREGATES, gaussian_plan(), rng=rng) for _ in range(4000)]
    accuracies = np.array([d.test_accuracy for d in draws if d is not None])
    # assert: unbiased around the exact figure, with std z / units
    assert accuracies.mean() == pytest.approx(0.9, abs=0.002)
    assert accuracies.std() == pytest.approx(5.0 / 400, rel=0.05)
    assert draws[0] is not None
    release = draws[0].release
    assert release.mechanism == "gaussian"
    assert release.accuracy_noise_std == pytest.approx(5.0 / 400)
    assert release.noise_multiplier == 5.0 and release.loss_clip == 4.0


def test_released_figures_stay_in_their_ranges() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        out = release_metrics(AGGREGATES, gaussian_plan(z=500.0), rng=rng)
        assert out is not None
        assert 0.0 <= out.test_accuracy <= 1.0 and 0.0 <= out.test_loss <= 4.0


def test_public_data_is_released_exactly_and_withheld_metrics_are_not_released() -> None:
    exact = release_metrics(AGGREGATES, EvaluationPlan(mechanism="exact-public-data"))
    assert exact is not None and exact.test_accuracy == 0.9
    assert exact.release.mechanism == "exact-public-data"
    assert release_metrics(AGGREGATES, EvaluationPlan(mechanism="withheld")) is None


def test_a_final_score_equal_to_the_last_round_is_released_once() -> None:
    # arrange: a federated history whose last entry scored the final model
    history = [{**AGGREGATES, "round": 1.0}, {**AGGREGATES, "round": 2.0}]
    # act
    released = release_outcome(AGGREGATES, history, gaussian_plan(), rng=np.random.default_rng(2))
    # assert: the final metrics are the last release, not a third, fresh one
    assert released.history is not None and len(released.history) == 2
    assert released.metrics == released.history[-1]
    assert released.exact.metrics is not None and released.exact.metrics.test_accuracy == 0.9
    assert [entry.round for entry in released.exact.history or []] == [1, 2]
