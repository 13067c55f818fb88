"""The single-pass DP-SGD engine against Opacus and against per-sample autograd.

With σ = 0 the engine's gradient must equal Opacus' clipped, averaged gradient to 1e-5
(relative: on the whole gradient and on each parameter that carries 1% of it) for every
native layer type and every built-in architecture, with empty batches and single rows.
Where Opacus itself departs from the layer's true per-sample gradient (non-zero padding
modes, ``padding_idx``) the reference is a loop of one backward pass per sample.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from opacus import GradSampleModule  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from ppml.architectures import ARCHITECTURES  # noqa: E402
from ppml.specs import ModelSpec  # noqa: E402
from ppml.training import (  # noqa: E402
    DPPlan,
    TrainingPlan,
    TrainResult,
    build_model,
    steppers,
    train,
)
from ppml.training.fast_dp import FastDPEngine, small_maps, unsupported_layers  # noqa: E402
from ppml.training.fast_dp.bilinear import _channel_minor, prefer_ghost  # noqa: E402
from ppml.training.fast_dp.rules import GroupNormRule, Rule  # noqa: E402
from tests.unit.shapes import input_shape_for  # noqa: E402

RTOL = 1e-5
HYPOTHESIS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# empty Poisson batches and single rows are the edge cases; the rest is ordinary
BATCHES = st.one_of(st.sampled_from([0, 1]), st.integers(2, 24))
CLIPS = st.sampled_from([0.05, 0.5, 5.0])

Batch = tuple[Tensor, Tensor]


@pytest.fixture(autouse=True)
def _quiet_opacus() -> Iterator[None]:
    with warnings.catch_warnings():
        # Opacus' hooks on the first layer fire although the input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


# --- references ---------------------------------------------------------------------


def _loss(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def fast_grads(model: nn.Module, batch: Batch, clip: float, expected: int) -> list[Tensor]:
    model = copy.deepcopy(model)
    engine = FastDPEngine(
        model,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=expected,
        generator=torch.Generator(),
    )
    engine.backward(_loss(model, batch))
    engine.close()
    return [p.grad.clone() for p in model.parameters()]


def opacus_grads(model: nn.Module, batch: Batch, clip: float, expected: int) -> list[Tensor]:
    model = copy.deepcopy(model)
    gsm = GradSampleModule(model, loss_reduction="sum", strict=True)
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=expected,
        loss_reduction="mean",
    )
    optimizer.zero_grad()
    _loss(gsm, batch).backward()
    optimizer.pre_step()  # clip, sum, (zero) noise, divide by the expected batch size
    return [p.grad.clone() for p in model.parameters()]


def looped_grads(model: nn.Module, batch: Batch, clip: float, expected: int) -> list[Tensor]:
    """Textbook DP-SGD: one backward pass per sample, Opacus' clip factor."""
    params = list(model.parameters())
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i in range(len(batch[0])):
        grads = torch.autograd.grad(
            _loss(model, (batch[0][i : i + 1], batch[1][i : i + 1])), params
        )
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        factor = min(1.0, clip / (norm + 1e-6))
        for acc, g in zip(total, grads, strict=True):
            acc += factor * g.double()
    return [(acc / expected).float() for acc in total]


