"""Data-parallel DP-SGD: one job on N processes (one per GPU; gloo processes on CPU).

How the mechanism stays the one the accountant priced (σ, q, C):

* **Sampling.** Replica ``r`` owns the rows ``r, r + N, r + 2N, …`` and includes each of them
  with probability ``q``, drawn from its own secret generator. Every row of the dataset is
  still included independently with probability ``q``: the union of the shards' samples is
  exactly the Poisson sample of the single-process loop.
* **Clipping** is per sample, so each replica clips its own rows to ``C``; nothing about one
  row's factor depends on another replica.
* **Noise is drawn once, by rank 0**: its engine adds ``N(0, σ²C²)`` to its clipped sum, the
  other ranks' engines run with σ = 0. One all-reduce (SUM) of the flat gradient then hands
  every replica ``(Σ clipped + N(0, σ²C²)) / E[B]``: the single-process update. Each rank
  adding ``N(0, σ²C²/N)`` would sum to the same law, but it splits the draw across N
  generators, so σ holds only if every rank draws its exact share (a replica with a wrong
  world size, or one drawing σ·C instead, silently changes it); one draw keeps σ exact by
  construction, and the test can tell ``σC`` from ``σC√N``.
* Every replica applies the same summed update to the same initial weights (built from
  ``plan.seed``), so the replicas stay identical without broadcasting weights.

Rank 0 runs in the calling process (the worker): it reports progress, writes checkpoints and
decides to stop; the decision is broadcast before every step so all ranks stop together.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ppml.training.checkpoint import CheckpointSink, start_of
from ppml.training.dp_sgd import _dp_generator, _run_steps, initial_model, score, to_tensors
from ppml.training.fast_dp import FastDPEngine
from ppml.training.plans import DPPlan, Progress, TrainingCallbacks, TrainingPlan, TrainResult
from ppml.training.steppers import PrivateStepper

__all__ = ["DistributedDPEngine", "ShardedPrivateStepper", "placement", "train_parallel"]

# A collective waits this long for a lagging rank (rank 0 may be writing a checkpoint or
# riding out a database outage in its heartbeat) before the step fails.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class DistributedDPEngine(FastDPEngine):
    """``FastDPEngine`` on one replica: clipped sum of its rows, summed over the group.

    Rank 0 adds the Gaussian noise; the others add none (see the module docstring). After
    ``backward`` every replica's ``p.grad`` is the global clipped, noised, averaged gradient.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator,
    ) -> None:
        leader = dist.get_rank() == 0
        super().__init__(
            module,
            noise_multiplier=noise_multiplier if leader else 0.0,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=generator,
        )

    def backward(self, loss: Tensor) -> None:
        super().backward(loss)
        dist.all_reduce(self.flat_grad, op=dist.ReduceOp.SUM)


class ShardedPrivateStepper(PrivateStepper):
    """``PrivateStepper`` over one replica's shard, with the distributed engine."""

    def _fast_engine(
        self, module: nn.Module, plan: TrainingPlan, dp: DPPlan, generator: torch.Generator
    ) -> FastDPEngine:
        return DistributedDPEngine(
            module,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            expected_batch_size=plan.batch_size,
            generator=generator,
        )


