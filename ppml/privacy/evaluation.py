"""Held-out metrics as releases: exact for the data's owner, a Gaussian mechanism for analysts.

Held-out rows are protected rows (PRIVACY.md). Scoring a model on them computes, per privacy
unit ``u`` (a record, or a whole client on a client-unit dataset):

* ``a_u`` the fraction of the unit's rows predicted correctly, in ``[0, 1]``;
* ``l_u`` the unit's mean cross-entropy clipped to ``[0, B]`` (``B = loss_clip``).

What an analyst sees is ``(Σ a_u + N(0, z²)) / U`` and ``(Σ l_u + N(0, (zB)²)) / U``, where
``U`` is the number of scored units (released metadata). Adding, removing or changing one
unit moves ``Σ a_u`` by at most 1 and ``Σ l_u`` by at most ``B``, so each set of metrics is
two Gaussian mechanisms of noise multiplier ``z`` (sensitivity 1 after scaling), priced by
``ppml.privacy.accounting.evaluation_curve`` and charged with the job. Clamping the noisy
figures to their ranges is post-processing. The noise comes from the OS CSPRNG.

Exact figures (unclipped mean loss, accuracy over rows) are stored apart for the owner.
This module is pure Python and numpy: the API and the worker both use it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, computed_field

__all__ = [
    "DEFAULT_EVAL_SHARE",
    "DEFAULT_LOSS_CLIP",
    "MAX_METRIC_RELEASES",
    "SCALARS_PER_RELEASE",
    "WITHHELD",
    "EvaluationPlan",
    "ExactMetrics",
    "ExactScores",
    "Mechanism",
    "Metrics",
    "MetricsRelease",
    "ReleasedMetrics",
    "exact_metrics",
    "metric_releases",
    "release_metrics",
    "release_outcome",
    "scoring_interval",
]

#: Fraction of a job's target ε spent on its analyst-visible metrics by default.
DEFAULT_EVAL_SHARE = 0.03
#: Per-example cross-entropy is clipped to this many nats before it is summed.
DEFAULT_LOSS_CLIP = 4.0
#: At most this many sets of metrics per job (a federated history included).
MAX_METRIC_RELEASES = 50
#: Each set of metrics is two scalar releases: correct predictions and clipped loss.
SCALARS_PER_RELEASE = 2

Mechanism = Literal["gaussian", "exact-public-data", "exact-public-validation", "withheld"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EvaluationPlan(_Record):
    """How a job's metrics are released, fixed when the job is priced.

    Attributes:
        mechanism: ``gaussian`` (budgeted data, charged), ``exact-public-data`` (the
            dataset has no budget), ``exact-public-validation`` (scored on the owner's
            public validation set, free) or ``withheld`` (budgeted data and an evaluation
            share of 0: analysts see no metrics).
        noise_multiplier: ``z`` of the Gaussian releases (``gaussian`` only).
        loss_clip: ``B``, the per-example loss bound (``gaussian`` only).
        releases: Sets of metrics the job may release (1, or a federated history's length).
        epsilon_share: Fraction of the job's target ε the releases were given.
        scored_on: ``test`` (the dataset's held-out units) or ``validation``.
        validation_dataset_id: The public set that scores the job, if any.
    """

    # Stored records carry the computed ``scalar_releases`` too: ignored when read back.
    model_config = ConfigDict(frozen=True, extra="ignore")

    mechanism: Mechanism
    noise_multiplier: float | None = None
    loss_clip: float | None = None
    releases: int = 1
    epsilon_share: float = 0.0
    scored_on: Literal["test", "validation"] = "test"
    validation_dataset_id: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def scalar_releases(self) -> int:
        """Scalar Gaussian releases to charge (0 unless ``gaussian``)."""
        return SCALARS_PER_RELEASE * self.releases if self.mechanism == "gaussian" else 0


#: A job priced before metrics were released through a mechanism shows analysts none.
WITHHELD = EvaluationPlan(mechanism="withheld", releases=0)


class MetricsRelease(_Record):
    """How a set of metrics was released (PRIVACY.md: held-out rows are protected rows)."""

    mechanism: Literal["gaussian", "exact-public-data", "exact-public-validation"] = Field(
        description="gaussian: a Gaussian mechanism on per-unit sums of held-out scores, "
        "charged to the dataset's budget with the job; exact-public-data: the dataset has no "
        "budget; exact-public-validation: scored on the owner's public validation set."
    )
    scored_on: Literal["test", "validation"]
    validation_dataset_id: str | None
    units: int = Field(description="Privacy units scored (released metadata).")
    noise_multiplier: float | None = Field(description="σ of the releases (gaussian).")
    loss_clip: float | None = Field(description="Per-example loss bound (gaussian).")
    accuracy_noise_std: float | None = Field(description="Std of the noise on test_accuracy.")
    loss_noise_std: float | None = Field(description="Std of the noise on test_loss.")


class Metrics(_Record):
    """Held-out metrics as released to every key of the tenant, with their mechanism."""

    test_accuracy: float
    test_loss: float = Field(description="Mean cross-entropy (clipped at loss_clip if noisy).")
    round: int | None = Field(default=None, description="Federated round scored, if any.")
    release: MetricsRelease


class ExactScores(_Record):
    """One scoring's exact figures (figures stored by older versions may carry more keys)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    test_accuracy: float
    test_loss: float = Field(description="Mean cross-entropy, unclipped.")
    round: int | None = None
    epoch: int | None = Field(
        default=None, description="Epochs trained when scored (per-epoch history)."
    )
    rows: int | None = Field(default=None, description="Rows scored.")
    units: int | None = Field(default=None, description="Privacy units scored.")


class ExactMetrics(_Record):
    """A job's exact held-out figures: for the dataset's owner only."""

    metrics: ExactScores | None = None
    history: list[ExactScores] | None = None


def _round(aggregates: Mapping[str, float]) -> int | None:
    value = aggregates.get("round")
    return None if value is None else int(value)


def exact_metrics(aggregates: Mapping[str, float]) -> ExactScores:
    """The exact figures of one scoring (owner only, or public data)."""
    return ExactScores(
        test_accuracy=float(aggregates["test_accuracy"]),
        test_loss=float(aggregates["test_loss"]),
        round=_round(aggregates),
        rows=int(aggregates["rows"]),
        units=int(aggregates["units"]),
    )


def release_metrics(
    aggregates: Mapping[str, float],
    plan: EvaluationPlan,
    *,
    rng: np.random.Generator | None = None,
) -> Metrics | None:
    """What analysts see of one scoring, with the mechanism that released it.

    Args:
        aggregates: ``ppml.training.dp_sgd.evaluate``'s figures: exact ``test_accuracy``
            and ``test_loss``, and per-unit sums ``unit_correct_sum`` and
            ``unit_clipped_loss_sum`` over ``units`` units.
        plan: The job's evaluation plan.
        rng: Noise source; None (production) seeds one from the OS CSPRNG. Tests only.

    Returns:
        The released metrics, or None when the plan withholds them.
    """
    if plan.mechanism == "withheld":
        return None
    units = int(aggregates["units"])
    if plan.mechanism != "gaussian":
        exact = exact_metrics(aggregates)
        release = MetricsRelease(
            mechanism=plan.mechanism,
            scored_on=plan.scored_on,
            validation_dataset_id=plan.validation_dataset_id,
            units=units,
            noise_multiplier=None,
            loss_clip=None,
            accuracy_noise_std=None,
            loss_noise_std=None,
        )
        return Metrics(
            test_accuracy=exact.test_accuracy,
            test_loss=exact.test_loss,
            round=exact.round,
            release=release,
        )
    z, bound = plan.noise_multiplier, plan.loss_clip
    assert z is not None and bound is not None
    noise = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    correct = float(aggregates["unit_correct_sum"]) + float(noise.normal(0.0, z))
    loss = float(aggregates["unit_clipped_loss_sum"]) + float(noise.normal(0.0, z * bound))
    scale = max(units, 1)  # post-processing by a public count
    release = MetricsRelease(
        mechanism="gaussian",
        scored_on=plan.scored_on,
        validation_dataset_id=plan.validation_dataset_id,
        units=units,
        noise_multiplier=z,
        loss_clip=bound,
        accuracy_noise_std=z / scale,
        loss_noise_std=z * bound / scale,
    )
    return Metrics(
        test_accuracy=min(1.0, max(0.0, correct / scale)),
        test_loss=min(bound, max(0.0, loss / scale)),
        round=_round(aggregates),
        release=release,
    )


def metric_releases(rounds: int | None, evaluate_every: int | None) -> int:
    """Sets of metrics a job releases: 1 centralised; federated, one every
    :func:`scoring_interval` rounds and one after the last, ``ceil(rounds / every)``."""
    if rounds is None:
        return 1
    return math.ceil(rounds / scoring_interval(rounds, evaluate_every))


def scoring_interval(rounds: int, evaluate_every: int | None) -> int:
    """Every how many rounds a federated job scores its model: as asked, or by default at
    most 20 times. Pricing and the worker both use it, so what is scored is what is charged."""
    return evaluate_every or max(1, math.ceil(rounds / 20))


@dataclass(frozen=True, kw_only=True)
class ReleasedMetrics:
    """A finished job's metrics: what everyone may see, and the owner's exact figures."""

    metrics: Metrics | None
    history: list[Metrics] | None
    exact: ExactMetrics


def release_outcome(
    final: Mapping[str, float],
    history: list[dict[str, float]] | None,
    plan: EvaluationPlan,
    *,
    rng: np.random.Generator | None = None,
) -> ReleasedMetrics:
    """Release a job's final scores and its federated history under ``plan``.

    The final scores are the history's last entry when that entry scored the final model
    (a federated job that ran all its rounds): released once, not twice.
    """
    history = history or []
    released_history = [release_metrics(entry, plan, rng=rng) for entry in history]
    last = history[-1] if history else None
    if last is not None and _same_scores(last, final):
        metrics = released_history[-1]
    else:
        metrics = release_metrics(final, plan, rng=rng)
    shown = [entry for entry in released_history if entry is not None]
    exact = ExactMetrics(
        metrics=exact_metrics(final),
        history=[exact_metrics(entry) for entry in history] or None,
    )
    return ReleasedMetrics(metrics=metrics, history=shown or None, exact=exact)


def _same_scores(entry: Mapping[str, float], final: Mapping[str, float]) -> bool:
    keys = ("test_accuracy", "test_loss", "unit_correct_sum", "unit_clipped_loss_sum")
    return all(entry.get(key) == final.get(key) for key in keys)
