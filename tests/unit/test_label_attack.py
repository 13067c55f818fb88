"""Attack regression: recovering a held-out row's label from released metrics.

The audit's attack: an analyst holds the released model, the released ``test_loss`` and
every held-out row but one target's label. The loss the target alone contributes, the
released figure minus the others', names the target's label. Against exact metrics it
wins almost always; against the Gaussian release it may win no more often than DP allows.

The game, at the mechanism level: one trained model; for each of 300 targets a secret label
is drawn uniformly from the K classes (prior p = 1/K), the held-out set is scored with it
through the production ``evaluate`` and ``release_metrics`` (fresh noise each draw), and the
attacker picks the most likely label given both released figures. Changing a label is a
replace-one change, so the bound is ``e^{2ε}·p + δ`` with ε of one release; the test allows
three binomial standard deviations of 300 draws above it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from ppml.privacy.evaluation import EvaluationPlan, release_metrics
from ppml.specs import ModelSpec
from ppml.training.dp_sgd import TrainingPlan, evaluate, initial_model, train

TARGETS = 300
DELTA = 1e-5
# A loose bound, so clipping alone hides little: the noise must do the protecting.
LOSS_CLIP = 30.0


def trained_digits_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, y_train, x_test, y_test = x[:1437], y[:1437], x[1437:], y[1437:]
    plan = TrainingPlan(
        model=ModelSpec(arch="logreg"),
        epochs=10,
        batch_size=64,
        learning_rate=0.5,
        optimizer="sgd",
        steps_per_epoch=23,
        total_steps=230,
    )
    result = train(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=10,
        plan=plan,
        dp=None,
        device="cpu",
    )
    model = initial_model(plan, 64, 10)
    model.load_state_dict(result.state_dict)
    model.eval()
    return model, torch.from_numpy(x_test), torch.from_numpy(y_test)


def production_noise() -> float:
    """The evaluation σ pricing gives a typical job: ε = 3 on digits, default 3% share."""
    _sigma, z = cal.calibrate_with_evaluation(
        target_epsilon=3.0,
        delta=DELTA,
        sample_rate=128 / 1437,
        steps=30 * 12,
        unit="record",
        eval_releases=2,
        eval_share=0.03,
    )
    return z


def attack_success(release: str, z: float | None = None) -> tuple[float, float]:
    """(success rate, the DP bound on it) of the label-recovery attack on ``release``.

    ``z`` overrides the production evaluation noise (to show the attack's power).
    """
    model, x, y = trained_digits_model()
    with torch.no_grad():
        return _attack(model, x, y, release, z or production_noise())


def _attack(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, release: str, z: float
) -> tuple[float, float]:
    logits = model(x)
    k = logits.shape[1]
    # Per-row loss and correctness of every candidate label: what the attacker computes.
    candidates = torch.arange(k)
    loss = torch.stack(
        [F.cross_entropy(logits, torch.full((len(x),), c), reduction="none") for c in range(k)],
        dim=1,
    )
    correct = (logits.argmax(1)[:, None] == candidates[None, :]).double()
    plan = EvaluationPlan(mechanism="gaussian", noise_multiplier=z, loss_clip=LOSS_CLIP)
    rng = np.random.default_rng(2026)
    targets = rng.choice(len(x), size=TARGETS, replace=True)
    wins = 0
    for target in targets:
        secret = int(rng.integers(k))
        labels = y.clone()
        labels[target] = secret
        scores = evaluate(model, x, labels, loss_clip=LOSS_CLIP)
        others = torch.ones(len(x), dtype=torch.bool)
        others[target] = False
        rows = torch.arange(len(x))[others]
        if release == "exact":
            # The old behaviour: test_loss released exactly (mean over rows, unclipped).
            residual = scores["test_loss"] * len(x) - float(loss[rows, labels[rows]].sum())
            guess = int(torch.argmin((loss[target] - residual).abs()))
        else:
            out = release_metrics(scores, plan, rng=rng)
            assert out is not None
            units = out.release.units
            clipped = loss.clamp(max=LOSS_CLIP)
            base_correct = float(correct[rows, labels[rows]].sum())
            base_loss = float(clipped[rows, labels[rows]].sum())
            a = out.test_accuracy * units - base_correct - correct[target]
            b = out.test_loss * units - base_loss - clipped[target]
            log_likelihood = -(a**2) / (2 * z**2) - b**2 / (2 * (z * LOSS_CLIP) ** 2)
            guess = int(torch.argmax(log_likelihood))
        wins += guess == secret
    epsilon = acc.epsilon(acc.evaluation_curve(z, 2), DELTA)
    bound = min(1.0, math.exp(min(2 * epsilon, 50.0)) / k + DELTA)
    return wins / TARGETS, bound


def test_exact_held_out_loss_gives_away_the_missing_label() -> None:
    # The negative control: what main released before this change.
    rate, _bound = attack_success("exact")
    assert rate >= 0.95


def test_the_released_metrics_let_the_attack_win_no_more_than_dp_allows() -> None:
    rate, bound = attack_success("gaussian")
    margin = 3 * math.sqrt(bound * (1 - bound) / TARGETS)
    assert bound < 0.5  # the release protects at all: far from the exact attack's rate
    assert rate <= bound + margin, (rate, bound, margin)


def test_the_attack_has_the_power_to_catch_a_mechanism_with_too_little_noise() -> None:
    # A release that added a thousandth of the noise it is charged for breaks the bound of
    # the production σ: the test above would fail on such a mechanism.
    _rate, bound = attack_success("gaussian")
    weak, _ = attack_success("gaussian", z=production_noise() / 1000)
    assert weak > bound + 3 * math.sqrt(bound * (1 - bound) / TARGETS)