class _Relay:
    """Rank 0's callbacks as every rank sees them: one stop decision, broadcast."""

    def __init__(self, inner: TrainingCallbacks | None, device: torch.device) -> None:
        self._inner = inner if dist.get_rank() == 0 else None
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)

    def should_stop(self) -> bool:
        if dist.get_rank() == 0:
            self._flag.fill_(int(self._inner is not None and self._inner.should_stop()))
        dist.broadcast(self._flag, src=0)
        return bool(self._flag.item())

    def on_progress(self, progress: Progress) -> None:
        if self._inner is not None:
            self._inner.on_progress(progress)


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What every rank is given (pickled to the followers)."""

    world_size: int
    backend: str
    address: str
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    num_classes: int
    plan: TrainingPlan
    dp: DPPlan
    report_every: int
    resume: Mapping[str, Any] | None
    dp_seed: int | None
    threads: int


def placement(world_size: int) -> tuple[str, list[torch.device]]:
    """The backend and each rank's device: NCCL over ``cuda:0..N-1``, else gloo on CPU.

    Raises:
        ValueError: If CUDA is available but this process sees fewer than N GPUs.
    """
    if not torch.cuda.is_available():
        return "gloo", [torch.device("cpu")] * world_size
    visible = torch.cuda.device_count()
    if visible < world_size:
        raise ValueError(f"the job asks for {world_size} GPUs; this worker sees {visible}")
    return "nccl", [torch.device("cuda", rank) for rank in range(world_size)]


def train_parallel(
    *,
    world_size: int,
    x_train: npt.NDArray[np.float32],
    y_train: npt.NDArray[np.int64],
    x_test: npt.NDArray[np.float32],
    y_test: npt.NDArray[np.int64],
    num_classes: int,
    plan: TrainingPlan,
    dp: DPPlan | None,
    callbacks: TrainingCallbacks | None = None,
    report_every: int = 50,
    dp_seed: int | None = None,
    checkpoint: CheckpointSink | None = None,
    resume: Mapping[str, Any] | None = None,
) -> TrainResult:
    """``dp_sgd.train`` on ``world_size`` processes: this one is rank 0, the rest are spawned.

    Takes ``train``'s arguments (``dp_seed`` seeds rank ``r`` with ``dp_seed + r``; tests
    only) and returns what it returns; ``callbacks`` and ``checkpoint`` run in this process.

    Raises:
        ValueError: If ``world_size < 2``, ``dp`` is None (data-parallel training is DP-SGD
            only), there are fewer training rows than replicas, or GPUs are missing.
    """
    if world_size < 2:
        raise ValueError("world_size must be at least 2 (use train for one process)")
    if dp is None:
        raise ValueError("data-parallel training runs DP-SGD jobs only")
    if len(x_train) < world_size:
        raise ValueError("fewer training rows than replicas")
    backend, devices = placement(world_size)
    threads = torch.get_num_threads()
    run = _Run(
        world_size=world_size,
        backend=backend,
        address=f"tcp://127.0.0.1:{_free_port()}",
        x_train=x_train,
        y_train=y_train,
        num_classes=num_classes,
        plan=plan,
        dp=replace(dp, engine="fast"),
        report_every=report_every,
        resume=resume,
        dp_seed=dp_seed,
        # gloo ranks share this machine's cores; GPU ranks keep the usual count
        threads=max(1, threads // world_size) if backend == "gloo" else threads,
    )
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    followers = [
        context.Process(target=_follow, args=(rank, run, os.getpid()), daemon=True)
        for rank in range(1, world_size)
    ]
    for follower in followers:
        follower.start()
    try:
        torch.set_num_threads(run.threads)
        result = _rank(0, run, devices[0], callbacks, checkpoint, (x_test, y_test))
    except BaseException:
        for follower in followers:  # blocked in a collective that will never complete
            follower.kill()
        raise
    finally:
        torch.set_num_threads(threads)
        for follower in followers:
            follower.join(timeout=60)
    failed = [f.exitcode for f in followers if f.exitcode != 0]
    if failed:
        raise RuntimeError(f"a data-parallel replica ended with exit code {failed[0]}")
    assert result is not None
    return result


def _follow(rank: int, run: _Run, parent: int) -> None:
    """A spawned rank: trains its shard, reports nothing, exits when the job does."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    torch.set_num_threads(run.threads)
    _rank(rank, run, placement(run.world_size)[1][rank], None, None, None)


def _exit_when_orphaned(parent: int) -> None:
    # A worker killed with SIGKILL leaves its followers blocked in a collective: leave too.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _rank(
    rank: int,
    run: _Run,
    device: torch.device,
    callbacks: TrainingCallbacks | None,
    checkpoint: CheckpointSink | None,
    test: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None,
) -> TrainResult | None:
    """One replica's whole run; rank 0 (given ``test``) scores and returns the result."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        run.backend,
        init_method=run.address,
        rank=rank,
        world_size=run.world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        plan, n = run.plan, run.world_size
        start = start_of(run.resume, kind="centralised", key="steps", limit=plan.total_steps)
        shard = to_tensors(
            run.x_train[rank::n],
            run.y_train[rank::n],
            num_classes=run.num_classes,
            device=device,
            name="train",
        )
        module = initial_model(plan, shard[0].shape[1], run.num_classes).to(device)
        module.train()
        seed = None if run.dp_seed is None else run.dp_seed + rank
        stepper = ShardedPrivateStepper(module, shard, plan, run.dp, _dp_generator(device, seed))
        if run.resume is not None:
            stepper.load_state(run.resume, start)
        relay = _Relay(callbacks, device)
        steps_done, stopped = _run_steps(
            stepper, plan, relay, run.report_every, start_step=start, checkpoint=checkpoint
        )
        stepper.close()
        if test is None:
            return None
        x_te, y_te = to_tensors(*test, num_classes=run.num_classes, device=device, name="test")
        weights = module.state_dict()
        return TrainResult(
            state_dict={k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
            steps_done=steps_done,
            stopped=stopped,
            metrics=score(module, x_te, y_te, plan),
            device=device.type,
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