def _norm(tensors: list[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def assert_close(ours: list[Tensor], reference: list[Tensor]) -> None:
    """1e-5 relative on the whole gradient, and on every parameter that carries 1% of it.

    Below that, a parameter's gradient can be float32 rounding of terms that cancel
    (a conv bias under a GroupNorm of one channel per group is exactly 0 in theory);
    the bound on the whole gradient still covers it.
    """
    assert len(ours) == len(reference)
    total = _norm(reference)
    assert _norm([a - b for a, b in zip(ours, reference, strict=True)]) <= RTOL * total + 1e-12
    for got, want in zip(ours, reference, strict=True):
        if _norm([want]) >= 0.01 * total:
            assert _norm([got - want]) <= RTOL * _norm([want])


def check(
    model: nn.Module,
    batch: Batch,
    clip: float,
    reference: Callable[[nn.Module, Batch, float, int], list[Tensor]] = opacus_grads,
) -> None:
    expected = max(len(batch[0]), 1) + 3
    ours = fast_grads(model, batch, clip, expected)
    if len(batch[0]) == 0:
        assert all(not g.any() for g in ours)  # σ = 0: nothing to add
    else:
        assert_close(ours, reference(model, batch, clip, expected))


def labels(batch_size: int, classes: int) -> Tensor:
    return torch.randint(0, classes, (batch_size,))


def build(spec: ModelSpec, features: int, classes: int) -> nn.Module:
    return build_model(
        spec,
        num_features=features,
        num_classes=classes,
        input_shape=input_shape_for(spec.arch, features),
    )


# --- every native layer type against Opacus ----------------------------------------


@HYPOTHESIS
@given(
    batch=BATCHES,
    positions=st.sampled_from([0, 1, 2, 5]),
    d=st.integers(1, 9),
    k=st.integers(1, 9),
    bias=st.booleans(),
    clip=CLIPS,
    seed=st.integers(0, 2**16),
)
def test_linear_matches_opacus(
    batch: int, positions: int, d: int, k: int, bias: bool, clip: float, seed: int
) -> None:
    # positions 0 means a plain (B, d) input; otherwise (B, T, d), ghost or materialised
    torch.manual_seed(seed)
    shape = (batch, d) if positions == 0 else (batch, positions, d)
    width = k * max(positions, 1)
    model = nn.Sequential(nn.Linear(d, k, bias=bias), nn.Tanh(), nn.Flatten(), nn.Linear(width, 3))
    check(model, (torch.randn(shape), labels(batch, 3)), clip)


@HYPOTHESIS
@given(
    batch=BATCHES,
    conv=st.sampled_from(
        [
            dict(kernel_size=3),
            dict(kernel_size=4, padding="same", dilation=2),  # asymmetric "same"
            dict(kernel_size=3, stride=2, padding=2),
            dict(kernel_size=2, groups=2, bias=False),
            dict(kernel_size=1),
        ]
    ),
    length=st.integers(4, 12),
    two_d=st.booleans(),
    clip=CLIPS,
    seed=st.integers(0, 2**16),
)
def test_convolutions_match_opacus(
    batch: int, conv: dict[str, Any], length: int, two_d: bool, clip: float, seed: int
) -> None:
    torch.manual_seed(seed)
    layer_type = nn.Conv2d if two_d else nn.Conv1d
    layer = layer_type(4, 6, **conv)
    shape = (batch, 4, length, 3) if two_d else (batch, 4, length)
    with torch.no_grad():
        flat = layer(torch.zeros(1, *shape[1:])).numel()
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.Linear(flat, 3))
    check(model, (torch.randn(shape), labels(batch, 3)), clip)


@HYPOTHESIS
@given(
    batch=BATCHES,
    positions=st.integers(1, 6),
    clip=CLIPS,
    seed=st.integers(0, 2**16),
)
def test_embedding_matches_opacus(batch: int, positions: int, clip: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Flatten(), nn.Linear(5 * positions, 3))
    # few distinct tokens, so repeated indices inside a sample are common
    check(model, (torch.randint(0, 7, (batch, positions)), labels(batch, 3)), clip)


@HYPOTHESIS
@given(
    batch=BATCHES,
    kind=st.sampled_from(["group", "layer over the last dim", "layer over both dims"]),
    length=st.integers(1, 6),
    clip=CLIPS,
    seed=st.integers(0, 2**16),
)
def test_norm_layers_match_opacus(
    batch: int, kind: str, length: int, clip: float, seed: int
) -> None:
    torch.manual_seed(seed)
    norm: nn.Module = {
        "group": nn.GroupNorm(3, 6),
        "layer over the last dim": nn.LayerNorm(length),
        "layer over both dims": nn.LayerNorm([6, length]),
    }[kind]
    with torch.no_grad():  # move the affine parameters off their (1, 0) start
        for p in norm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.Linear(6 * length, 3))
    check(model, (torch.randn(batch, 6, length) * 2 + 1, labels(batch, 3)), clip)


