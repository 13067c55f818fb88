"""Tests of ppml.privacy.accounting: cross-checks with Opacus and PLD, tightness, filter
soundness, rounding direction, and the largest ε a refused job could still ask for.

No database here; the Hypothesis examples are few because PLD and RDP evaluations are slow.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from ppml.privacy.accounting import ORDERS, UNITS_PER_NAT, MechanismEvent

DELTA = 1e-5
#: Slack for PLD's value discretisation (1e-3 in ``pld_epsilon``).
PLD_SLACK = 1e-3

SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

rates = st.floats(min_value=1e-3, max_value=0.5)
sigmas = st.floats(min_value=0.5, max_value=5.0)
step_counts = st.integers(min_value=1, max_value=2000)
events = st.builds(
    lambda q, s, n: MechanismEvent(sample_rate=q, noise_multiplier=s, steps=n),
    rates,
    sigmas,
    step_counts,
)


# ----------------------------------------------------------------------------- helpers


def event(q: float, sigma: float, steps: int) -> MechanismEvent:
    return MechanismEvent(sample_rate=q, noise_multiplier=sigma, steps=steps)


def opacus_rdp(ev: MechanismEvent) -> list[float]:
    rdp = compute_rdp(
        q=ev.sample_rate, noise_multiplier=ev.noise_multiplier, steps=ev.steps, orders=list(ORDERS)
    )
    return [float(value) for value in rdp]


def opacus_epsilon(ev: MechanismEvent, delta: float = DELTA) -> tuple[float, float]:
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": expected on a fixed grid at small ε.
        warnings.simplefilter("ignore", UserWarning)
        eps, order = get_privacy_spent(orders=list(ORDERS), rdp=opacus_rdp(ev), delta=delta)
    return float(eps), float(order)


def raw_rdp(ev: MechanismEvent) -> list[float]:
    """dp-accounting's float curve, built from its public event classes (not ``_dp_event``)."""
    step = dp_accounting.PoissonSampledDpEvent(
        ev.sample_rate, dp_accounting.GaussianDpEvent(ev.noise_multiplier)
    )
    accountant = rdp_lib.RdpAccountant(orders=list(ORDERS))
    accountant.compose(dp_accounting.SelfComposedDpEvent(step, ev.steps))
    return [float(value) for value in accountant._rdp]


def raw_cap(order: float, epsilon_total: float, delta_total: float) -> float:
    """PRIVACY.md's cap, written out independently of the module."""
    return (
        epsilon_total
        - math.log(1 - 1 / order)
        + (math.log(delta_total / len(ORDERS)) + math.log(order)) / (order - 1)
    )


def calibrated(target: float, q: float, steps: int, delta: float = DELTA) -> acc.Curve:
    sigma = cal.calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    return acc.rdp_curve(event(q, sigma, steps))


# ----------------------------------------------------------------------------- Opacus

# Realistic jobs whose best order on the grid is an integer (see the fractional-order test).
PRACTICAL = [
    (0.01, 1.0, 1000),
    (0.004, 1.0, 1000),
    (0.001, 0.6, 2000),
    (0.05, 1.1, 500),
    (128 / 1437, 1.5, 360),
    (0.07, 1.1, 420),
    (0.5, 2.0, 10),
    (0.02, 0.8, 300),
    (0.2, 3.0, 200),
    (1.0, 5.0, 3),
]


@pytest.mark.parametrize(("q", "sigma", "steps"), PRACTICAL)
def test_epsilon_matches_opacus_rdp_accountant(q: float, sigma: float, steps: int) -> None:
    # arrange
    ev = event(q, sigma, steps)
    expected, _order = opacus_epsilon(ev)
    # act
    ours = acc.epsilon(acc.rdp_curve(ev), DELTA)
    # assert
    assert ours == pytest.approx(expected, rel=1e-3)
    assert ours >= expected * (1 - 1e-9)


