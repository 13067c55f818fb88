"""DP synthetic data: its charge on the ledger's grid, the sensitivities MST's noise is
calibrated for, and the pricing of synthesize jobs. One small MST run checks that the steps
spend at most the rho charged."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.optimize import minimize_scalar

from ppml.config import Settings
from ppml.db.models import Dataset
from ppml.errors import InvalidInput
from ppml.privacy import accounting as acc
from ppml.privacy.zcdp import calibrate_zcdp
from ppml.services.pricing import price
from ppml.specs import JobSpec
from ppml.synthesis.table import LABEL, Table, builtin_bounds, dp_bounds

DELTA = 1e-5


def reference_epsilon(rho: float, delta: float) -> float:
    """The tightest published (ε, δ) of rho-zCDP: Canonne, Kamath and Steinke 2020, Prop. 12
    (as in private-pgm's cdp2adp), minimised over every real order α > 1."""

    def bound(alpha: float) -> float:
        return alpha * rho + (
            math.log(1 / delta) + (alpha - 1) * math.log(1 - 1 / alpha) - math.log(alpha)
        ) / (alpha - 1)

    found = minimize_scalar(bound, bounds=(1.0001, 1e4), method="bounded")
    return float(found.fun)


def dataset(**fields: Any) -> Dataset:
    values: dict[str, Any] = {
        "id": "ds_bc",
        "tenant_id": "ten",
        "name": "bc",
        "source": {"builtin": "breast_cancer"},
        "task": "classification",
        "num_features": 30,
        "num_classes": 2,
        "num_train": 455,
        "num_test": 114,
        "num_clients": None,
        "classes": {"labels": ["malignant", "benign"]},
        "privacy_unit": "record",
        "epsilon_total": 8.0,
        "delta_total": DELTA,
        "storage_key": "datasets/ds_bc.npz",
        "status": "ready",
    }
    return Dataset(**(values | fields))


def synthesize_spec(epsilon: float = 2.0, **synthesize: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "s",
            "dataset_id": "ds_bc",
            "kind": "synthesize",
            "privacy": {"target_epsilon": epsilon},
            "synthesize": synthesize,
        }
    )


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
def test_the_ledger_charges_at_least_the_reference_accounting_and_at_most_the_target(
    target: float,
) -> None:
    # arrange
    rho = calibrate_zcdp(target_epsilon=target, delta=DELTA)
    # act
    charged = acc.epsilon(acc.zcdp_curve(rho), DELTA)
    # assert
    assert reference_epsilon(rho, DELTA) <= charged <= target
    assert charged > 0.98 * target  # calibration leaves little on the table


def test_a_zcdp_curve_is_alpha_times_rho_rounded_up() -> None:
    # arrange
    rho = 0.123456789
    # act
    curve = acc.zcdp_curve(rho)
    # assert
    for order, units in zip(acc.ORDERS, curve, strict=True):
        assert units >= order * rho * acc.UNITS_PER_NAT
        assert units - order * rho * acc.UNITS_PER_NAT < 1


def test_a_zcdp_event_round_trips_and_is_charged_whole_with_no_steps() -> None:
    # arrange
    event = acc.MechanismEvent(
        sample_rate=1.0, noise_multiplier=0.0, steps=0, zcdp_rho=0.2, mechanism="mst"
    )
    # act
    again = acc.MechanismEvent.from_dict(event.to_dict())
    # assert
    assert again == event and again.with_steps(0) == event
    assert acc.rdp_curve(event) == acc.zcdp_curve(0.2)


def _one_way(table: Table, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    columns = table.encode(x, y)
    return np.concatenate(
        [
            np.bincount(columns[n], minlength=s)
            for n, s in zip(table.names, table.sizes, strict=True)
        ]
    )


def test_one_record_moves_the_one_way_marginals_by_the_sensitivity_mst_assumes() -> None:
    # arrange: the L2 sensitivity of all d 1-way marginals is sqrt(d) under add/remove
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 5)), rng.integers(0, 3, 300)
    table = Table(
        names=("a", "b", "c", "d", "e", LABEL),
        bounds=((-2.0, 2.0),) * 5,
        bins=6,
        classes=("x", "y", "z"),
    )
    full = _one_way(table, x, y)
    # act
    moves = [
        np.linalg.norm(full - _one_way(table, np.delete(x, i, 0), np.delete(y, i)))
        for i in range(0, 300, 37)
    ]
    # assert
    assert moves == pytest.approx([math.sqrt(6)] * len(moves))


