"""RDP accounting on a fixed, versioned grid of orders, without torch.

Every charge is a mechanism event (Poisson-sampled Gaussian, repeated ``steps`` times) turned
into an RDP curve by Google's ``dp-accounting``. Curves are stored as integers in units of
``1 / UNITS_PER_NAT`` nats, rounded *up* for charges and *down* for caps, so composition is
exact integer addition and admission compares without tolerance (PRIVACY.md).

``dp-accounting`` (with the SciPy it loads, about a second) is imported where it is first
used, so a process that never prices a job (the CLI, an API answering reads) starts without it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import dp_accounting

__all__ = [
    "GRID_VERSION",
    "ORDERS",
    "UNITS_PER_NAT",
    "Curve",
    "MechanismEvent",
    "add",
    "caps",
    "dp_event",
    "epsilon",
    "evaluation_curve",
    "filter_epsilon",
    "fits",
    "library_versions",
    "pld_epsilon",
    "rdp_curve",
    "subtract",
    "zcdp_curve",
    "zero",
]

#: Orders at which every curve is kept. Changing them needs a new ``GRID_VERSION``.
ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0,
)  # fmt: skip
GRID_VERSION = "rdp-v1"
UNITS_PER_NAT = 10**9
#: Stand-in for an infinite RDP value: far above any cap, still summable exactly.
INFINITE_UNITS = 10**18

#: An RDP curve on ``ORDERS`` in integer units.
Curve = tuple[int, ...]

SAMPLING_POISSON = "poisson"

# dp-accounting logs a warning each time an order fails to converge; that order is then
# treated as infinite (unusable), which is the conservative outcome, so keep logs quiet.
logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass(frozen=True, kw_only=True)
class MechanismEvent:
    """What a job does to its dataset, enough to recompute every figure later.

    Attributes:
        sample_rate: Poisson sampling rate q of each step (1.0 for full batches).
        noise_multiplier: Gaussian noise σ relative to the clipping norm.
        steps: Number of compositions (optimiser steps or federated rounds).
        sampling: Sampling method; only ``"poisson"`` is certified.
        unit: Privacy unit protected by the mechanism: ``"record"`` or ``"client"``.
        eval_noise_multiplier: σ of the Gaussian releases of held-out aggregates (the
            metrics analysts see), relative to their sensitivity of 1; None when none.
        eval_releases: Number of those scalar Gaussian releases (two per released set of
            metrics: the count of correct predictions and the clipped loss sum).
        zcdp_rho: rho of a mechanism stated in zCDP (add/remove neighbours), such as MST's
            synthetic data; it enters the curve as ``α·rho`` at every order and, like the
            evaluation releases, is charged whole once the data was touched. 0: none.
        mechanism: Name of that mechanism (``"mst"``), for receipts; None when none.
    """

    sample_rate: float
    noise_multiplier: float
    steps: int
    sampling: str = SAMPLING_POISSON
    unit: str = "record"
    eval_noise_multiplier: float | None = None
    eval_releases: int = 0
    zcdp_rho: float = 0.0
    mechanism: str | None = None

    def __post_init__(self) -> None:
        if self.eval_releases and not (self.eval_noise_multiplier or 0) > 0:
            raise ValueError("evaluation releases need a positive noise multiplier")
        if not (math.isfinite(self.zcdp_rho) and self.zcdp_rho >= 0):
            raise ValueError("zcdp_rho must be finite and non-negative")

    def with_steps(self, steps: int) -> MechanismEvent:
        """The same mechanism run for ``steps`` steps.

        The evaluation releases are kept whole: a job stopped early is charged for all of
        them (they are a few percent of its cost), which is never less than it released.
        """
        return MechanismEvent(
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps=steps,
            sampling=self.sampling,
            unit=self.unit,
            eval_noise_multiplier=self.eval_noise_multiplier,
            eval_releases=self.eval_releases,
            zcdp_rho=self.zcdp_rho,
            mechanism=self.mechanism,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description, with the grid and library versions that priced it."""
        return {**_fields_of(self), "grid_version": GRID_VERSION, "libraries": library_versions()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MechanismEvent:
        """Inverse of :meth:`to_dict` (extra keys are ignored)."""
        return cls(
            sample_rate=float(data["sample_rate"]),
            noise_multiplier=float(data["noise_multiplier"]),
            steps=int(data["steps"]),
            sampling=str(data.get("sampling", SAMPLING_POISSON)),
            unit=str(data.get("unit", "record")),
            eval_noise_multiplier=(
                float(data["eval_noise_multiplier"])
                if data.get("eval_noise_multiplier") is not None
                else None
            ),
            eval_releases=int(data.get("eval_releases") or 0),
            zcdp_rho=float(data.get("zcdp_rho") or 0.0),
            mechanism=str(data["mechanism"]) if data.get("mechanism") else None,
        )


@lru_cache(maxsize=4096)
def _event_fields(event: MechanismEvent) -> dict[str, Any]:
    return asdict(event)


def _fields_of(event: MechanismEvent) -> dict[str, Any]:
    """``asdict(event)`` (a fresh dict; the fields are scalars), computed once per event:
    each admission of a job shape stores the same event with its ledger entry."""
    return dict(_event_fields(event))


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of the accounting libraries, stored with every charge."""
    return {"dp-accounting": version("dp-accounting")}


def dp_event(event: MechanismEvent) -> dp_accounting.DpEvent:
    """The event as dp-accounting composes it (Poisson-sampled Gaussian, repeated)."""
    import dp_accounting

    if event.sampling != SAMPLING_POISSON:
        raise ValueError(f"sampling {event.sampling!r} has no certified accounting")
    step = dp_accounting.PoissonSampledDpEvent(
        event.sample_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, event.steps)


def _ceil_units(value: float) -> int:
    if not math.isfinite(value):
        return INFINITE_UNITS
    return min(INFINITE_UNITS, math.ceil(Fraction(value) * UNITS_PER_NAT))


def _floor_units(value: float) -> int:
    return math.floor(Fraction(value) * UNITS_PER_NAT)


def zero() -> Curve:
    """The curve of no charge at all."""
    return (0,) * len(ORDERS)


def add(*curves: Sequence[int]) -> Curve:
    """Order-by-order sum (RDP composition)."""
    return tuple(sum(values) for values in zip(*curves, strict=True)) if curves else zero()


def subtract(a: Sequence[int], b: Sequence[int]) -> Curve:
    """Order-by-order difference ``a - b``."""
    return tuple(x - y for x, y in zip(a, b, strict=True))


def _curve_of(event: dp_accounting.DpEvent) -> Curve:
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    accountant = rdp_lib.RdpAccountant(orders=list(ORDERS))
    accountant.compose(event)
    # ``_rdp`` is the accountant's composed curve; dp-accounting has no public getter.
    return tuple(_ceil_units(float(value)) for value in accountant._rdp)


@lru_cache(maxsize=4096)
def evaluation_curve(noise_multiplier: float, releases: int) -> Curve:
    """RDP curve of ``releases`` Gaussian releases of sensitivity 1 at ``noise_multiplier``.

    This prices the held-out metrics shown to analysts (``ppml.privacy.evaluation``).
    """
    import dp_accounting

    if releases == 0:
        return zero()
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    return _curve_of(dp_accounting.SelfComposedDpEvent(gaussian, releases))


@lru_cache(maxsize=4096)
def zcdp_curve(rho: float) -> Curve:
    """RDP curve of a rho-zCDP mechanism: ``α·rho`` at every order α (Bun and Steinke 2016),
    rounded up."""
    if rho == 0:
        return zero()
    exact = Fraction(rho) * UNITS_PER_NAT  # α·rho in units, rounded up exactly
    return tuple(min(INFINITE_UNITS, math.ceil(Fraction(order) * exact)) for order in ORDERS)


@lru_cache(maxsize=4096)
def rdp_curve(event: MechanismEvent) -> Curve:
    """RDP curve of ``event`` on ``ORDERS``, rounded up to integer units.

    Training steps and evaluation releases are priced separately, each rounded up, and
    added: RDP composes by addition, so the sum bounds the whole job. A zero-step event
    without evaluations costs nothing. Curves are linear in steps only before rounding,
    so a partial run is priced with its own event rather than by scaling a curve.
    """
    training = _curve_of(dp_event(event)) if event.steps else zero()
    if event.zcdp_rho:
        training = add(training, zcdp_curve(event.zcdp_rho))
    if not event.eval_releases:
        return training
    assert event.eval_noise_multiplier is not None
    return add(training, evaluation_curve(event.eval_noise_multiplier, event.eval_releases))


def epsilon(curve: Sequence[int], delta: float) -> float:
    """(ε, δ) conversion of a curve (Balle et al. 2020, as in ``dp-accounting``)."""
    return _epsilon(tuple(curve), delta)


@lru_cache(maxsize=4096)
def _epsilon(curve: tuple[int, ...], delta: float) -> float:
    """:func:`epsilon`, kept: every admission of one job shape converts the same curve."""
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    if all(value == 0 for value in curve):
        return 0.0
    rdp = [value / UNITS_PER_NAT for value in curve]
    eps, _order = rdp_lib.compute_epsilon(list(ORDERS), rdp, delta)
    return float(eps)


def _conversion_offset(order: float, delta: float) -> float:
    """ε − cap(α): what converting at order α with δ split across the grid costs."""
    split = delta / len(ORDERS)
    return math.log1p(-1 / order) - (math.log(split) + math.log(order)) / (order - 1)


@lru_cache(maxsize=1024)
def caps(epsilon_total: float, delta_total: float) -> Curve:
    """Per-order caps of the RDP filter for a budget, rounded down.

    ``cap(α) = ε_total − log(1 − 1/α) + (log(δ_total/|A|) + log α)/(α − 1)``: if the
    composed curve stays under the cap at any one order, the whole (adaptive) sequence is
    (ε_total, δ_total)-DP (Feldman & Zrnic 2021 with the Balle et al. conversion, δ split
    across the |A| orders).
    """
    return tuple(
        _floor_units(epsilon_total - _conversion_offset(order, delta_total)) for order in ORDERS
    )


def fits(used: Sequence[int], job: Sequence[int], budget_caps: Sequence[int]) -> bool:
    """Admission rule: some order keeps ``used + job`` at or under its cap (exact integers)."""
    return any(u + j <= c for u, j, c in zip(used, job, budget_caps, strict=True))


def filter_epsilon(curve: Sequence[int], delta_total: float) -> float:
    """The smallest ε_total whose filter would still hold ``curve`` (rounded up)."""
    if all(value == 0 for value in curve):
        return 0.0
    best = min(
        value / UNITS_PER_NAT + _conversion_offset(order, delta_total)
        for order, value in zip(ORDERS, curve, strict=True)
    )
    return max(0.0, best)


def pld_epsilon(events: Iterable[MechanismEvent], delta: float) -> float:
    """ε of the composed events by privacy-loss distributions (tighter; for reporting only)."""
    import dp_accounting

    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for event in events:
        if event.steps:
            accountant.compose(dp_event(event))
    return float(accountant.get_epsilon(delta))