@SLOW
@given(ev=events)
def test_curve_never_below_opacus_at_any_order(ev: MechanismEvent) -> None:
    # act
    ours = acc.rdp_curve(ev)
    theirs = opacus_rdp(ev)
    # assert: equal at integer orders up to rounding; never below anywhere (one unit slack)
    for order, units, value in zip(ORDERS, ours, theirs, strict=True):
        if not math.isfinite(value):
            assert units == acc.INFINITE_UNITS
            continue
        assert units >= value * UNITS_PER_NAT * (1 - 1e-9) - 1
        if float(order).is_integer() and units < acc.INFINITE_UNITS:
            assert units == pytest.approx(value * UNITS_PER_NAT, rel=1e-8, abs=2)
    eps_theirs, _ = opacus_epsilon(ev)
    assert acc.epsilon(ours, DELTA) >= eps_theirs * (1 - 1e-9)


def test_fractional_orders_are_conservative_against_opacus() -> None:
    """dp-accounting bounds A_α at fractional α by summing |terms| (Opacus subtracts the
    negative ones), so our curve is above Opacus's there and ε can be looser when the best
    order is 1.25 to 2.5 (large ε, e.g. 12.42 vs 12.36 at q=0.1, σ=0.8, 100 steps). Looser,
    never lower: this pins the direction."""
    # arrange
    ev = event(0.1, 0.8, 100)
    # act
    ours, theirs = acc.rdp_curve(ev), opacus_rdp(ev)
    # assert
    fractional = [i for i, order in enumerate(ORDERS) if not float(order).is_integer()]
    assert all(ours[i] >= theirs[i] * UNITS_PER_NAT for i in fractional)
    eps_theirs, _ = opacus_epsilon(ev)
    assert eps_theirs <= acc.epsilon(ours, DELTA) <= eps_theirs * 1.01


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha:UserWarning")
@pytest.mark.parametrize(
    ("target", "q", "steps"),
    [
        (0.5, 0.01, 1000),
        (1.0, 128 / 1437, 360),
        (2.0, 0.01, 1000),
        (3.0, 0.05, 500),
        (8.0, 0.004, 2000),
        (1.0, 0.2, 50),
    ],
)
def test_calibrated_sigma_agrees_with_opacus_and_meets_target(
    target: float, q: float, steps: int
) -> None:
    # act
    sigma = cal.calibrate_noise(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)
    theirs = get_noise_multiplier(
        target_epsilon=target,
        target_delta=DELTA,
        sample_rate=q,
        steps=steps,
        accountant="rdp",
        epsilon_tolerance=1e-3,
        alphas=list(ORDERS),
    )
    # assert
    assert sigma == pytest.approx(theirs, rel=0.02)
    assert acc.epsilon(acc.rdp_curve(event(q, sigma, steps)), DELTA) <= target
    # and it is (nearly) the smallest such σ: a little less noise overshoots
    assert acc.epsilon(acc.rdp_curve(event(q, sigma * 0.995, steps)), DELTA) > target


# ----------------------------------------------------------------------------- PLD


def reference_pld_epsilon(evs: list[MechanismEvent], rdp_eps: float) -> float:
    """PLD ε, refined only where the coarse figure is above the RDP one.

    ``pld_epsilon`` discretises losses on a 1e-3 grid, pessimistically; over hundreds of
    steps at small ε that rounding adds up (0.0675 vs 0.0541 at q≈0.002, σ=3.5, 1032 steps,
    more than RDP's 0.0665). Every pessimistic PLD figure bounds the true ε, so where the
    coarse one is above RDP we compare with a finer grid before calling it under-reporting.
    At ε in the thousands the PLD tail overflows and dp-accounting answers inf: no figure.
    """
    value = acc.pld_epsilon(evs, DELTA)
    for interval in (1e-4, 1e-5):
        if rdp_eps >= value - PLD_SLACK or not math.isfinite(value):
            break
        accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=interval)
        for ev in evs:
            accountant.compose(acc.dp_event(ev))
        value = min(value, float(accountant.get_epsilon(DELTA)))
    return value


