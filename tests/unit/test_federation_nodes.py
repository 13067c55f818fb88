"""Pure pieces of federations (#16): a node's sample-level plan, the checks of updates,
the federation schema."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError
from safetensors.numpy import save

from ppml.federation.privacy import node_sample_plan
from ppml.federation.schema import FederationSchema
from ppml.federation.updates import MalformedUpdate, check_update
from ppml.privacy import accounting as acc
from ppml.specs import JobSpec

SHAPES = {"w": (2, 3), "b": (2,)}


def _spec(*, rounds: int = 5, local_epochs: int = 2, epsilon: float = 2.0) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "fed",
            "model": {"arch": "logreg"},
            "training": {"epochs": 1, "batch_size": 50, "learning_rate": 0.1},
            "privacy": {"target_epsilon": epsilon, "delta": 1e-5, "level": "sample"},
            "federated": {"federation_id": "fed_x", "rounds": rounds, "local_epochs": local_epochs},
        }
    )


@pytest.mark.parametrize("rows", [60, 400, 10_000])
def test_a_node_taking_part_in_every_round_spends_exactly_the_target(rows: int) -> None:
    # arrange
    spec = _spec()
    # act
    plan = node_sample_plan(spec, rows)
    spent = acc.epsilon(acc.rdp_curve(plan.event()), plan.delta)
    # assert: the ledger's own accounting of all rounds, at most the target and tight
    assert plan.sample_rate == min(1.0, 50 / rows)
    assert plan.steps == 2 * math.ceil(1 / plan.sample_rate)
    assert spent <= 2.0 and spent == pytest.approx(2.0, rel=1e-3)
    assert acc.epsilon(acc.rdp_curve(plan.event(1)), plan.delta) < spent


def test_smaller_nodes_get_more_noise() -> None:
    spec = _spec()
    assert (
        node_sample_plan(spec, 200).noise_multiplier
        > node_sample_plan(spec, 20_000).noise_multiplier
    )


def _update(tensors: dict[str, np.ndarray], **metadata: str) -> bytes:
    return save(tensors, metadata=metadata or None)


def _zeros(value: float = 0.0) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in SHAPES.items()}


def test_a_well_formed_update_passes_with_its_epsilon() -> None:
    checked = check_update(_update(_zeros(0.1), epsilon="0.25"), SHAPES, clip_norm=1.0)
    assert checked.epsilon == 0.25 and checked.epsilon_total is None
    assert checked.norm == pytest.approx(math.sqrt(8 * 0.01), rel=1e-6)


@pytest.mark.parametrize(
    ("tensors", "metadata", "clip", "reason"),
    [
        ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}, {}, None, "shape"),
        ({"w": np.zeros((2, 3), np.float32)}, {}, None, "missing"),
        ({**_zeros(), "extra": np.zeros(1, np.float32)}, {}, None, "unexpected"),
        ({"w": np.zeros((2, 3), np.float64), "b": np.zeros(2, np.float32)}, {}, None, "F32"),
        ({"w": np.full((2, 3), np.inf, np.float32), "b": np.zeros(2, np.float32)}, {}, None, "NaN"),
        (_zeros(1.0), {}, 1.0, "norm"),
        (_zeros(), {"epsilon": "nan"}, None, "epsilon"),
        (_zeros(), {"epsilon": "-1"}, None, "epsilon"),
    ],
)
def test_malformed_updates_are_refused(
    tensors: dict[str, np.ndarray], metadata: dict[str, str], clip: float | None, reason: str
) -> None:
    with pytest.raises(MalformedUpdate, match=reason):
        check_update(_update(tensors, **metadata), SHAPES, clip_norm=clip)


@pytest.mark.parametrize(
    "body", [b"", b"\x00" * 7, b"\xff" * 16, b"\x02\x00\x00\x00\x00\x00\x00\x00[]"]
)
def test_what_is_not_safetensors_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedUpdate):
        check_update(body, SHAPES, clip_norm=None)


def test_a_truncated_update_is_malformed() -> None:
    body = _update(_zeros())
    with pytest.raises(MalformedUpdate):
        check_update(body[:-4], SHAPES, clip_norm=None)


def test_a_federation_schema_names_features_or_a_shape() -> None:
    assert FederationSchema(classes=["a", "b"], features=["x", "y"]).num_features == 2
    assert FederationSchema(classes=["a", "b"], input_shape=[1, 8, 8]).num_features == 64
    with pytest.raises(ValidationError):
        FederationSchema(classes=["a", "b"])
    with pytest.raises(ValidationError):
        FederationSchema(classes=["a", "b"], features=["x", "y"], input_shape=[3])
