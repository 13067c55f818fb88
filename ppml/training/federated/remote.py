"""The server loop of a federated job whose clients are remote data-owner nodes.

The simulation (``simulation.py``) trains every client in this process; here each round
opens one task per chosen node through a :class:`RoundChannel` (the worker's is backed by
the database and the artefact store: ``ppml.jobs.federation``), waits for the nodes'
updates until every chosen node answered or the round's deadline passed, checks each
update, and hands those that pass to the same strategies the simulation uses.

Privacy, by the job's level:

* ``client`` (DP-FedAvg, the node is the unit): nodes are Poisson-sampled with the
  admitted rate, clip their update to ``C`` themselves (an update above ``C`` is refused
  here, so the bound holds whatever a node sends), and the strategy adds ``N(0, (σC)²)``
  to the sum every round, also when no node answered. How many nodes answered depends on
  the private sample, so it is not reported.
* ``sample`` (DP-SGD at each node, the record is the unit): every chosen node adds its
  own noise and charges its own ledger; the server averages with equal weights (weights
  by row count would make the output depend on one row outside the nodes' mechanisms).
  The loop counts, per node, the rounds it started (fetched the weights of), which is
  what a node charges for: the receipt's per-node ε comes from that count.

A node's availability is not protected: whether and when it answers is visible to the
server. A round whose accepted updates fall short of the quorum releases nothing and is
opened again, at most ``max_round_retries`` more times.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from ppml.training.checkpoint import CheckpointSink, snapshot, start_of
from ppml.training.dp_sgd import TrainingCallbacks
from ppml.training.federated.functional import ParamLayout, server_noise_seed
from ppml.training.federated.plans import RoundProgress
from ppml.training.federated.strategies import DPFedAvgClientLevel, Strategy, build_strategy
from ppml.training.federated.updates import check_update, weights_bytes

__all__ = [
    "NodeAnswer",
    "RemoteDP",
    "RemotePlan",
    "RemoteResult",
    "RoundChannel",
    "RoundFailed",
    "train_remote",
]

log = logging.getLogger(__name__)

TaskStatus = Literal["open", "accepted", "rejected", "refused", "expired", "stale"]


@dataclass(frozen=True, kw_only=True)
class NodeAnswer:
    """Where one chosen node stands in a round."""

    node_id: str
    status: TaskStatus
    started: bool  # fetched the round's weights (a sample-level node has charged the round)
    update: bytes | None = None  # safetensors of ``local - global``, once accepted
    rows: int = 0  # the node's enrolled row count (weights non-private averages only)
    detail: str | None = None  # why it was refused or rejected


class RoundChannel(Protocol):
    """How the loop reaches the nodes (the worker's: ``ppml.jobs.federation``)."""

    def nodes(self) -> list[str]:
        """The federation's active nodes, in a stable order."""
        ...

    def open_round(
        self, round_index: int, node_ids: Sequence[str], weights: bytes, timeout_s: float
    ) -> None:
        """Publishes ``weights`` and opens one task per node, due in ``timeout_s``; every
        task an earlier attempt left open becomes stale."""
        ...

    def answers(self, round_index: int) -> list[NodeAnswer]:
        """The tasks of the round's latest opening."""
        ...

    def close_round(self, round_index: int) -> None:
        """Tasks still open expire; a later update is stale."""
        ...

    def reject(self, round_index: int, node_id: str, reason: str) -> None:
        """Records that the node's update failed the loop's checks."""
        ...


@dataclass(frozen=True, kw_only=True)
class RemotePlan:
    """The rounds of a federated job over nodes.

    Attributes:
        clients_per_round: Nodes asked per round (sample level, non-private); None: every
            active node. Under client-level DP the expected number (``RemoteDP``).
        round_timeout_s: How long a round waits for its nodes.
        quorum: Accepted updates a round needs (fewer chosen nodes: all of them).
        norm_bound: An update whose L2 norm exceeds it is rejected (None: no bound).
        steps_per_round: A round in the DP mechanism's unit (``RoundProgress.steps_done``):
            1 (client level, non-private), or a node's local DP-SGD steps per round of the
            job's schedule (sample level).
    """

    rounds: int
    clients_per_round: int | None
    strategy: str = "fedavg"
    local_epochs: int = 1
    mu: float = 0.0
    server_learning_rate: float = 1.0
    round_timeout_s: float = 120.0
    quorum: int = 1
    max_round_retries: int = 3
    # A look reads the round's task rows (one indexed query; update bytes are read once):
    # at 0.5 s the round's close waited 0.25 s on average after its last answer.
    poll_s: float = 0.1
    norm_bound: float | None = None
    steps_per_round: int = 1


@dataclass(frozen=True, kw_only=True)
class RemoteDP:
    """The admitted mechanism. ``client``: σ and ``sample_rate`` are the server's (noise on
    the sum, Poisson sampling of nodes); ``sample``: the nodes run DP-SGD themselves."""

    level: Literal["sample", "client"]
    clip_norm: float
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0


@dataclass(frozen=True, kw_only=True)
class RemoteResult:
    """What the loop trained: the global weights and, per node, the rounds it started."""

    state_dict: dict[str, torch.Tensor]
    rounds_done: int
    stopped: bool
    started: dict[str, int]
    refused: dict[str, str]
    history: list[dict[str, float]]


class RoundFailed(RuntimeError):
    """A round stayed short of its quorum on every try."""


@dataclass
class _Loop:
    plan: RemotePlan
    dp: RemoteDP | None
    channel: RoundChannel
    strategy: Strategy
    layout: ParamLayout
    rng: np.random.Generator
    callbacks: TrainingCallbacks | None
    sleep: Callable[[float], None]
    clock: Callable[[], float]
    started: Counter[str] = field(default_factory=Counter)
    refused: dict[str, str] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # the last round's, for the log

    def lap(self, phase: str, since: float) -> float:
        """Adds the time since ``since`` to ``phase``; returns now (perf counter)."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - since
        return now

    def choose(self) -> list[str]:
        nodes = [n for n in self.channel.nodes() if n not in self.refused]
        if self.dp is not None and self.dp.level == "client":
            return [n for n in nodes if self.rng.random() < self.dp.sample_rate]
        wanted = self.plan.clients_per_round
        if wanted is None or wanted >= len(nodes):
            return nodes
        picked = self.rng.choice(len(nodes), size=wanted, replace=False)
        return [nodes[i] for i in sorted(picked)]

    def stop_requested(self) -> bool:
        return self.callbacks is not None and self.callbacks.should_stop()

    def wait(self, round_index: int) -> bool:
        """Waits for the round's nodes; False when the job was asked to stop meanwhile."""
        deadline = self.clock() + self.plan.round_timeout_s
        while True:
            if all(a.status != "open" for a in self.channel.answers(round_index)):
                return True
            if self.clock() >= deadline:
                return True
            if self.stop_requested():
                return False
            self.sleep(self.plan.poll_s)

    def collect(self, round_index: int) -> tuple[list[torch.Tensor], list[float], Counter[str]]:
        """The round's valid updates with their weights, and how each task ended."""
        updates: list[torch.Tensor] = []
        weights: list[float] = []
        ended: Counter[str] = Counter()
        for answer in self.channel.answers(round_index):
            self.started[answer.node_id] += int(answer.started)
            if answer.status == "refused":
                self.refused[answer.node_id] = answer.detail or "refused"
            if answer.status != "accepted" or answer.update is None:
                ended.update([answer.status])
                continue
            try:
                updates.append(check_update(self.layout, answer.update, self.plan.norm_bound))
            except ValueError as exc:
                self.channel.reject(round_index, answer.node_id, str(exc))
                ended["rejected"] += 1
                continue
            ended["accepted"] += 1
            weighted = self.dp is None and answer.rows > 0
            weights.append(float(answer.rows) if weighted else 1.0)
        return updates, weights, ended

    def run_round(
        self, round_index: int, params: torch.Tensor
    ) -> tuple[torch.Tensor, Counter[str]]:
        """One round from ``params``: opened, awaited, checked and aggregated; retried when
        short of its quorum. Raises StopIteration when the job is asked to stop."""
        self.phases = {}
        for _ in range(self.plan.max_round_retries + 1):
            t = time.perf_counter()
            chosen = self.choose()
            if chosen:
                blob = weights_bytes(self.layout, params, round_index)
                self.channel.open_round(round_index, chosen, blob, self.plan.round_timeout_s)
                t = self.lap("open", t)
                if not self.wait(round_index):
                    self.channel.close_round(round_index)
                    self.collect(round_index)  # the rounds started are charged at the nodes
                    raise StopIteration
                t = self.lap("wait", t)
                self.channel.close_round(round_index)
            updates, weights, ended = self.collect(round_index) if chosen else ([], [], Counter())
            t = self.lap("collect", t)
            if len(updates) >= min(self.plan.quorum, len(chosen)):
                partial = None
                if updates:
                    weight = torch.tensor(weights, dtype=params.dtype)
                    partial = self.strategy.accumulate(partial, torch.stack(updates), weight)
                params = self.strategy.finish(params, partial)
                self.lap("aggregate", t)
                return params, ended
        raise RoundFailed(
            f"round {round_index + 1}: fewer than {self.plan.quorum} node update(s) arrived "
            f"in {self.plan.max_round_retries + 1} tries of {self.plan.round_timeout_s:g} s"
        )


def _strategy(plan: RemotePlan, dp: RemoteDP | None, seed: int) -> Strategy:
    expected = plan.clients_per_round or 1
    inner = build_strategy(
        plan.strategy,
        clients_per_round=expected,
        local_epochs=plan.local_epochs,
        mu=plan.mu,
        server_learning_rate=plan.server_learning_rate,
    )
    if dp is None or dp.level != "client":
        return inner
    return DPFedAvgClientLevel(
        inner,
        clip_norm=dp.clip_norm,
        noise_multiplier=dp.noise_multiplier,
        expected_clients=expected,
        generator=torch.Generator().manual_seed(server_noise_seed(seed)),
    )


def train_remote(
    *,
    module: nn.Module,
    plan: RemotePlan,
    dp: RemoteDP | None,
    channel: RoundChannel,
    callbacks: TrainingCallbacks | None = None,
    checkpoint: CheckpointSink | None = None,
    resume: Mapping[str, Any] | None = None,
    dp_seed: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RemoteResult:
    """Runs the job's rounds over the nodes ``channel`` reaches, from ``module``'s weights
    (or ``resume``, a state ``checkpoint`` received: the round after it).

    Under client-level DP, ``plan.clients_per_round`` is the expected number of nodes
    per round (the fixed denominator of DP-FedAvg). ``dp_seed`` fixes the secret draws
    (node sampling, server noise) for tests only.

    Raises:
        RoundFailed: A round stayed short of its quorum.
        ValueError: ``resume`` is not this loop's checkpoint.
    """
    start = start_of(resume, kind="federated-remote", key="rounds", limit=plan.rounds)
    seed = secrets.randbits(63) if dp_seed is None else dp_seed
    layout = ParamLayout.of(module)
    loop = _Loop(
        plan=plan,
        dp=dp,
        channel=channel,
        strategy=_strategy(plan, dp, seed),
        layout=layout,
        rng=np.random.default_rng(seed),
        callbacks=callbacks,
        sleep=sleep,
        clock=clock,
    )
    params = parameters_to_vector(module.parameters()).detach().clone()
    history: list[dict[str, float]] = []
    if resume is not None:
        params = resume["params"].to(dtype=params.dtype)
        loop.strategy.load_server_state(dict(resume.get("server", {})))
        loop.started.update(dict(resume.get("started", {})))
        loop.refused.update(dict(resume.get("refused", {})))
        history = [dict(entry) for entry in resume.get("history", [])]
    rounds_done, stopped = start, False
    for round_index in range(start, plan.rounds):
        if loop.stop_requested():
            stopped = True
            break
        try:
            params, ended = loop.run_round(round_index, params)
        except StopIteration:
            stopped = True
            break
        rounds_done = round_index + 1
        t = time.perf_counter()
        entry = {"round": float(rounds_done)}
        if dp is None or dp.level != "client":  # counts depend on the nodes' sample otherwise
            entry.update({f"updates_{k}": float(v) for k, v in sorted(ended.items())})
        history.append(entry)
        if checkpoint is not None and rounds_done < plan.rounds:
            checkpoint(snapshot(_state(loop, rounds_done, params, history)))
        t = loop.lap("checkpoint", t)
        if callbacks is not None:
            callbacks.on_progress(
                RoundProgress(
                    steps_done=rounds_done * plan.steps_per_round,
                    epoch=rounds_done * plan.local_epochs,
                    fraction=rounds_done / plan.rounds,
                    round=rounds_done,
                )
            )
        loop.lap("progress", t)
        log.info(
            "round %d of %d: %s",
            rounds_done,
            plan.rounds,
            ", ".join(f"{k} {v:.3f} s" for k, v in loop.phases.items()),
        )
    layout.load(module, params)
    return RemoteResult(
        state_dict={
            k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()
        },
        rounds_done=rounds_done,
        stopped=stopped,
        started=dict(loop.started),
        refused=dict(loop.refused),
        history=history,
    )


def _state(
    loop: _Loop, rounds_done: int, params: torch.Tensor, history: list[dict[str, float]]
) -> dict[str, Any]:
    return {
        "kind": "federated-remote",
        "rounds": rounds_done,
        "steps": rounds_done * loop.plan.steps_per_round,  # the runner resumes its beat here
        "params": params,
        "server": loop.strategy.server_state(),
        "started": dict(loop.started),
        "refused": dict(loop.refused),
        "history": [dict(entry) for entry in history],
    }
