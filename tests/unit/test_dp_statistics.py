"""DP standardisation statistics: the sensitivity the noise is calibrated to holds on
neighbouring datasets, only clipped values reach the release, the ledger's curve is at least
the reference accounting of the Gaussian mechanism, and the exported model applies the same
transform as training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ppml.architectures import ModelShape
from ppml.datasets.statistics import (
    DatasetStatistics,
    bounds_problem,
    clipped_sums,
    moments_sigma,
    release_moments,
    standardize,
)
from ppml.inference import load_model as load_onnx
from ppml.privacy import accounting as acc
from ppml.services.statistics import statistics_event
from ppml.specs import ModelSpec
from ppml.training.export import export_onnx, load_model, save_model
from ppml.training.models import build_model

D = 5
BOUNDS = [(-1.0, 3.0), (0.0, 8.0), (10.0, 20.0), (-5.0, -4.0), (0.0, 1.0)]


def rows(n: int, seed: int = 0) -> np.ndarray:
    # Deliberately wider than the bounds, so clipping is exercised.
    return np.random.default_rng(seed).normal(2.0, 10.0, (n, D)).astype(np.float32)


def test_adding_or_removing_any_row_moves_the_sums_by_at_most_the_claimed_sensitivity() -> None:
    # arrange: the worst rows are at the bounds' corners, or far outside them
    x = rows(200)
    extremes = [
        np.array([lo for lo, _ in BOUNDS]),
        np.array([hi for _, hi in BOUNDS]),
        np.full(D, 1e9),
        np.full(D, -1e9),
        np.array([1e9, -1e9, 1e9, -1e9, 1e9]),
    ]
    base = clipped_sums(x, BOUNDS)
    for extra in extremes:
        # act
        moved = clipped_sums(np.vstack([x, extra[None, :]]), BOUNDS)
        # assert
        assert np.linalg.norm(moved - base) <= math.sqrt(2 * D) + 1e-9
    # removal of each existing row, too
    for i in range(0, 200, 17):
        moved = clipped_sums(np.delete(x, i, axis=0), BOUNDS)
        assert np.linalg.norm(moved - base) <= math.sqrt(2 * D) + 1e-9


def test_values_beyond_the_bounds_never_reach_the_release() -> None:
    # arrange: the same rows, with every out-of-bounds value pushed a thousand times further
    x = rows(300)
    lows, highs = np.array(BOUNDS).T
    farther = np.where(x > highs, x * 1000 + 1e6, np.where(x < lows, x * 1000 - 1e6, x))
    # act: the same noise draw on both
    a = release_moments(x, BOUNDS, 3.0, np.random.default_rng(7))
    b = release_moments(farther.astype(np.float64), BOUNDS, 3.0, np.random.default_rng(7))
    # assert
    assert a == b
    mean, std = a
    assert all(lo <= m <= hi for m, (lo, hi) in zip(mean, BOUNDS, strict=True))
    assert all(0 < s <= (hi - lo) / 2 for s, (lo, hi) in zip(std, BOUNDS, strict=True))


def test_the_noise_scale_spends_exactly_the_rho_charged_for_the_sensitivity() -> None:
    rho = 0.02
    sigma = moments_sigma(D, rho)
    sensitivity = math.sqrt(2 * D)
    assert sensitivity**2 / (2 * sigma**2) == pytest.approx(rho, rel=1e-12)


def test_the_noise_drawn_has_the_claimed_scale() -> None:
    # arrange: every row at the bounds' centres (z = 0), so only noise varies
    x = np.tile(np.array(BOUNDS).mean(axis=1), (100, 1))
    sigma = 4.0
    draws = np.array(
        [
            np.array(release_moments(x, BOUNDS, sigma, np.random.default_rng(s))[0])
            for s in range(400)
        ]
    )
    half = (np.array(BOUNDS)[:, 1] - np.array(BOUNDS)[:, 0]) / 2
    # the mean of z is (Σz + N(0, σ²)) / n: its spread is σ/n in z, times the half-width
    spread = draws.std(axis=0) / half
    assert np.allclose(spread, sigma / 100, rtol=0.15)


@pytest.mark.parametrize("rho", [1e-4, 0.01, 0.5, 3.0])
def test_the_ledger_curve_is_at_least_dp_accountings_gaussian_rdp(rho: float) -> None:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    # arrange: the release is one Gaussian with noise multiplier σ/Δ on the 2d sums
    sigma, sensitivity = moments_sigma(D, rho), math.sqrt(2 * D)
    reference = rdp_lib.RdpAccountant(orders=list(acc.ORDERS))
    reference.compose(dp_accounting.GaussianDpEvent(sigma / sensitivity))
    # act
    curve = acc.rdp_curve(statistics_event(rho))
    # assert: order by order, and in ε at δ = 1e-5
    for units, exact in zip(curve, reference._rdp, strict=True):
        assert units / acc.UNITS_PER_NAT >= exact
    assert acc.epsilon(curve, 1e-5) >= reference.get_epsilon(1e-5) - 1e-9


def test_bad_bounds_are_named() -> None:
    assert bounds_problem([(0, 1)], 2) is not None
    assert bounds_problem([(1, 1), (0, 1)], 2) is not None
    assert bounds_problem([(0, float("nan")), (0, 1)], 2) is not None
    assert bounds_problem([(0, 1e13), (0, 1)], 2) is not None
    assert bounds_problem([(0, 1), (-2, 3)], 2) is None


def test_the_exported_and_downloaded_models_standardise_inputs_as_training_did(
    tmp_path: Path,
) -> None:
    # arrange: released statistics and a network trained on standardised rows
    mean, std = release_moments(rows(500), BOUNDS, 0.0, np.random.default_rng(0))
    stats = DatasetStatistics(
        status="ready", epsilon=None, rho=0.0, rho_bounds=0.0, noise_std=0.0,
        sensitivity=math.sqrt(2 * D), bounds_source="declared", bounds=BOUNDS, mean=mean, std=std,
    )  # fmt: skip
    scaling = tuple((lo, hi, m, s) for (lo, hi), m, s in zip(BOUNDS, mean, std, strict=True))
    shape = ModelShape(
        model=ModelSpec(arch="mlp", hidden_sizes=[8]), num_features=D, num_classes=3,
        standardize=scaling,
    )  # fmt: skip
    torch.manual_seed(0)
    net = build_model(shape.model, num_features=D, num_classes=3).eval()
    metadata = {"architecture": shape.to_metadata()}
    save_model(tmp_path / "m.safetensors", net.state_dict(), metadata=metadata)
    export_onnx(tmp_path / "m.onnx", net.state_dict(), metadata=metadata)
    raw = rows(64, seed=3)
    with torch.no_grad():
        trained = net(torch.from_numpy(standardize(raw, stats))).numpy()
    # act: the served graph and the downloaded weights, fed raw rows
    import hashlib

    data = (tmp_path / "m.onnx").read_bytes()
    served = load_onnx(tmp_path / "m.onnx", sha256=hashlib.sha256(data).hexdigest())
    (served_logits,) = served.session.run(["logits"], {"input": raw})
    downloaded, _ = load_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        downloaded_logits = downloaded(torch.from_numpy(raw)).numpy()
    # assert
    assert np.allclose(served_logits, trained, atol=1e-5)
    assert np.allclose(downloaded_logits, trained, atol=1e-6)
    # and without the transform the network answers differently (the test has teeth)
    with torch.no_grad():
        assert not np.allclose(net(torch.from_numpy(raw)).numpy(), trained, atol=1e-3)


def test_an_uploads_schema_refuses_bounds_that_are_not_ranges_or_miss_features() -> None:
    from ppml.datasets.schema import check_bounds, parse_schema
    from ppml.errors import InvalidInput

    with pytest.raises(InvalidInput) as reversed_pair:
        parse_schema('{"classes": ["a", "b"], "bounds": [[1, 0]]}', max_classes=10)
    assert reversed_pair.value.field == "schema.bounds"
    schema = parse_schema('{"classes": ["a", "b"], "bounds": [[0, 1], [2, 3]]}', max_classes=10)
    with pytest.raises(InvalidInput) as too_few:
        check_bounds(schema, 3)
    assert too_few.value.field == "schema.bounds"
    check_bounds(schema, 2)