def test_group_norm_without_saved_statistics_recomputes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the statistics normally come from autograd's saved tensors; this is the fallback
    monkeypatch.setattr(GroupNormRule, "capture", Rule.capture)
    torch.manual_seed(7)
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(20, 3))

    check(model, (torch.randn(9, 4, 5) * 3 - 1, labels(9, 3)), 0.5)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=4, padding="same", dilation=2),  # asymmetric "same"
        dict(kernel_size=3, stride=2, padding=2),
        dict(kernel_size=(2, 3), padding=1, bias=False),
        dict(kernel_size=5, stride=5),  # one position: the ghost norm
    ],
)
def test_wide_convolutions_on_small_maps_build_channel_minor_patches_and_match_opacus(
    conv: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16 input channels on a 5x6 map: patches in (offset, channel) order (the pixel-Gram
    # route, which would take the one-position case, is switched off)
    monkeypatch.setattr(small_maps, "MAX_POSITION_PAIRS", 0)
    torch.manual_seed(8)
    layer = nn.Conv2d(16, 6, **conv)
    with torch.no_grad():
        flat = layer(torch.zeros(1, 16, 5, 6)).numel()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3))

    assert _channel_minor(layer)
    check(model, (torch.randn(13, 16, 5, 6), labels(13, 3)), 0.5)


def test_channel_minor_patches_follow_non_zero_padding_modes() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(16, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(64, 3)
    )

    check(model, (torch.randn(7, 16, 4, 4), labels(7, 3)), 0.5, reference=looped_grads)


@pytest.mark.parametrize("groups", [1, 4])
def test_ghost_norm_convolutions_match_opacus(groups: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # a 2x2 stride-2 convolution on a 2x2 map has one position: the ghost path (not the
    # pixel-Gram route, switched off here, which one group would otherwise take)
    monkeypatch.setattr(small_maps, "MAX_POSITION_PAIRS", 0)
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 16, 2, stride=2, groups=groups)
    model = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.ReLU(), conv, nn.Flatten())
    model.append(nn.Linear(16, 3))

    assert prefer_ghost(1, 8 // groups * 4, 16 // groups)
    check(model, (torch.randn(20, 3, 4, 4), labels(20, 3)), 0.5)


@HYPOTHESIS
@given(
    arch=st.sampled_from(sorted(ARCHITECTURES)),
    batch=BATCHES,
    features=st.integers(1, 40),
    clip=CLIPS,
    seed=st.integers(0, 2**16),
)
def test_builtin_architectures_match_opacus(
    arch: str, batch: int, features: int, clip: float, seed: int
) -> None:
    # a GroupNorm over one value cannot train: a CNN on one feature needs two rows
    assume(not (arch.startswith("cnn") and features == 1 and batch == 1))
    torch.manual_seed(seed)
    spec = ModelSpec(arch=arch, hidden_sizes=[16, 8], channels=[4, 6])
    model = build(spec, features, 10)
    assert unsupported_layers(model) == []
    check(model, (torch.randn(batch, features), labels(batch, 10)), clip)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_mnist1d_shaped_architectures_match_opacus(arch: str) -> None:
    torch.manual_seed(0)
    model = build(ModelSpec(arch=arch, hidden_sizes=[256, 256]), 40, 10)

    check(model, (torch.randn(64, 40), labels(64, 10)), 1.0)


@HYPOTHESIS
@given(
    batch=BATCHES,
    image=st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
    channels=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    kernel=st.integers(1, 5),
    clip=CLIPS,
    seed=st.integers(0, 2**16),
)
def test_cnn2d_on_any_image_shape_matches_opacus(
    batch: int,
    image: tuple[int, int, int],
    channels: list[int],
    kernel: int,
    clip: float,
    seed: int,
) -> None:
    # odd sides, 1-wide maps, even kernels (asymmetric "same" padding), pooled to 1x1
    assume(not (image[1] * image[2] == 1 and batch == 1))
    torch.manual_seed(seed)
    spec = ModelSpec(arch="cnn2d", channels=channels, kernel_size=kernel)
    features = math.prod(image)
    model = build_model(spec, num_features=features, num_classes=5, input_shape=image)
    with torch.no_grad():  # move the GroupNorm affine parameters off their (1, 0) start
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)

    assert unsupported_layers(model) == []
    check(model, (torch.randn(batch, features), labels(batch, 5)), clip)