@SLOW
@given(ev=events)
def test_rdp_never_under_reports_against_pld_single(ev: MechanismEvent) -> None:
    # act
    rdp_eps = acc.epsilon(acc.rdp_curve(ev), DELTA)
    pld_eps = reference_pld_epsilon([ev], rdp_eps)
    assume(math.isfinite(pld_eps))
    # assert
    assert rdp_eps >= pld_eps - PLD_SLACK


@SLOW
@given(evs=st.lists(events, min_size=1, max_size=4))
def test_rdp_never_under_reports_against_pld_composed(evs: list[MechanismEvent]) -> None:
    # act
    rdp_eps = acc.epsilon(acc.add(*(acc.rdp_curve(ev) for ev in evs)), DELTA)
    pld_eps = reference_pld_epsilon(evs, rdp_eps)
    assume(math.isfinite(pld_eps))
    # assert
    assert rdp_eps >= pld_eps - PLD_SLACK


def test_coarse_pld_is_looser_than_rdp_on_long_small_epsilon_jobs() -> None:
    """Pins the case above: the reporting PLD (1e-3 grid) exceeds RDP, a finer grid does not."""
    ev = event(0.001953125, 3.5, 1032)
    rdp_eps = acc.epsilon(acc.rdp_curve(ev), DELTA)
    assert acc.pld_epsilon([ev], DELTA) > rdp_eps
    assert reference_pld_epsilon([ev], rdp_eps) < rdp_eps


# ----------------------------------------------------------------------------- tightness


def test_three_different_jobs_compose_well_below_the_sum() -> None:
    # arrange
    jobs = [calibrated(0.5, 128 / 1437, 360), calibrated(1.0, 0.01, 1000), calibrated(2.0, 0.3, 50)]
    separate = sum(acc.epsilon(job, DELTA) for job in jobs)
    # act
    composed = acc.epsilon(acc.add(*jobs), DELTA)
    # assert
    assert composed <= 0.9 * separate


def test_five_unit_jobs_compose_well_under_five() -> None:
    # arrange
    job = calibrated(1.0, 128 / 1437, 360)
    assert acc.epsilon(job, DELTA) == pytest.approx(1.0, rel=1e-3)
    # act
    composed = acc.epsilon(acc.add(*[job] * 5), DELTA)
    # assert
    assert composed < 3.0


def test_composition_is_exact_integer_addition() -> None:
    a, b = acc.rdp_curve(event(0.01, 1.0, 100)), acc.rdp_curve(event(0.02, 2.0, 50))
    assert acc.add(a, b) == tuple(x + y for x, y in zip(a, b, strict=True))
    assert acc.subtract(acc.add(a, b), b) == a
    assert acc.add() == acc.zero()
    assert acc.rdp_curve(event(0.01, 1.0, 0)) == acc.zero()
    assert acc.epsilon(acc.zero(), DELTA) == 0.0


# ----------------------------------------------------------------------------- filter

small_events = st.builds(
    event,
    st.floats(min_value=1e-3, max_value=0.2),
    st.floats(min_value=0.7, max_value=5.0),
    st.integers(min_value=1, max_value=1000),
)
budgets = st.tuples(st.floats(min_value=0.3, max_value=10.0), st.sampled_from([1e-5, 1e-6, 1e-8]))


@MEDIUM
@given(budget=budgets, jobs=st.lists(small_events, min_size=1, max_size=8))
def test_filter_admits_only_compositions_within_budget(
    budget: tuple[float, float], jobs: list[MechanismEvent]
) -> None:
    # arrange
    epsilon_total, delta_total = budget
    caps = acc.caps(epsilon_total, delta_total)
    used = acc.zero()
    for ev in jobs:
        curve = acc.rdp_curve(ev)
        # act
        if acc.fits(used, curve, caps):
            used = acc.add(used, curve)
            # assert: whatever was admitted, adaptively, converts within the budget
            assert acc.epsilon(used, delta_total) <= epsilon_total
            assert acc.filter_epsilon(used, delta_total) <= epsilon_total + 1e-9


