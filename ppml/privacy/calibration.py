"""Calibration on the accounting's curves: the DP-SGD schedule a spec implies, the σ that
spends a target ε (with or without the job's metric releases), and the largest target ε a
job's shape can still get under a budget's caps. Pure functions, without torch; see
:mod:`ppml.privacy.accounting` for the curves themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from ppml.privacy.accounting import (
    ORDERS,
    Curve,
    MechanismEvent,
    add,
    dp_event,
    epsilon,
    evaluation_curve,
    fits,
    rdp_curve,
    zero,
)

if TYPE_CHECKING:
    import dp_accounting

__all__ = [
    "calibrate_noise",
    "calibrate_with_evaluation",
    "largest_fitting_epsilon",
    "plan_dp_sgd",
    "steps_per_epoch",
]


def plan_dp_sgd(*, num_records: int, batch_size: int, epochs: int) -> tuple[float, int, int]:
    """Poisson rate and step schedule of a DP-SGD job: ``(q, steps_per_epoch, total_steps)``.

    ``q = batch_size / n`` so the expected batch is ``batch_size``; an epoch is
    ``ceil(n / batch_size)`` steps.
    """
    if num_records <= 0 or batch_size <= 0 or epochs <= 0:
        raise ValueError("num_records, batch_size and epochs must be positive")
    if batch_size > num_records:
        raise ValueError("batch_size exceeds the number of records")
    steps_per_epoch = math.ceil(num_records / batch_size)
    return batch_size / num_records, steps_per_epoch, epochs * steps_per_epoch


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson-sampled steps that make one expected pass over a shard: ``ceil(1/q)``.

    Federated sample-level jobs are priced and run with this one expression (float rounding
    makes it 50 for ``q = 1/49``, so pricing and training must not compute it differently).
    """
    if not 0 < sample_rate <= 1:
        raise ValueError("sample_rate must be in (0, 1]")
    return math.ceil(1 / sample_rate)


def _job_epsilon(sigma: float, *, sample_rate: float, steps: int, delta: float, unit: str) -> float:
    event = MechanismEvent(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, unit=unit)
    return epsilon(rdp_curve(event), delta)


@lru_cache(maxsize=4096)
def calibrate_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, unit: str = "record"
) -> float:
    """Smallest σ (to 1e-4 relative) whose stored curve converts to at most ``target_epsilon``.

    Uses ``dp-accounting``'s calibration, then checks the figure on the rounded curve that
    the ledger will charge, so a job never reports more than its target.

    Raises:
        ValueError: when no σ reaches the target (for instance δ too small).
    """

    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return dp_event(
            MechanismEvent(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps)
        )

    sigma = float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: rdp_lib.RdpAccountant(orders=list(ORDERS)),
            make_event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-5,
        )
    )
    for _ in range(100):
        if _job_epsilon(sigma, sample_rate=sample_rate, steps=steps, delta=delta, unit=unit) <= (
            target_epsilon
        ):
            return sigma
        sigma *= 1 + 1e-4
    raise ValueError("could not calibrate the noise multiplier for this target")


@lru_cache(maxsize=4096)
def calibrate_with_evaluation(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    unit: str,
    eval_releases: int,
    eval_share: float,
) -> tuple[float, float]:
    """σ of training and σ of the evaluation releases for a job that spends ``target_epsilon``.

    Training gets ``(1 - eval_share)`` of the target; the evaluation gets the least noise
    whose releases, composed with training on the stored (rounded) curves, still convert to
    at most ``target_epsilon``. So the quote, the reservation and the receipt all include
    the metrics, and the metrics cost at most about ``eval_share`` of the target.

    Returns:
        ``(training σ, evaluation σ)``.

    Raises:
        ValueError: when no σ reaches the target.
    """
    if not 0 < eval_share < 1 or eval_releases < 1:
        raise ValueError("eval_share must be in (0, 1) and eval_releases positive")
    sigma = calibrate_noise(
        target_epsilon=target_epsilon * (1 - eval_share),
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        unit=unit,
    )
    training = rdp_curve(
        MechanismEvent(sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, unit=unit)
    )

    def fits_target(z: float) -> bool:
        return epsilon(add(training, evaluation_curve(z, eval_releases)), delta) <= target_epsilon

    low, high = 1e-2, 1e6
    if not fits_target(high):
        raise ValueError("could not calibrate the evaluation noise for this target")
    for _ in range(60):  # bisection on a log scale, to well below 1e-4 relative
        mid = math.sqrt(low * high)
        if fits_target(mid):
            high = mid
        else:
            low = mid
    return sigma, high


# Halvings of σ's last bracket in largest_fitting_epsilon: 2⁻²⁰ relative is far finer than
# the hint needs (it was 40, which doubled the search's cost for nothing).
_FITTING_BISECTIONS = 20


def largest_fitting_epsilon(
    *,
    used: Sequence[int],
    budget_caps: Sequence[int],
    sample_rate: float,
    steps: int,
    delta: float,
    unit: str = "record",
    evaluation: Curve | None = None,
) -> float | None:
    """Largest target ε for this job shape that the filter would still admit, or None.

    ``evaluation`` (the curve of the job's metric releases) is held fixed: a hint, not a
    price (the job is priced again when submitted).

    The search is bounded, whatever the inputs: σ doubles from 1 until the job fits (σ = 1,
    2, …, 8192: at most 14 curves; past 10⁴ it answers None), then σ/2 is tried and
    ``_FITTING_BISECTIONS`` (20) halvings of ``[σ/2, σ]`` pin σ to about 2⁻²⁰ relative: at
    most 35 curves are priced (about 0.15 s), and the answer is always a σ that fits.
    """
    extra = evaluation or zero()

    def job(sigma: float) -> Curve:
        return add(
            rdp_curve(
                MechanismEvent(
                    sample_rate=sample_rate, noise_multiplier=sigma, steps=steps, unit=unit
                )
            ),
            extra,
        )

    high = 1.0
    while not fits(used, job(high), budget_caps):
        high *= 2
        if high > 1e4:
            return None
    low = high / 2 if high > 1.0 else 1e-3
    if fits(used, job(low), budget_caps):
        return epsilon(job(low), delta)
    for _ in range(_FITTING_BISECTIONS):
        mid = (low + high) / 2
        if fits(used, job(mid), budget_caps):
            high = mid
        else:
            low = mid
    return epsilon(job(high), delta)
