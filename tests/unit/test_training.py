"""Unit tests of the torch training core: model zoo, DP-SGD loop and export."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.recorder import Recorder

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from ppml.architectures import ARCHITECTURES, ModelShape  # noqa: E402
from ppml.specs import ModelSpec  # noqa: E402
from ppml.storage import LocalStore  # noqa: E402
from ppml.training import (  # noqa: E402
    DPPlan,
    TrainingPlan,
    TrainResult,
    build_model,
    load_model,
    save_model,
    train,
)
from tests.unit.shapes import input_shape_for  # noqa: E402

# Documented defaults found by a sweep (5 seeds each, digits, eps=3): SGD lr=0.5 without
# momentum averaged 0.93 test accuracy; Adam lr=0.01 was on par.
DIGITS_LR = 0.5
DIGITS_EPOCHS = 30
DIGITS_BATCH = 128
TARGET_EPSILON = 3.0
DELTA = 1e-5


def spec_of(arch: str) -> ModelSpec:
    # channels=6 exercises a GroupNorm whose group count is not min(4, c)
    return ModelSpec(arch=arch, hidden_sizes=[32, 16], channels=[8, 6], kernel_size=3)


@dataclass
class Digits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def fit(self, **kwargs: Any) -> TrainResult:
        """Trains on these arrays; ``kwargs`` go to ``train`` and may override arrays."""
        arrays = {
            "x_train": self.x_train,
            "y_train": self.y_train,
            "x_test": self.x_test,
            "y_test": self.y_test,
        }
        return train(**{**arrays, "num_classes": 10, "device": "cpu", **kwargs})


@pytest.fixture(scope="module")
def digits() -> Digits:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        (x / 16).astype(np.float32), y.astype(np.int64), test_size=0.2, stratify=y, random_state=0
    )
    return Digits(x_tr, y_tr, x_te, y_te)


def make_plan(
    n_train: int,
    *,
    arch: str = "mlp",
    epochs: int = DIGITS_EPOCHS,
    batch_size: int = DIGITS_BATCH,
    channels: tuple[int, ...] = (16, 32),
) -> TrainingPlan:
    steps_per_epoch = math.ceil(n_train / batch_size)
    return TrainingPlan(
        model=ModelSpec(arch=arch, hidden_sizes=[128], channels=list(channels), kernel_size=5),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=DIGITS_LR,
        optimizer="sgd",
        seed=0,
        steps_per_epoch=steps_per_epoch,
        total_steps=epochs * steps_per_epoch,
    )


def make_dp(n_train: int, plan: TrainingPlan, noise_multiplier: float | None = None) -> DPPlan:
    q = plan.batch_size / n_train
    if noise_multiplier is None:
        noise_multiplier = get_noise_multiplier(
            target_epsilon=TARGET_EPSILON,
            target_delta=DELTA,
            sample_rate=q,
            steps=plan.total_steps,
            accountant="rdp",
        )
    return DPPlan(noise_multiplier=noise_multiplier, max_grad_norm=1.0, sample_rate=q, delta=DELTA)


@pytest.fixture(scope="module")
def dp_digits_run(digits: Digits) -> tuple[TrainResult, TrainingPlan, DPPlan, Recorder]:
    plan = make_plan(len(digits.x_train))
    dp = make_dp(len(digits.x_train), plan)
    recorder = Recorder()
    result = digits.fit(
        plan=plan,
        dp=dp,
        callbacks=recorder,
        report_every=50,
        device="cpu",
        dp_seed=0,
    )
    return result, plan, dp, recorder


# --- models -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("num_features", [1, 7, 64])
def test_every_architecture_builds_and_validates(arch: str, num_features: int) -> None:
    # arrange
    image = input_shape_for(arch, num_features)
    model = build_model(spec_of(arch), num_features=num_features, num_classes=5, input_shape=image)

    # act
    logits = model(torch.randn(3, num_features))

    # assert
    assert logits.shape == (3, 5)
    assert ModuleValidator.validate(model, strict=True) == []


@pytest.mark.parametrize("num_features", [1, 2, 3])
@pytest.mark.parametrize("channels", [(4, 4), (2,), (16, 4, 2), (3, 1)])
@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_narrow_cnn1d_on_short_signals_trains_or_is_refused_up_front(
    num_features: int, channels: tuple[int, ...], private: bool
) -> None:
    """A group of one value cannot be normalised: narrow blocks on a length-1 signal get
    fewer groups, and a 1-channel block there is refused before anything runs."""
    # arrange
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, num_features)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    plan = TrainingPlan(
        model=ModelSpec(arch="cnn1d", channels=list(channels), kernel_size=3),
        epochs=1,
        batch_size=1,  # one-row batches too
        learning_rate=0.1,
        optimizer="sgd",
        steps_per_epoch=30,
        total_steps=30,
    )
    dp = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1 / 30, delta=1e-5)
    lengths = [num_features]
    for _ in channels[:-1]:
        lengths.append(lengths[-1] // 2 if lengths[-1] >= 2 else lengths[-1])
    refused = any(c == 1 and n == 1 for c, n in zip(channels, lengths, strict=True))
    arrays = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    # act / assert
    if refused:
        with pytest.raises(ValueError, match="1 channel on a signal of length 1"):
            train(**arrays, num_classes=2, plan=plan, dp=dp if private else None, device="cpu")
        return
    result = train(**arrays, num_classes=2, plan=plan, dp=dp if private else None, device="cpu")
    assert result.steps_done == 30 and math.isfinite(result.metrics["test_loss"])


def test_architectures_match_the_spec() -> None:
    mlp = build_model(ModelSpec(arch="mlp", hidden_sizes=[8, 5]), num_features=4, num_classes=3)
    cnn_spec = ModelSpec(arch="cnn1d", channels=[4, 8], kernel_size=5)
    cnn = build_model(cnn_spec, num_features=16, num_classes=3)

    linear_shapes = [tuple(m.weight.shape) for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_shapes == [(8, 4), (5, 8), (3, 5)]
    logreg = build_model(ModelSpec(arch="logreg"), num_features=4, num_classes=3)
    assert len(list(logreg.parameters())) == 2
    kinds = [type(m).__name__ for m in cnn.modules()]
    assert kinds.count("Conv1d") == 2 and kinds.count("GroupNorm") == 2
    assert kinds.count("MaxPool1d") == 2 and "BatchNorm1d" not in kinds
    head = [m for m in cnn.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.in_features == 8 * 4  # 16 -> 8 -> 4 after two poolings


# --- DP-SGD -------------------------------------------------------------------------


def test_dp_sgd_reaches_accuracy_on_digits(dp_digits_run: tuple) -> None:
    result, plan, _dp, _recorder = dp_digits_run

    assert result.steps_done == plan.total_steps and not result.stopped
    assert result.metrics["test_accuracy"] >= 0.80
    assert math.isfinite(result.metrics["test_loss"])
    assert result.device == "cpu"


def test_state_dict_is_plain_cpu_and_contiguous(dp_digits_run: tuple) -> None:
    result, plan, _dp, _recorder = dp_digits_run
    reference = build_model(plan.model, num_features=64, num_classes=10)

    assert set(result.state_dict) == set(reference.state_dict())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in result.state_dict.values())


def test_progress_is_reported_every_epoch_with_monotone_steps(dp_digits_run: tuple) -> None:
    result, plan, _dp, recorder = dp_digits_run
    steps = [p.steps_done for p in recorder.progress]

    assert steps == sorted(set(steps))
    assert {p.epoch for p in recorder.progress} == set(range(1, plan.epochs + 1))
    assert all(p.fraction == p.steps_done / plan.total_steps for p in recorder.progress)
    assert all(s % 50 == 0 or s % plan.steps_per_epoch == 0 for s in steps)
    assert recorder.progress[-1].steps_done == result.steps_done


def test_each_epoch_end_reports_the_models_held_out_scores_and_training_goes_on(
    dp_digits_run: tuple, digits: Digits
) -> None:
    result, plan, _dp, recorder = dp_digits_run
    # assert: scores at every epoch end and nowhere else, over every held-out row
    scored = [p for p in recorder.progress if p.scores is not None]
    assert [p.steps_done for p in scored] == [
        plan.steps_per_epoch * e for e in range(1, plan.epochs + 1)
    ]
    assert all(p.scores["rows"] == len(digits.y_test) for p in scored)
    assert all(0.0 <= p.scores["test_accuracy"] <= 1.0 for p in scored)
    # the last epoch's scores are the final model's: scoring left it training as before
    assert scored[-1].scores["test_accuracy"] == result.metrics["test_accuracy"]
    assert scored[-1].scores["test_loss"] == pytest.approx(result.metrics["test_loss"])


def test_should_stop_cancels_after_k_steps(digits: Digits) -> None:
    # arrange
    plan = make_plan(len(digits.x_train), epochs=3)
    recorder = Recorder(stop_after=7)

    # act
    result = digits.fit(
        plan=plan,
        dp=make_dp(len(digits.x_train), plan, noise_multiplier=1.0),
        callbacks=recorder,
        report_every=5,
    )

    # assert
    assert result.stopped and result.steps_done == 7
    assert [p.steps_done for p in recorder.progress] == [5, 7]


def test_empty_poisson_batches_still_add_noise() -> None:
    # arrange: 4 rows at q = 0.01, so most Poisson batches are empty
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3)).astype(np.float32)
    y = np.array([0, 1, 0, 1], dtype=np.int64)
    plan = TrainingPlan(
        model=ModelSpec(arch="logreg"),
        epochs=3,
        batch_size=1,
        learning_rate=0.1,
        optimizer="sgd",
        steps_per_epoch=1,
        total_steps=3,
    )
    dp = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, delta=1e-3)
    torch.manual_seed(plan.seed)
    initial = build_model(plan.model, num_features=3, num_classes=2).state_dict()
    # the first step's mask is the first draw of the seeded DP generator
    first_mask = torch.rand(4, generator=torch.Generator().manual_seed(11)) < dp.sample_rate

    # act
    result = train(
        x_train=x, y_train=y, x_test=x, y_test=y, num_classes=2, plan=plan, dp=dp, dp_seed=11
    )

    # assert
    assert not first_mask.any()
    assert result.steps_done == 3
    assert math.isfinite(result.metrics["test_loss"])
    assert all(not torch.equal(result.state_dict[k], initial[k]) for k in initial)


@pytest.mark.parametrize("private", [True, False], ids=["dp", "non-private"])
def test_training_is_deterministic_for_a_seed_on_cpu(digits: Digits, private: bool) -> None:
    plan = make_plan(len(digits.x_train), epochs=1, arch="cnn1d", channels=(4, 4))
    dp = make_dp(len(digits.x_train), plan, noise_multiplier=1.0) if private else None

    def run() -> TrainResult:
        return digits.fit(plan=plan, dp=dp, dp_seed=3)

    first, second = run(), run()

    assert first.state_dict.keys() == second.state_dict.keys()
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert first.metrics == second.metrics


def test_dp_randomness_is_secret_by_default(digits: Digits) -> None:
    plan = make_plan(len(digits.x_train), epochs=1, arch="logreg")
    dp = make_dp(len(digits.x_train), plan, noise_multiplier=1.0)

    first, second = (digits.fit(plan=plan, dp=dp) for _ in range(2))

    assert not torch.equal(first.state_dict["0.weight"], second.state_dict["0.weight"])


def test_non_private_logreg_on_digits(digits: Digits) -> None:
    plan = make_plan(len(digits.x_train), arch="logreg", epochs=10, batch_size=64)

    result = digits.fit(plan=plan, dp=None)

    assert not result.stopped
    assert result.metrics["test_accuracy"] > 0.9


def test_invalid_inputs_are_value_errors_without_data(digits: Digits) -> None:
    plan = make_plan(len(digits.x_train), epochs=1)
    bad_labels = digits.y_train.copy()
    bad_labels[0] = 12345

    with pytest.raises(ValueError, match="labels") as excinfo:
        digits.fit(y_train=bad_labels, plan=plan, dp=None)
    assert "12345" not in str(excinfo.value)
    with pytest.raises(ValueError, match="total_steps"):
        TrainingPlan(**{**plan.__dict__, "total_steps": plan.total_steps + 1})
    with pytest.raises(ValueError, match="optimizer"):
        TrainingPlan(**{**plan.__dict__, "optimizer": "rmsprop"})


# --- export -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_export_round_trip_through_the_store(tmp_path: Path, arch: str) -> None:
    # arrange
    image = input_shape_for(arch, 10)
    shape = ModelShape(model=spec_of(arch), num_features=10, num_classes=4, input_shape=image)
    model = build_model(shape.model, num_features=10, num_classes=4, input_shape=image).eval()
    metadata = {"architecture": shape.to_metadata(), "epsilon": "2.99", "delta": "1e-05"}
    store = LocalStore(tmp_path)
    x = torch.randn(5, 10)

    # act
    artifact = store.write(
        "models/m.safetensors", lambda path: save_model(path, model.state_dict(), metadata=metadata)
    )
    path = store.path(artifact.key)
    loaded, loaded_metadata = load_model(path)

    # assert
    assert artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded_metadata == metadata
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert list((tmp_path / "tmp").iterdir()) == []  # no staged file left behind


def test_export_rejects_bad_metadata(tmp_path: Path) -> None:
    model = build_model(ModelSpec(arch="logreg"), num_features=3, num_classes=2)
    path = tmp_path / "m.safetensors"

    with pytest.raises(ValueError, match="strings"):
        save_model(path, model.state_dict(), metadata={"epsilon": 1.0})  # type: ignore[dict-item]
    save_model(path, model.state_dict(), metadata={"epsilon": "1.0"})
    with pytest.raises(ValueError, match="architecture"):
        load_model(path)