@settings(max_examples=60, deadline=None)
@given(budget=budgets, index=st.integers(min_value=0, max_value=len(ORDERS) - 1))
def test_a_curve_exactly_at_one_cap_converts_within_budget(
    budget: tuple[float, float], index: int
) -> None:
    # arrange: the worst admissible curve, at the cap at one order and unusable elsewhere
    epsilon_total, delta_total = budget
    caps = acc.caps(epsilon_total, delta_total)
    if caps[index] < 0:
        return  # this order can admit nothing at this budget
    curve = tuple(cap if i == index else acc.INFINITE_UNITS for i, cap in enumerate(caps))
    # act
    admitted = acc.fits(acc.zero(), curve, caps)
    one_more = acc.fits(acc.zero(), acc.add(curve, (1,) * len(ORDERS)), caps)
    # assert
    assert admitted and not one_more
    assert acc.epsilon(curve, delta_total) <= epsilon_total


def test_filter_compares_without_tolerance() -> None:
    caps = acc.caps(4.0, DELTA)
    used = tuple(cap - 10 for cap in caps)
    assert acc.fits(used, (10,) * len(ORDERS), caps)
    assert not acc.fits(used, (11,) * len(ORDERS), caps)


# ----------------------------------------------------------------------------- rounding


@SLOW
@given(ev=events)
def test_charges_are_rounded_up(ev: MechanismEvent) -> None:
    # act
    curve = acc.rdp_curve(ev)
    # assert
    for units, value in zip(curve, raw_rdp(ev), strict=True):
        if not math.isfinite(value):
            assert units == acc.INFINITE_UNITS
            continue
        exact = Fraction(value) * UNITS_PER_NAT
        assert exact <= units < exact + 1


@settings(max_examples=100, deadline=None)
@given(
    epsilon_total=st.floats(min_value=0.05, max_value=50.0),
    delta_total=st.floats(min_value=1e-12, max_value=1e-3),
)
def test_caps_are_rounded_down(epsilon_total: float, delta_total: float) -> None:
    # act
    caps = acc.caps(epsilon_total, delta_total)
    # assert (1e-6 units absorb float differences between two ways of writing the formula)
    for order, cap in zip(ORDERS, caps, strict=True):
        exact = Fraction(raw_cap(order, epsilon_total, delta_total)) * UNITS_PER_NAT
        assert cap <= exact + Fraction(1, 10**6)
        assert cap > exact - 1 - Fraction(1, 10**6)


# ----------------------------------------------------------------------------- largest ε


def _used_by(*targets: tuple[float, float, int]) -> acc.Curve:
    return acc.add(*(calibrated(eps, q, n) for eps, q, n in targets))


@pytest.mark.parametrize(
    ("budget", "used", "q", "steps"),
    [
        (8.0, ((3.0, 0.089, 360), (2.0, 0.089, 360), (1.5, 0.089, 360)), 0.089, 360),
        (8.0, ((3.0, 0.089, 360),), 0.01, 1000),
        (4.0, ((1.0, 0.05, 200), (1.0, 0.05, 200)), 0.001, 5),
        (2.0, (), 0.05, 100),
    ],
)
def test_largest_fitting_epsilon_fits_and_is_nearly_the_largest(
    budget: float, used: tuple[tuple[float, float, int], ...], q: float, steps: int
) -> None:
    # arrange
    caps = acc.caps(budget, DELTA)
    used_curve = _used_by(*used)
    # act
    largest = cal.largest_fitting_epsilon(
        used=used_curve, budget_caps=caps, sample_rate=q, steps=steps, delta=DELTA
    )
    # assert: a job asking for exactly that ε (priced the way admission prices it) fits
    assert largest is not None
    assert acc.fits(used_curve, calibrated(largest, q, steps), caps)
    assert not acc.fits(used_curve, calibrated(largest * 1.05, q, steps), caps)


def test_largest_fitting_epsilon_is_none_when_the_budget_is_spent() -> None:
    # arrange
    caps = acc.caps(1.0, DELTA)
    used = tuple(cap + 1 for cap in caps)
    # act
    largest = cal.largest_fitting_epsilon(
        used=used, budget_caps=caps, sample_rate=0.01, steps=100, delta=DELTA
    )
    # assert
    assert largest is None
