"""The moving average of the weights (``training.ema_decay``): post-processing only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")

from pydantic import ValidationError  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from ppml.config import Settings  # noqa: E402
from ppml.db.models import Dataset  # noqa: E402
from ppml.services.pricing import price  # noqa: E402
from ppml.specs import JobSpec, ModelSpec, request_hash  # noqa: E402
from ppml.training import DPPlan, TrainingPlan, train  # noqa: E402
from ppml.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from ppml.training.dp_sgd import initial_model  # noqa: E402

ROWS, BATCH, EPOCHS = 400, 50, 2
PER_EPOCH = ROWS // BATCH
TOTAL = EPOCHS * PER_EPOCH
DECAY = 0.8


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x, y = (x / 16).astype(np.float32), y.astype(np.int64)
    return {"x_train": x[:ROWS], "y_train": y[:ROWS], "x_test": x[ROWS:500], "y_test": y[ROWS:500]}


def plan(ema_decay: float) -> TrainingPlan:
    return TrainingPlan(
        model=ModelSpec(arch="mlp", hidden_sizes=[16]),
        epochs=EPOCHS,
        batch_size=BATCH,
        learning_rate=0.3,
        optimizer="sgd",
        momentum=0.9,
        seed=3,
        steps_per_epoch=PER_EPOCH,
        total_steps=TOTAL,
        ema_decay=ema_decay,
    )


def dp(engine: str) -> DPPlan:
    return DPPlan(
        noise_multiplier=1.3, max_grad_norm=1.0, sample_rate=BATCH / ROWS, delta=1e-5, engine=engine
    )


def fit(arrays: dict[str, np.ndarray], **kwargs: Any) -> Any:
    return train(**arrays, num_classes=10, device="cpu", **kwargs)


def by_hand(iterates: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The average with the warm-up ``min(decay, (1 + t) / (10 + t))``, from the iterates
    (the initial weights first)."""
    average = {k: v.clone() for k, v in iterates[0].items()}
    for t, weights in enumerate(iterates[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        average = {k: d * average[k] + (1 - d) * weights[k] for k in average}
    return average


@pytest.mark.parametrize("engine", ["fast", "opacus"])
def test_the_average_is_a_function_of_the_same_noisy_iterates(
    arrays: dict[str, np.ndarray], engine: str
) -> None:
    # arrange: the last-iterate run, its weights after every step
    seen: list[dict[str, torch.Tensor]] = []

    def keep(state: dict[str, Any]) -> None:
        seen.append({k: v.clone() for k, v in state["model"].items()})

    initial = {k: v.clone() for k, v in initial_model(plan(0.0), 64, 10).state_dict().items()}
    last = fit(arrays, plan=plan(0.0), dp=dp(engine), dp_seed=7, report_every=1, checkpoint=keep)
    # act: the averaged run with the same mechanism and noise
    averaged_states: list[dict[str, Any]] = []
    averaged = fit(
        arrays,
        plan=plan(DECAY),
        dp=dp(engine),
        dp_seed=7,
        report_every=1,
        checkpoint=averaged_states.append,
    )
    # assert: step for step the same iterates (same noise, nothing fed back), and the
    # model returned is their average
    for mine, theirs in zip(averaged_states, seen, strict=True):
        assert all(torch.equal(mine["model"][k], theirs[k]) for k in theirs)
    expected = by_hand([initial, *seen, last.state_dict], DECAY)
    assert averaged.steps_done == last.steps_done == TOTAL
    for key, value in expected.items():
        torch.testing.assert_close(averaged.state_dict[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(averaged.state_dict["0.weight"], last.state_dict["0.weight"])


def test_a_resumed_averaged_run_ends_with_the_uninterrupted_average(
    arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    # arrange: a non-private run is fully seeded, so an interrupted one can be compared
    states: list[dict[str, Any]] = []
    whole = fit(arrays, plan=plan(DECAY), dp=None, report_every=5, checkpoint=states.append)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, states[0])
    # act
    resumed = fit(arrays, plan=plan(DECAY), dp=None, report_every=5, resume=load_checkpoint(path))
    # assert
    assert states[0]["average_updates"] == 5
    for key, value in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=1e-6, atol=1e-7)


def spec(ema_decay: float | None, **extra: Any) -> JobSpec:
    training: dict[str, Any] = {"epochs": 3, "batch_size": 50, "learning_rate": 0.1}
    if ema_decay is not None:
        training["ema_decay"] = ema_decay
    body = {
        "name": "avg",
        "dataset_id": "ds_one",
        "model": {"arch": "logreg"},
        "training": training,
        "privacy": {"target_epsilon": 2.0},
        **extra,
    }
    return JobSpec.model_validate(body)


def dataset() -> Dataset:
    return Dataset(
        id="ds_one",
        tenant_id="ten_one",
        name="digits-shaped",
        source={"upload": "x.csv"},
        task="classification",
        num_features=64,
        num_classes=10,
        num_train=1000,
        num_test=100,
        num_clients=None,
        classes={"labels": list(range(10))},
        privacy_unit="record",
        epsilon_total=8.0,
        delta_total=1e-5,
        storage_key="datasets/ds_one.npz",
    )


def test_averaging_changes_neither_sigma_nor_the_charge() -> None:
    settings = Settings()
    plain, averaged = price(spec(None), dataset(), settings), price(spec(0.9), dataset(), settings)

    assert plain.event is not None and averaged.event is not None
    assert averaged.event == plain.event
    assert averaged.epsilon == plain.epsilon


def test_no_average_keeps_the_request_hash_and_an_average_changes_it() -> None:
    assert request_hash(spec(None)) == request_hash(spec(0.0))
    assert request_hash(spec(0.9)) != request_hash(spec(None))


def test_averaging_is_refused_where_the_loop_does_not_run_it() -> None:
    federated = {"federated": {"num_clients": 4, "clients_per_round": 2, "rounds": 2}}
    with pytest.raises(ValidationError, match="ema_decay"):
        spec(0.9, **federated)
    with pytest.raises(ValidationError, match="ema_decay"):
        spec(0.9, resources={"gpus": 2})
    with pytest.raises(ValidationError):
        spec(1.0)