@pytest.mark.parametrize(
    ("image", "channels"),
    [((1, 8, 8), [16, 32]), ((1, 28, 28), [16, 32])],  # digits; MNIST-sized
)
def test_image_shaped_cnn2d_matches_opacus(
    image: tuple[int, int, int], channels: list[int]
) -> None:
    # 8x8: patches on every layer; 28x28: the grouped per-sample kernel on the first
    torch.manual_seed(0)
    features = math.prod(image)
    spec = ModelSpec(arch="cnn2d", channels=channels, kernel_size=3)
    model = build_model(spec, num_features=features, num_classes=10, input_shape=image)

    check(model, (torch.rand(32, features), labels(32, 10)), 1.0)


# --- where the true per-sample gradient is the reference -----------------------------


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_match_per_sample_autograd(mode: str) -> None:
    # Opacus unfolds with zero padding whatever the mode; the engine pads like the layer
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, padding_mode=mode), nn.Flatten(), nn.Linear(24, 3)
    )

    check(model, (torch.randn(9, 2, 8), labels(9, 3)), 0.5, reference=looped_grads)


def test_embedding_padding_row_gets_no_gradient() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Flatten(), nn.Linear(16, 3))
    tokens = torch.randint(0, 6, (11, 4))
    tokens[:, 0] = 0

    check(model, (tokens, labels(11, 3)), 0.5, reference=looped_grads)
    assert not fast_grads(model, (tokens, labels(11, 3)), 0.5, 11)[0][0].any()


