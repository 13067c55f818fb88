"""Checkpoints and resume: centralised and federated training, and the per-job files."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sklearn.datasets import load_digits  # noqa: E402

from ppml.datasets import record_keys  # noqa: E402
from ppml.jobs.checkpoints import JobCheckpoints  # noqa: E402
from ppml.specs import ModelSpec  # noqa: E402
from ppml.storage import LocalStore  # noqa: E402
from ppml.training import DPPlan, TrainingPlan, train  # noqa: E402
from ppml.training.checkpoint import load_checkpoint, save_checkpoint, start_of  # noqa: E402
from ppml.training.federated import FederatedDP, FederatedPlan, train_federated  # noqa: E402

BATCH = 64
STEPS_PER_EPOCH = 23  # ceil(1437 / 64)
EPOCHS = 2
TOTAL = EPOCHS * STEPS_PER_EPOCH
REPORT_EVERY = 10


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    y = y.astype(np.int64)
    return {"x_train": x[:1437], "y_train": y[:1437], "x_test": x[1437:], "y_test": y[1437:]}


def plan(optimizer: str = "sgd") -> TrainingPlan:
    return TrainingPlan(
        model=ModelSpec(arch="mlp", hidden_sizes=[32]),
        epochs=EPOCHS,
        batch_size=BATCH,
        learning_rate=0.05 if optimizer == "adam" else 0.3,
        optimizer=optimizer,
        momentum=0.9 if optimizer == "sgd" else 0.0,
        seed=5,
        steps_per_epoch=STEPS_PER_EPOCH,
        total_steps=TOTAL,
    )


def dp(engine: str = "auto") -> DPPlan:
    return DPPlan(
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        sample_rate=BATCH / 1437,
        delta=1e-5,
        engine=engine,
    )


class StopAtOnce:
    def on_progress(self, progress: Any) -> None:
        del progress

    def should_stop(self) -> bool:
        return True


def fit(arrays: dict[str, np.ndarray], **kwargs: Any) -> Any:
    return train(**arrays, num_classes=10, device="cpu", report_every=REPORT_EVERY, **kwargs)


def through_disk(tmp_path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as a resumed worker sees it: written, then read back."""
    path = tmp_path / f"ckpt-{state['steps']}.pt"
    save_checkpoint(path, state)
    return load_checkpoint(path)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_resumed_non_private_run_ends_with_the_uninterrupted_weights(
    arrays: dict[str, np.ndarray], tmp_path: Path, optimizer: str
) -> None:
    # arrange: one uninterrupted run that leaves its checkpoints
    saved: list[dict[str, Any]] = []
    whole = fit(arrays, plan=plan(optimizer), dp=None, checkpoint=saved.append)
    middle = next(s for s in saved if s["steps"] == 30)  # mid-epoch, momentum/Adam state
    # act: a new process resumes from the file
    resumed = fit(arrays, plan=plan(optimizer), dp=None, resume=through_disk(tmp_path, middle))
    # assert
    assert resumed.steps_done == whole.steps_done == TOTAL
    assert same_weights(resumed.state_dict, whole.state_dict)


def test_checkpoints_are_written_at_every_report_before_it(arrays: dict[str, np.ndarray]) -> None:
    events: list[tuple[str, int]] = []

    class Callbacks:
        def on_progress(self, progress: Any) -> None:
            events.append(("report", progress.steps_done))

        def should_stop(self) -> bool:
            return False

    fit(
        arrays,
        plan=plan(),
        dp=dp(),
        dp_seed=1,
        callbacks=Callbacks(),
        checkpoint=lambda state: events.append(("checkpoint", state["steps"])),
    )

    reports = [steps for kind, steps in events if kind == "report"]
    assert reports == [10, 20, 23, 30, 40, 46]
    # every report but the last is preceded by the checkpoint of the same step
    for index, (kind, steps) in enumerate(events):
        if kind == "report" and steps < TOTAL:
            assert events[index - 1] == ("checkpoint", steps)
    assert ("checkpoint", TOTAL) not in events


@pytest.mark.parametrize("engine", ["fast", "opacus"])
def test_a_private_resume_continues_from_the_checkpoint_and_counts_every_step(
    arrays: dict[str, np.ndarray], tmp_path: Path, engine: str
) -> None:
    # arrange
    saved: list[dict[str, Any]] = []
    fit(arrays, plan=plan(), dp=dp(engine), dp_seed=2, checkpoint=saved.append)
    middle = through_disk(tmp_path, next(s for s in saved if s["steps"] == 20))
    # act: stopped before its first step (the checkpoint is the model) / the rest of the run
    at_checkpoint = fit(arrays, plan=plan(), dp=dp(engine), resume=middle, callbacks=StopAtOnce())
    finished = fit(arrays, plan=plan(), dp=dp(engine), resume=middle)
    # assert: the weights come from the checkpoint, and ε covers all steps, before and after
    assert at_checkpoint.steps_done == 20
    assert same_weights(at_checkpoint.state_dict, dict(middle["model"]))
    assert finished.steps_done == TOTAL
    assert not same_weights(finished.state_dict, dict(middle["model"]))


