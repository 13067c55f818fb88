"""The architecture registry: torch-free counts and checks, held to the torch modules."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppml.architectures import (
    ARCHITECTURES,
    ModelShape,
    architecture,
    count_parameters,
    model_problem,
)
from ppml.specs import ModelSpec

torch = pytest.importorskip("torch")

from ppml.training.models import build_model  # noqa: E402

SIZES = st.integers(1, 24)
SPECS = st.builds(
    ModelSpec,
    arch=st.sampled_from(sorted(ARCHITECTURES)),
    hidden_sizes=st.lists(SIZES, max_size=3),
    channels=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    kernel_size=st.integers(1, 7),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=SPECS, num_features=st.integers(1, 70), num_classes=st.integers(1, 12))
def test_the_registry_counts_and_refuses_exactly_what_torch_builds(
    model: ModelSpec, num_features: int, num_classes: int
) -> None:
    # arrange
    problem = model_problem(model, num_features=num_features)
    # act / assert
    if problem is not None:  # narrow cnn1d blocks on a length-1 signal
        with pytest.raises(ValueError, match="1 channel on a signal of length 1"):
            build_model(model, num_features=num_features, num_classes=num_classes)
        return
    module = build_model(model, num_features=num_features, num_classes=num_classes)
    built = sum(p.numel() for p in module.parameters())
    assert count_parameters(model, num_features=num_features, num_classes=num_classes) == built


def test_every_spec_architecture_has_one_entry() -> None:
    names = get_args(ModelSpec.model_fields["arch"].annotation)

    assert sorted(ARCHITECTURES) == sorted(names)
    assert all(ARCHITECTURES[name].name == name for name in names)


def test_unknown_architecture_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        architecture("resnet")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(ModelSpec.model_construct(arch="resnet"), num_features=4, num_classes=2)


def test_a_one_channel_block_on_a_length_one_signal_names_the_channels() -> None:
    problem = model_problem(ModelSpec(arch="cnn1d", channels=[4, 1]), num_features=2)

    assert problem is not None and problem.field == "channels"
    assert problem.message.startswith("cnn1d block 1 has 1 channel")
    assert model_problem(ModelSpec(arch="cnn1d", channels=[4, 2]), num_features=2) is None


def test_metadata_is_sorted_json_and_reads_back() -> None:
    shape = ModelShape(
        model=ModelSpec(arch="mlp", hidden_sizes=[4], channels=[2]), num_features=3, num_classes=2
    )

    text = shape.to_metadata()

    assert text == (
        '{"arch": "mlp", "channels": [2], "hidden_sizes": [4], "kernel_size": 5, '
        '"num_classes": 2, "num_features": 3}'
    )
    assert ModelShape.from_metadata(text) == shape


@pytest.mark.parametrize(
    "text",
    ["not json", "[]", '{"arch": "mlp"}', '{"arch": "rnn", "num_features": 3, "num_classes": 2}'],
)
def test_malformed_metadata_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        ModelShape.from_metadata(text)


def test_the_registry_does_not_import_torch() -> None:
    code = "import sys, ppml.architectures; sys.exit('torch' in sys.modules)"

    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
