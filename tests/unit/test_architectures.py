"""The architecture registry: torch-free counts and checks, held to the torch modules."""

from __future__ import annotations

import math
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


# no declared shape, a flat one, or an image [C, H, W] (1x1 and 1xW maps included)
INPUT_SHAPES = st.one_of(
    st.none(),
    st.tuples(st.integers(1, 70)),
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=SPECS, input_shape=INPUT_SHAPES, width=st.integers(1, 70), classes=st.integers(1, 12))
def test_the_registry_counts_and_refuses_exactly_what_torch_builds(
    model: ModelSpec, input_shape: tuple[int, ...] | None, width: int, classes: int
) -> None:
    # arrange
    features = width if input_shape is None else math.prod(input_shape)
    sizes = {"num_features": features, "num_classes": classes, "input_shape": input_shape}
    problem = model_problem(model, num_features=features, input_shape=input_shape)
    # act / assert
    if problem is not None:  # cnn2d without an image shape; 1-channel blocks on 1 position
        match = "input_shape" if problem.field == "arch" else "1 channel on a"
        with pytest.raises(ValueError, match=match):
            build_model(model, **sizes)
        with pytest.raises(ValueError, match=match):
            count_parameters(model, **sizes)
        return
    module = build_model(model, **sizes)
    built = sum(p.numel() for p in module.parameters())
    assert count_parameters(model, **sizes) == built
    assert module(torch.zeros(2, features)).shape == (2, classes)


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


def test_cnn2d_needs_an_image_shape_and_names_the_arch_field() -> None:
    spec = ModelSpec(arch="cnn2d", channels=[4, 8], kernel_size=3)

    for shape in (None, (64,), (8, 8)):
        problem = model_problem(spec, num_features=64, input_shape=shape)
        assert problem is not None and problem.field == "arch"
        assert "3-D input_shape" in problem.message
    assert model_problem(spec, num_features=64, input_shape=(1, 8, 8)) is None
    one = model_problem(
        ModelSpec(arch="cnn2d", channels=[4, 1]), num_features=4, input_shape=(1, 2, 2)
    )
    assert one is not None and one.field == "channels" and "1x1 map" in one.message


def test_an_input_shape_must_hold_the_features() -> None:
    spec = ModelSpec(arch="cnn2d")

    with pytest.raises(ValueError, match="holds 64 values per row; the data has 65"):
        ModelShape(model=spec, num_features=65, num_classes=2, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="1 to 3 positive sizes"):
        ModelShape(model=spec, num_features=64, num_classes=2, input_shape=(1, 1, 8, 8))


def test_only_image_architectures_ask_for_an_image_shape() -> None:
    # what a rule choosing an architecture from public metadata reads
    assert ARCHITECTURES["cnn2d"].fits((1, 8, 8))
    assert not ARCHITECTURES["cnn2d"].fits(None) and not ARCHITECTURES["cnn2d"].fits((64,))
    assert all(ARCHITECTURES[name].fits(None) for name in ("logreg", "mlp", "cnn1d"))


def test_image_metadata_records_the_input_shape_and_reads_back() -> None:
    shape = ModelShape(
        model=ModelSpec(arch="cnn2d", channels=[2]),
        num_features=12,
        num_classes=2,
        input_shape=(3, 2, 2),
    )

    text = shape.to_metadata()

    assert '"input_shape": [3, 2, 2]' in text
    assert ModelShape.from_metadata(text) == shape
    assert ModelShape.from_metadata(text).parameter_count == 2 * 3 * 25 + 6 + (2 + 1) * 2


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