class _Reused(nn.Module):
    """One Linear applied twice: its per-sample gradients add before clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(torch.tanh(self.inner(x))))


def test_a_module_called_twice_matches_per_sample_autograd() -> None:
    torch.manual_seed(3)

    check(_Reused(), (torch.randn(10, 5), labels(10, 3)), 0.5, reference=looped_grads)


def test_unsupported_layers_fall_back_to_opacus_samplers() -> None:
    # InstanceNorm has an Opacus sampler but no native rule; the head stays native
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.InstanceNorm1d(4, affine=True), nn.Flatten(), nn.Linear(24, 3)
    )

    assert unsupported_layers(model) == ["1"]
    check(model, (torch.randn(10, 4, 6), labels(10, 3)), 0.5)


def test_inplace_activation_after_a_layer_keeps_the_right_gradient() -> None:
    # the engine reads the gradient *into* the layer output, before ReLU rewrote it
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    plain = nn.Sequential(*[copy.deepcopy(m) for m in model])
    plain[1] = nn.ReLU()
    batch = (torch.randn(12, 6), labels(12, 3))

    assert_close(fast_grads(model, batch, 0.5, 12), opacus_grads(plain, batch, 0.5, 12))


# --- the mixed strategy --------------------------------------------------------------


class _CountingPixelGram(small_maps.PixelGram):
    made = 0

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        _CountingPixelGram.made += 1


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (dict(kernel_size=3, padding="same"), (16, 4, 4)),  # cnn2d's second block, digits
        (dict(kernel_size=5, padding="same"), (16, 4, 4)),  # ... with the 5x5 default
        (dict(kernel_size=4, padding="same", dilation=2), (3, 4, 4)),  # asymmetric "same"
        (dict(kernel_size=3, stride=2, padding=2, bias=False), (5, 4, 3)),
        (dict(kernel_size=(2, 3), padding=(1, 0)), (2, 3, 5)),
        (dict(kernel_size=3, padding=1, padding_mode="reflect"), (4, 3, 3)),
        (dict(kernel_size=5, padding=2), (8, 12)),  # 1-D
        (dict(kernel_size=3, stride=3, dilation=2), (6, 16)),
    ],
)
def test_convolutions_on_small_maps_take_pixel_grams_and_match_per_sample_gradients(
    conv: dict[str, Any], shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(small_maps, "PixelGram", _CountingPixelGram)
    _CountingPixelGram.made = 0
    torch.manual_seed(11)
    layer = (nn.Conv2d if len(shape) == 3 else nn.Conv1d)(shape[0], 7, **conv)
    with torch.no_grad():
        flat = layer(torch.zeros(1, *shape)).numel()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(flat, 3))
    batch = (torch.randn(17, *shape), labels(17, 3))

    # per-sample autograd: Opacus departs from it for non-zero padding modes
    check(model, batch, 0.5, reference=looped_grads)
    check(model, batch, 50.0, reference=looped_grads)  # nothing clipped: the plain sum
    assert _CountingPixelGram.made == 2


def test_pixel_grams_only_on_small_maps_of_one_group() -> None:
    conv = nn.Conv2d(16, 32, 3, padding="same")
    assert small_maps.fits(conv, 16, 16)  # 4x4 in, 4x4 out
    assert not small_maps.fits(conv, 64, 64)  # 8x8: M would be 4096 x 4096
    assert not small_maps.fits(nn.Conv2d(16, 32, 3, groups=4), 16, 16)


def test_ghost_norm_for_flat_inputs_and_materialised_for_long_sequences() -> None:
    assert prefer_ghost(1, 40, 256)  # any Linear on (B, d)
    assert prefer_ghost(2, 8, 8) and not prefer_ghost(3, 8, 8)
    assert not prefer_ghost(196, 144, 32)  # 3x3 conv on 14x14: per-sample gradients


# --- noise, empty batches, refusal ---------------------------------------------------


def _engine(model: nn.Module, sigma: float, seed: int) -> FastDPEngine:
    generator = torch.Generator().manual_seed(seed)
    return FastDPEngine(
        model, noise_multiplier=sigma, max_grad_norm=0.5, expected_batch_size=4, generator=generator
    )


def test_empty_batch_gives_noise_of_std_sigma_c_over_b() -> None:
    # arrange
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    engine = _engine(model, sigma=2.0, seed=0)

    # act
    engine.backward(_loss(model, (torch.randn(0, 100), labels(0, 10))))

    # assert: N(0, (σC)²) / B_expected = N(0, 0.25²) in every coordinate
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert noise.numel() == 11110
    assert abs(float(noise.mean())) < 0.01
    assert float(noise.std()) == pytest.approx(0.25, rel=0.03)


def test_noise_is_seeded_by_the_generator_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    batch = (torch.randn(5, 3), labels(5, 2))

    def run(seed: int) -> Tensor:
        net = copy.deepcopy(model)
        engine = _engine(net, sigma=1.0, seed=seed)
        engine.backward(_loss(net, batch))
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_hooks_record_nothing_in_eval_or_no_grad_and_go_on_close() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    engine = _engine(model, sigma=1.0, seed=0)
    with torch.no_grad():
        model(torch.randn(4, 3))

    with pytest.raises(RuntimeError, match="no forward pass"):
        engine.backward(torch.zeros((), requires_grad=True))
    engine.close()
    assert not model[0]._forward_hooks


def test_tied_parameters_and_buffers_are_refused() -> None:
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(NotImplementedError, match="shared"):
        _engine(tied, sigma=1.0, seed=0)
    with pytest.raises(NotImplementedError):
        _engine(nn.Sequential(nn.BatchNorm1d(4)), sigma=1.0, seed=0)


# --- train(): the switch -------------------------------------------------------------


def _tiny_run(arch: str, engine: str, dp_seed: int = 3) -> TrainResult:
    # 12 features: cnn2d sees them as a 1 x 3 x 4 image
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 12)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)
    plan = TrainingPlan(
        model=ModelSpec(arch=arch, hidden_sizes=[16], channels=[4, 6], kernel_size=3),
        epochs=3,
        batch_size=32,
        learning_rate=0.3,
        optimizer="sgd",
        momentum=0.5,
        steps_per_epoch=8,
        total_steps=24,
        input_shape=input_shape_for(arch, 12),
    )
    dp = DPPlan(
        noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=32 / 240, delta=1e-4, engine=engine
    )
    return train(
        x_train=x, y_train=y, x_test=x, y_test=y, num_classes=4, plan=plan, dp=dp, dp_seed=dp_seed
    )


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_both_engines_train_the_same_model_from_one_seed(arch: str) -> None:
    # same masks, same noise, same clipping: only rounding differs
    fast, opacus = _tiny_run(arch, "fast"), _tiny_run(arch, "opacus")

    assert fast.steps_done == opacus.steps_done == 24
    assert_close(list(fast.state_dict.values()), list(opacus.state_dict.values()))


def test_auto_uses_the_fast_engine_for_builtin_architectures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[FastDPEngine] = []

    class Spy(FastDPEngine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(steppers, "FastDPEngine", Spy)
    _tiny_run("mlp", "auto")
    assert len(built) == 1
    _tiny_run("mlp", "opacus")
    assert len(built) == 1


def test_unknown_engine_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="engine"):
        DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, delta=1e-5, engine="x")