def test_a_private_checkpoint_holds_no_randomness(
    arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    saved: list[dict[str, Any]] = []
    fit(arrays, plan=plan(), dp=dp(), checkpoint=saved.append)

    state = through_disk(tmp_path, saved[0])

    assert set(state) == {"format", "kind", "steps", "model", "optimizer"}
    assert not any(isinstance(v, torch.Generator) for v in state.values())


def test_resume_refuses_foreign_or_impossible_states(arrays: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match="not a centralised checkpoint"):
        fit(arrays, plan=plan(), dp=None, resume={"kind": "federated", "rounds": 1})
    with pytest.raises(ValueError, match="out of range"):
        fit(arrays, plan=plan(), dp=None, resume={"kind": "centralised", "steps": TOTAL + 1})
    assert start_of(None, kind="centralised", key="steps", limit=1) == 0


# --- federated ------------------------------------------------------------------------


def fed_plan(strategy: str) -> FederatedPlan:
    return FederatedPlan(
        num_clients=6,
        clients_per_round=3,
        rounds=4,
        local_epochs=1,
        partition="dirichlet",
        alpha=0.5,
        strategy=strategy,
        mu=0.0,
        server_learning_rate=0.1 if strategy == "fedadam" else 1.0,
        dropout=0.0,
        chunk_size=2,
    )


def fed_fit(arrays: dict[str, np.ndarray], fed: FederatedPlan, **kwargs: Any) -> Any:
    local = TrainingPlan(
        model=ModelSpec(arch="mlp", hidden_sizes=[16]),
        epochs=1,
        batch_size=16,
        learning_rate=0.1,
        optimizer="sgd",
        seed=3,
        steps_per_epoch=1,
        total_steps=1,
    )
    return train_federated(
        **arrays,
        num_classes=10,
        clients_train=None,
        plan=local,
        fed=fed,
        device="cpu",
        record_keys=record_keys(
            "5e" * 32, "dirichlet:3", arrays["x_train"], arrays["y_train"].astype(str)
        ),
        **kwargs,
    )


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_resumed_federated_run_ends_with_the_uninterrupted_model(
    arrays: dict[str, np.ndarray], tmp_path: Path, strategy: str
) -> None:
    # arrange
    saved: list[dict[str, Any]] = []
    whole = fed_fit(arrays, fed_plan(strategy), dp=None, checkpoint=saved.append)
    after_two = through_disk(tmp_path, next(s for s in saved if s["rounds"] == 2))
    # act
    resumed = fed_fit(arrays, fed_plan(strategy), dp=None, resume=after_two)
    # assert: same model (FedAdam's moments came back too) and the whole history
    assert [s["rounds"] for s in saved] == [1, 2, 3]
    assert resumed.rounds_done == whole.rounds_done == 4
    assert (
        max(
            float((resumed.state_dict[k] - whole.state_dict[k]).abs().max())
            for k in whole.state_dict
        )
        < 1e-6
    )
    assert len(resumed.history) == len(whole.history) == 4
    for mine, theirs in zip(resumed.history, whole.history, strict=True):
        assert mine == pytest.approx(theirs)
    if strategy == "fedadam":
        assert set(after_two["server"]) == {"m", "v"}


def test_a_resumed_client_level_dp_run_charges_every_round(
    arrays: dict[str, np.ndarray], tmp_path: Path
) -> None:
    fed = fed_plan("fedavg")
    private = FederatedDP(
        level="client", noise_multiplier=1.0, clip_norm=0.5, sample_rate=0.5, delta=1e-5
    )
    saved: list[dict[str, Any]] = []
    fed_fit(arrays, fed, dp=private, checkpoint=saved.append)
    state = through_disk(tmp_path, saved[0])

    resumed = fed_fit(arrays, fed, dp=private, resume=state)

    assert "base_seed" not in state and set(state["server"]) == set()
    assert resumed.rounds_done == 4 and resumed.steps_done == 4
    assert [entry["round"] for entry in resumed.history] == [1.0, 2.0, 3.0, 4.0]
    assert all(math.isfinite(float(v)) for v in resumed.state_dict["0.weight"].flatten()[:5])


# --- the per-job files ----------------------------------------------------------------


def test_job_checkpoints_resume_from_the_newest_earlier_attempt(tmp_path: Path) -> None:
    # arrange
    store = LocalStore(tmp_path)
    files = JobCheckpoints(store, "job_a")
    neighbour = JobCheckpoints(store, "job_ab")
    files.save(1, {"kind": "centralised", "steps": 10})
    files.save(2, {"kind": "centralised", "steps": 20})
    neighbour.save(5, {"kind": "centralised", "steps": 99})
    # act / assert
    assert files.attempts() == [2, 1]
    assert files.latest(before=3) == {
        "format": "ppml-checkpoint-v1",
        "kind": "centralised",
        "steps": 20,
    }
    assert files.latest(before=2)["steps"] == 10  # a stale worker's later file is ignored
    assert files.latest(before=1) is None
    files.clear()
    assert files.attempts() == [] and neighbour.attempts() == [5]


def test_a_planted_pickle_is_never_executed(tmp_path: Path) -> None:
    # arrange: a file that runs code when unpickled, where an attempt's checkpoint goes
    store = LocalStore(tmp_path)
    files = JobCheckpoints(store, "job_x")
    files.save(1, {"kind": "centralised", "steps": 10})
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    target = store.path(files.key(2))
    target.write_bytes(pickle.dumps({"format": "ppml-checkpoint-v1", "x": Exploit()}))
    # act
    state = files.latest(before=3)
    # assert: refused by the weights-only reader; the older checkpoint is used instead
    assert not marker.exists()
    assert state is not None and state["steps"] == 10
