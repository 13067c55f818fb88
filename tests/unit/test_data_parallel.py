"""Data-parallel DP-SGD on two gloo processes: the same step, the noise added once."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

from ppml.config import Settings
from ppml.db.models import JobStatus, LedgerKind
from ppml.db.session import Database
from ppml.jobs.runner import JobRunner
from ppml.specs import ModelSpec
from ppml.training import DPPlan, Progress, TrainingPlan, train
from ppml.training.fast_dp import FastDPEngine
from ppml.training.parallel import _free_port, placement, train_parallel
from tests.unit import parallel_helpers as helpers
from tests.unit.worlds import make_world, worker_settings

WORLD = 2


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    """Each rank's summed gradients from one spawned two-process group."""
    out = tmp_path_factory.mktemp("replicas")
    args = (WORLD, f"tcp://127.0.0.1:{_free_port()}", str(out))
    # rank 0 in this process (torch is loaded already), rank 1 spawned
    other = mp.get_context("spawn").Process(target=helpers.replica, args=(1, *args))
    other.start()
    try:
        helpers.replica(0, *args)
    finally:
        other.join(timeout=120)
    assert other.exitcode == 0
    return [torch.load(out / f"rank{rank}.pt") for rank in range(WORLD)]


def single_process_gradient() -> torch.Tensor:
    module = helpers.model()
    engine = FastDPEngine(
        module,
        noise_multiplier=0.0,
        max_grad_norm=helpers.CLIP,
        expected_batch_size=helpers.ROWS,
        generator=torch.Generator().manual_seed(0),
    )
    x, y = helpers.batch()  # the whole batch, in one process
    engine.backward(F.cross_entropy(module(x), y, reduction="sum"))
    return engine.flat_grad.clone()


def test_without_noise_a_data_parallel_step_equals_the_single_process_step(
    replicas: list[dict[str, torch.Tensor]],
) -> None:
    expected = single_process_gradient()

    for rank in replicas:
        torch.testing.assert_close(rank["clean"], expected, rtol=1e-5, atol=1e-7)
    # the clipping binds on this batch, so what matched is a sum of clipped gradients
    module = helpers.model()
    x, y = helpers.batch()
    F.cross_entropy(module(x), y).backward()
    unclipped = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    assert not torch.allclose(unclipped, expected, rtol=0.1)


def test_the_noise_of_the_summed_gradient_has_std_sigma_c_not_sigma_c_root_n(
    replicas: list[dict[str, torch.Tensor]],
) -> None:
    # arrange: what the noisy step added to the clipped sum, in units of C
    noise = (replicas[0]["noisy"] - replicas[0]["clean"]) * helpers.ROWS / helpers.CLIP
    # act
    std = noise.double().std().item()
    # assert: ~40,000 coordinates put the estimate within ~0.4% of σ; noise drawn on every
    # replica would give σ·√2, 41% more
    assert noise.numel() > 30_000
    assert std == pytest.approx(helpers.SIGMA, rel=0.03)
    assert abs(noise.double().mean().item()) < 0.03 * helpers.SIGMA
    # every replica applies the same update
    torch.testing.assert_close(replicas[1]["noisy"], replicas[0]["noisy"], rtol=0, atol=0)


def test_a_cpu_host_runs_the_replicas_on_gloo() -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert placement(WORLD) == ("gloo", [torch.device("cpu")] * WORLD)


class StopAfter:
    """Records progress; asks to stop once ``steps`` steps were reported."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.reports: list[int] = []

    def on_progress(self, progress: Progress) -> None:
        self.reports.append(progress.steps_done)

    def should_stop(self) -> bool:
        return bool(self.reports) and self.reports[-1] >= self.steps


def test_a_job_resumes_from_a_checkpoint_and_stops_on_every_replica() -> None:
    # arrange: a job checkpointed by the single-process loop at step 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    plan = TrainingPlan(
        model=ModelSpec(arch="mlp", hidden_sizes=[16]),
        epochs=2,
        batch_size=40,
        learning_rate=0.5,
        optimizer="sgd",
        steps_per_epoch=3,
        total_steps=6,
    )
    dp = DPPlan(noise_multiplier=0.5, max_grad_norm=1.0, sample_rate=40 / 120, delta=1e-5)
    arrays: dict[str, Any] = {
        "x_train": x,
        "y_train": y,
        "x_test": x[:30],
        "y_test": y[:30],
        "num_classes": 2,
        "plan": plan,
        "dp": dp,
        "report_every": 2,
    }
    checkpoints: list[dict[str, Any]] = []
    single = train(**arrays, callbacks=StopAfter(2), checkpoint=checkpoints.append, dp_seed=3)
    assert (single.steps_done, [c["steps"] for c in checkpoints]) == (2, [2])
    callbacks = StopAfter(4)
    # act: rank 0 (this process) stops after step 4; rank 1 must stop with it, or the
    # next step's collective would hang and the call would not return
    result = train_parallel(
        **arrays,
        world_size=WORLD,
        resume=checkpoints[0],
        callbacks=callbacks,
        checkpoint=checkpoints.append,
        dp_seed=7,
    )
    # assert
    assert (result.steps_done, result.stopped) == (4, True)
    assert callbacks.reports == [3, 4]  # at the end of epoch 1, then every 2 steps
    assert [c["steps"] for c in checkpoints] == [2, 3, 4]
    assert result.metrics["rows"] == 30 and result.device == "cpu"
    moved = [not torch.equal(single.state_dict[k], v) for k, v in result.state_dict.items()]
    assert all(moved)


def test_data_parallel_training_refuses_what_it_cannot_run() -> None:
    x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int64)
    plan = TrainingPlan(
        model=ModelSpec(arch="logreg"),
        epochs=1,
        batch_size=2,
        learning_rate=0.1,
        optimizer="sgd",
        steps_per_epoch=2,
        total_steps=2,
    )
    common: dict[str, Any] = {
        "x_train": x,
        "y_train": y,
        "x_test": x,
        "y_test": y,
        "num_classes": 2,
        "plan": plan,
    }
    dp = DPPlan(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, delta=1e-5)
    with pytest.raises(ValueError, match="DP-SGD jobs only"):
        train_parallel(world_size=2, dp=None, **common)
    with pytest.raises(ValueError, match="at least 2"):
        train_parallel(world_size=1, dp=dp, **common)
    with pytest.raises(ValueError, match="fewer training rows"):
        train_parallel(world_size=5, dp=dp, **common)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_runner_trains_a_two_gpu_job_on_two_processes_and_charges_it_once(
    database: Database, settings: Settings
) -> None:
    # arrange: a server whose workers take two-GPU jobs (here: two gloo processes)
    limits = settings.limits.model_copy(update={"max_job_gpus": 2})
    world = make_world(database, worker_settings(settings).model_copy(update={"limits": limits}))
    job_id = world.submit(private=True, gpus=2)
    # act
    outcome = JobRunner(world.db, world.settings, owner="worker-a").run(job_id)
    # assert: the whole plan ran, the reservation was committed once, with the admitted σ
    job = world.job(job_id)
    assert outcome == "succeeded" and job.status == JobStatus.SUCCEEDED
    assert job.spec.resources.gpus == 2
    assert job.steps_done == world.plan(job_id).total_steps
    kinds = [entry.kind for entry in world.job_ledger(job_id)]
    assert kinds.count(LedgerKind.RESERVE) == 1 and kinds.count(LedgerKind.COMMIT) == 1
    assert job.privacy is not None and job.privacy.epsilon_spent is not None
    assert job.artifacts is not None and job.receipt is not None