def test_documented_bounds_cover_every_breast_cancer_feature_in_stored_units() -> None:
    # arrange
    from ppml.datasets import load_builtin

    arrays = load_builtin("breast_cancer", secret="00" * 16)
    # act
    bounds = builtin_bounds("breast_cancer", arrays.feature_names)
    # assert
    assert len(bounds) == 30
    x = np.concatenate([arrays.x_train, arrays.x_test])
    for j, name in enumerate(arrays.feature_names):
        low, high = bounds[name]
        assert low <= x[:, j].min() and x[:, j].max() <= high


def test_pricing_charges_the_calibrated_rho_and_refuses_client_unit_budgets() -> None:
    # arrange
    settings = Settings()
    # act
    pricing = price(synthesize_spec(2.0, features=[0, 1]), dataset(), settings)
    # assert
    assert pricing.event is not None and pricing.event.mechanism == "mst"
    assert pricing.event.zcdp_rho == calibrate_zcdp(target_epsilon=2.0, delta=DELTA)
    assert pricing.epsilon <= 2.0 and pricing.schedule.total_steps == 0
    with pytest.raises(InvalidInput) as refused:
        price(synthesize_spec(), dataset(privacy_unit="client", num_clients=10), settings)
    assert refused.value.field == "kind"
    with pytest.raises(InvalidInput):
        price(synthesize_spec(features=[30]), dataset(), settings)


def test_synthesize_specs_take_no_training_fields_and_train_specs_may_leave_them_out() -> None:
    # arrange
    base = {"name": "s", "dataset_id": "d", "privacy": {"target_epsilon": 1.0}}
    # act / assert
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**base, "kind": "synthesize", "model": {"arch": "mlp"}})
    with pytest.raises(ValidationError):
        JobSpec.model_validate({**base, "kind": "synthesize", "privacy": None})
    # kind train without model and training: ppml chooses them (ppml.defaults)
    assert JobSpec.model_validate(base).model_fields_set == {"name", "dataset_id", "privacy"}
    stored = synthesize_spec().model_dump(mode="json")
    assert JobSpec.model_validate(stored).kind == "synthesize"


def test_mst_spends_at_most_its_rho_and_keeps_the_domain() -> None:
    # arrange
    from ppml.synthesis.mst import synthesize

    rng = np.random.default_rng(1)
    columns = {"a": rng.integers(0, 3, 400), "b": rng.integers(0, 4, 400)}
    columns[LABEL] = (columns["a"] + columns["b"]) % 2
    # act
    rows, spends = synthesize(columns, (3, 4, 2), rho=0.5, rows=123, rng=rng, iters=100)
    # assert
    assert sum(s.rho for s in spends) <= 0.5 * (1 + 1e-12)
    assert [s.step for s in spends] == ["one-way marginals", "tree selection", "two-way marginals"]
    for name, size in zip(columns, (3, 4, 2), strict=True):
        assert len(rows[name]) == 123 and rows[name].min() >= 0 and rows[name].max() < size


def test_dp_bounds_find_a_column_s_range_on_the_fixed_grid_when_rho_allows() -> None:
    # arrange
    from ppml.synthesis.table import dp_bounds

    rng = np.random.default_rng(3)
    x = np.column_stack([rng.uniform(10, 20, 5000), rng.uniform(-3, -1, 5000)])
    # act
    found = dp_bounds(x, [0, 1], rho=50.0, rng=rng)
    # assert: the grid is log-spaced (about 26% apart): the bounds are the edges of the cells
    # that hold the extremes
    (lo0, hi0), (lo1, hi1) = found[0], found[1]
    assert 7.5 <= lo0 <= 10 and 20 <= hi0 <= 26
    assert -3.8 <= lo1 <= -3 and -1 <= hi1 <= -0.75


def test_dp_bounds_with_little_rho_stay_on_the_grid_and_ordered() -> None:
    # arrange
    from ppml.synthesis.table import dp_bounds

    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (50, 3))
    # act
    found = dp_bounds(x, [0, 1, 2], rho=1e-4, rng=rng)
    # assert
    assert all(-1e6 <= lo < hi <= 1e6 for lo, hi in found.values())


def test_dp_bounds_are_never_empty_when_only_an_outer_cell_holds_the_rows() -> None:
    # arrange: every value beyond the grid's ends, below and above
    rng = np.random.default_rng(0)
    x = np.column_stack([np.full(500, -1e9), np.full(500, 1e9)])
    # act
    found = dp_bounds(x, [0, 1], rho=50.0, rng=rng)
    # assert
    assert all(low < high for low, high in found.values())
    assert found[0][0] <= -1e5 and found[1][1] >= 1e5
