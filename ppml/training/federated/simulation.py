"""The federated simulation: one concrete round loop driving a ``Strategy``.

Each round: the strategy samples clients, configures them, the clients that did not
drop out train locally (vectorised or one by one), and the strategy aggregates their
deltas into the new global model, which is then scored on the held-out arrays.

Privacy notes:

* Client level (DP-FedAvg): clients are Poisson-sampled with ``q = clients_per_round /
  num_clients`` and the server adds ``N(0, (σC)²)`` to the clipped sum every round, so
  each round is the subsampled Gaussian mechanism the accountant charges; a round's
  number of participating clients depends on the private sample and is therefore not
  reported in ``history``.
* Sample level: every client runs DP-SGD with the same ``q``, ``σ``, ``C`` and number of
  steps on its own disjoint shard, and the server averages the clients' models with
  equal weights (weights by shard size would make the output depend on one row's
  presence outside the DP-SGD mechanism).
* As in ``dp_sgd``, every private random draw (sampling, dropout, batches, noise) comes
  from a secret seed from the OS; ``dp_seed`` fixes it for tests only. Without DP, all
  randomness derives from ``plan.seed``.
* Checkpoints (after every round, before its report) hold the global parameters, the
  server optimiser's state and the history, never the secret seed: a resumed private
  job continues with fresh secret randomness (see ``ppml.training.checkpoint``).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from ppml.training.checkpoint import CheckpointSink, snapshot, start_of
from ppml.training.dp_sgd import (
    TrainingCallbacks,
    TrainingPlan,
    initial_model,
    score,
    to_tensors,
)
from ppml.training.federated.clients import (
    ClientTask,
    ClientTrainer,
    LocalDP,
    LocalSetup,
    LoopTrainer,
    VectorizedTrainer,
)
from ppml.training.federated.functional import (
    ParamLayout,
    client_seed,
    local_steps_per_epoch,
    round_seed_sequence,
    server_noise_seed,
)
from ppml.training.federated.partition import partition
from ppml.training.federated.plans import (
    PRIVACY_LEVELS,
    FederatedDP,
    FederatedPlan,
    FederatedResult,
    RoundProgress,
)
from ppml.training.federated.strategies import (
    DPFedAvgClientLevel,
    Strategy,
    build_strategy,
)

__all__ = [
    "PRIVACY_LEVELS",
    "VECTORIZABLE",
    "FederatedDP",
    "FederatedPlan",
    "FederatedResult",
    "RoundProgress",
    "train_federated",
]

# Architectures whose every layer has a torch.func batching rule (checked in the tests).
VECTORIZABLE = frozenset({"logreg", "mlp", "cnn1d"})
_RATE_TOLERANCE = 1e-9


def _check_dp(fed: FederatedPlan, dp: FederatedDP | None) -> None:
    if dp is not None and dp.level == "client":
        q = fed.clients_per_round / fed.num_clients
        if abs(dp.sample_rate - q) > _RATE_TOLERANCE * q:
            raise ValueError("client-level sample_rate must equal clients_per_round / num_clients")


def _build_strategy(
    fed: FederatedPlan, dp: FederatedDP | None, base_seed: int, dev: torch.device
) -> Strategy:
    inner = build_strategy(
        fed.strategy,
        clients_per_round=fed.clients_per_round,
        local_epochs=fed.local_epochs,
        mu=fed.mu,
        server_learning_rate=fed.server_learning_rate,
    )
    if dp is None or dp.level != "client":
        return inner
    return DPFedAvgClientLevel(
        inner,
        clip_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier,
        expected_clients=fed.clients_per_round,
        generator=torch.Generator(device=dev).manual_seed(server_noise_seed(base_seed)),
    )


def _build_trainer(
    plan: TrainingPlan,
    fed: FederatedPlan,
    dp: FederatedDP | None,
    module: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
) -> ClientTrainer:
    local_dp = None
    if dp is not None and dp.level == "sample":
        local_dp = LocalDP(
            noise_multiplier=dp.noise_multiplier,
            clip_norm=dp.clip_norm,
            sample_rate=dp.sample_rate,
        )
    setup = LocalSetup(
        module=module,
        x=data[0],
        y=data[1],
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        optimizer=plan.optimizer,
        momentum=plan.momentum,
        dp=local_dp,
    )
    vectorize = fed.vectorized if fed.vectorized is not None else plan.model.arch in VECTORIZABLE
    if not vectorize:
        return LoopTrainer(setup)
    if plan.model.arch not in VECTORIZABLE:
        raise ValueError(f"architecture {plan.model.arch!r} cannot be trained vectorised")
    return VectorizedTrainer(setup, chunk_size=fed.chunk_size)


def _steps_per_round(fed: FederatedPlan, dp: FederatedDP | None) -> int:
    if dp is not None and dp.level == "sample":
        return fed.local_epochs * local_steps_per_epoch(dp.sample_rate)
    return 1


@dataclass
class _Simulation:
    """The state one job's round loop carries between rounds."""

    fed: FederatedPlan
    strategy: Strategy
    trainer: ClientTrainer
    shards: list[torch.Tensor]
    base_seed: int
    weighted: bool  # FedAvg's weights n_k; False: every client counts once

    def run_round(self, round_index: int, params: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One round from ``params`` ``(P,)``; returns the new params and clients aggregated."""
        rng = np.random.default_rng(round_seed_sequence(self.base_seed, round_index))
        sampled = self.strategy.sample_clients(round_index, len(self.shards), rng)
        configs = self.strategy.configure_round(round_index, sampled)
        survived = rng.random(len(sampled)) >= self.fed.dropout
        tasks = [
            ClientTask(
                client_id=int(client),
                rows=self.shards[client],
                config=config,
                seed=client_seed(self.base_seed, round_index, int(client)),
            )
            for client, config, ok in zip(sampled, configs, survived, strict=True)
            if ok
        ]
        # A keyed partition may leave a client empty: it trains nothing and reports a zero
        # update, which counts once where every client counts once (sample-level DP, so the
        # average's denominator does not depend on whether one record is present) and adds
        # nothing elsewhere (weight n_k = 0; a clipped zero under client-level DP).
        trained = [t for t in tasks if len(t.rows)]
        partial = None
        for chunk, deltas in self.trainer.train(params, trained) if trained else ():
            weights = [float(len(t.rows)) if self.weighted else 1.0 for t in chunk]
            weight_tensor = torch.tensor(weights, dtype=params.dtype, device=params.device)
            partial = self.strategy.accumulate(partial, deltas, weight_tensor)
        empty = len(tasks) - len(trained)
        if empty and not self.weighted:
            zeros = params.new_zeros((empty, params.numel()))
            partial = self.strategy.accumulate(partial, zeros, params.new_ones(empty))
        return self.strategy.finish(params, partial), len(tasks)


def _report(
    callbacks: TrainingCallbacks | None,
    fed: FederatedPlan,
    rounds_done: int,
    per_round: int,
    scores: dict[str, float] | None = None,
) -> None:
    if callbacks is not None:
        callbacks.on_progress(
            RoundProgress(
                steps_done=rounds_done * per_round,
                epoch=rounds_done * fed.local_epochs,
                fraction=rounds_done / fed.rounds,
                round=rounds_done,
                scores=scores,
            )
        )


def train_federated(
    *,
    x_train: npt.NDArray[np.float32],
    y_train: npt.NDArray[np.int64],
    x_test: npt.NDArray[np.float32],
    y_test: npt.NDArray[np.int64],
    num_classes: int,
    clients_train: npt.NDArray[np.int64] | None,
    plan: TrainingPlan,
    fed: FederatedPlan,
    dp: FederatedDP | None,
    callbacks: TrainingCallbacks | None = None,
    device: str | None = None,
    dp_seed: int | None = None,
    checkpoint: CheckpointSink | None = None,
    resume: Mapping[str, Any] | None = None,
    record_keys: npt.NDArray[np.uint64] | None = None,
    partition_seed: int | None = None,
) -> FederatedResult:
    """Simulates federated training and scores the global model on held-out data.

    Args:
        x_train: Training features, float32 ``(n, d)``.
        y_train: Training labels in ``0..num_classes-1``.
        x_test: Held-out features ``(m, d)``.
        y_test: Held-out labels ``(m,)``.
        num_classes: Number of classes ``K``.
        clients_train: Client id per training row (needed by the ``"column"`` partition).
        plan: Architecture, local batch size, optimizer, learning rate, momentum and
            seed; its epoch and step counts are ignored.
        fed: Clients, rounds, partition and strategy.
        dp: The admitted mechanism (client or sample level), or None.
        callbacks: ``on_progress`` gets a ``RoundProgress`` after every round (and on
            stop); ``should_stop`` is checked before every round.
        device: Torch device; defaults to ``"cuda"`` when available, else ``"cpu"``.
        dp_seed: Seeds every private random draw. Tests only: None (required in
            production) draws a secret seed from the OS.
        checkpoint: Receives the simulation's state after every round but the last.
        resume: A state ``checkpoint`` received: the simulation continues with the
            round after it; ``steps_done``, ``rounds_done`` and ``history`` include
            the rounds before it.
        record_keys: One uint64 key per training row, a keyed hash of the row under the
            dataset's secret (``ppml.datasets.keys.partition_keys``); required by the
            ``"iid"`` and ``"dirichlet"`` partitions, which place every row by its key
            alone (a client may then be empty).
        partition_seed: Seeds the Dirichlet proportions; the worker derives it from the
            dataset's secret. None: ``plan.seed`` (tests).

    Returns:
        The global model, steps and rounds done, metrics and per-round history.

    Raises:
        ValueError: If the arrays, the partition or the DP settings are inconsistent, or
            ``resume`` is not a federated checkpoint.
    """
    start = start_of(resume, kind="federated", key="rounds", limit=fed.rounds)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x, y = to_tensors(x_train, y_train, num_classes=num_classes, device=dev, name="train")
    x_te, y_te = to_tensors(x_test, y_test, num_classes=num_classes, device=dev, name="test")
    if x_te.shape[1] != x.shape[1]:
        raise ValueError("train and test must have the same number of features")
    _check_dp(fed, dp)
    parts = partition(
        fed.partition,
        labels=np.asarray(y_train),
        num_clients=fed.num_clients,
        alpha=fed.alpha,
        seed=plan.seed if partition_seed is None else partition_seed,
        clients_train=clients_train,
        keys=record_keys,
    )
    module = initial_model(plan, x.shape[1], num_classes).to(dev)
    base_seed = plan.seed if dp is None else (secrets.randbits(63) if dp_seed is None else dp_seed)
    sim = _Simulation(
        fed=fed,
        strategy=_build_strategy(fed, dp, base_seed, dev),
        trainer=_build_trainer(plan, fed, dp, module, (x, y)),
        shards=[torch.from_numpy(p).to(dev) for p in parts],
        base_seed=base_seed,
        weighted=dp is None or dp.level == "client",
    )
    per_round = _steps_per_round(fed, dp)
    layout = ParamLayout.of(module)
    params = parameters_to_vector(module.parameters()).detach().clone()
    history: list[dict[str, float]] = []
    if resume is not None:
        params = resume["params"].to(device=dev, dtype=params.dtype)
        sim.strategy.load_server_state(
            {k: v.to(dev) for k, v in dict(resume.get("server", {})).items()}
        )
        history = [dict(entry) for entry in resume.get("history", [])]
    rounds_done, stopped = start, False
    for round_index in range(start, fed.rounds):
        if callbacks is not None and callbacks.should_stop():
            stopped = True
            break
        params, clients = sim.run_round(round_index, params)
        rounds_done = round_index + 1
        scored = rounds_done % fed.eval_every == 0 or rounds_done == fed.rounds
        if scored:
            layout.load(module, params)
            entry = {"round": float(rounds_done), **score(module, x_te, y_te, plan)}
            if dp is None or dp.level != "client":
                entry["clients"] = float(clients)
            history.append(entry)
        if checkpoint is not None and rounds_done < fed.rounds:
            state = {
                "kind": "federated",
                "rounds": rounds_done,
                "steps": rounds_done * per_round,
                "params": params,
                "server": sim.strategy.server_state(),
                "history": [dict(entry) for entry in history],
            }
            checkpoint(snapshot(state))
        _report(callbacks, fed, rounds_done, per_round, history[-1] if scored else None)
    if stopped and rounds_done == start:
        _report(callbacks, fed, start, per_round)  # the only report a job stopped at once gets
    layout.load(module, params)
    weights = module.state_dict()
    steps_done = rounds_done * per_round
    return FederatedResult(
        state_dict={k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
        steps_done=steps_done,
        rounds_done=rounds_done,
        stopped=stopped,
        metrics=score(module, x_te, y_te, plan),
        history=history,
        device=str(dev),
    )
