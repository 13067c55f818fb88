"""The server loop over remote nodes (``ppml.training.federated.remote``), with nodes that
train in this process behind a channel keeping the same bookkeeping the database does.
The real transport (API, worker, ``ppml node`` processes) is tested in tests/integration."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_tensors
from torch import nn

from ppml.training.federated.functional import ParamLayout
from ppml.training.federated.plans import RoundProgress
from ppml.training.federated.remote import (
    NodeAnswer,
    RemoteDP,
    RemotePlan,
    RoundFailed,
    train_remote,
)
from ppml.training.federated.updates import check_update, client_norm_bound


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


@dataclass
class _Node:
    x: torch.Tensor
    y: torch.Tensor
    behaviour: str = "honest"  # honest | silent | nan | wide | refuse | shape


@dataclass
class _Channel:
    nodes_by_id: dict[str, _Node]
    clip: float | None = None
    tasks: dict[int, list[NodeAnswer]] = field(default_factory=dict)
    opened: list[tuple[int, list[str]]] = field(default_factory=list)
    rejected: list[tuple[int, str, str]] = field(default_factory=list)

    def nodes(self) -> list[str]:
        return sorted(self.nodes_by_id)

    def open_round(
        self, round_index: int, node_ids: Sequence[str], weights: bytes, timeout_s: float
    ) -> None:
        from safetensors.torch import load

        self.opened.append((round_index, list(node_ids)))
        global_weights = load(weights)
        self.tasks[round_index] = [self._train(n, global_weights) for n in node_ids]

    def _train(self, node_id: str, weights: dict[str, torch.Tensor]) -> NodeAnswer:
        node = self.nodes_by_id[node_id]
        if node.behaviour == "silent":
            return NodeAnswer(node_id=node_id, status="open", started=True)
        if node.behaviour == "refuse":
            return NodeAnswer(node_id=node_id, status="refused", started=False, detail="budget")
        model = _model()
        model.load_state_dict(weights)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(5):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(node.x), node.y).backward()
            optimiser.step()
        delta = {k: v.detach() - weights[k] for k, v in model.state_dict().items()}
        if self.clip is not None:
            norm = math.sqrt(sum(float(v.square().sum()) for v in delta.values()))
            delta = {k: v * min(1.0, self.clip / max(norm, 1e-12)) for k, v in delta.items()}
        if node.behaviour == "nan":
            delta["bias"] = torch.full_like(delta["bias"], float("nan"))
        if node.behaviour == "wide":
            delta = {k: v * 1e3 + 1.0 for k, v in delta.items()}
        if node.behaviour == "shape":
            delta["bias"] = torch.zeros(3)
        blob = save_tensors({k: v.contiguous() for k, v in delta.items()})
        return NodeAnswer(
            node_id=node_id, status="accepted", started=True, update=blob, rows=len(node.x)
        )

    def answers(self, round_index: int) -> list[NodeAnswer]:
        return list(self.tasks.get(round_index, []))

    def close_round(self, round_index: int) -> None:
        self.tasks[round_index] = [
            a
            if a.status != "open"
            else NodeAnswer(node_id=a.node_id, status="expired", started=a.started)
            for a in self.tasks[round_index]
        ]

    def reject(self, round_index: int, node_id: str, reason: str) -> None:
        self.rejected.append((round_index, node_id, reason))


def _world(behaviours: Sequence[str]) -> dict[str, _Node]:
    rng = np.random.default_rng(1)
    nodes = {}
    for i, behaviour in enumerate(behaviours):
        x = rng.normal(size=(40, 4)).astype(np.float32)
        y = (x[:, 0] + 0.3 * i > 0).astype(np.int64)
        nodes[f"nod_{i}"] = _Node(torch.from_numpy(x), torch.from_numpy(y), behaviour)
    return nodes


def _accuracy(state: dict[str, torch.Tensor], nodes: dict[str, _Node]) -> float:
    model = _model()
    model.load_state_dict(state)
    x = torch.cat([n.x for n in nodes.values()])
    y = torch.cat([n.y for n in nodes.values()])
    return float((model(x).argmax(1) == y).float().mean())


def _no_wait(_seconds: float) -> None:
    return None


def test_rounds_over_honest_nodes_learn_and_count_each_nodes_rounds() -> None:
    # arrange
    nodes = _world(["honest"] * 3)
    channel = _Channel(nodes)
    before = _accuracy(_model().state_dict(), nodes)
    # act
    result = train_remote(
        module=_model(),
        plan=RemotePlan(rounds=6, clients_per_round=None),
        dp=None,
        channel=channel,
        sleep=_no_wait,
    )
    # assert
    assert result.rounds_done == 6 and not result.stopped
    assert result.started == {"nod_0": 6, "nod_1": 6, "nod_2": 6}
    assert _accuracy(result.state_dict, nodes) > max(before, 0.8)
    assert result.history[-1] == {"round": 6.0, "updates_accepted": 3.0}


def test_progress_and_checkpoints_count_rounds_in_the_mechanisms_steps() -> None:
    # arrange: sample level, 13 local DP-SGD steps a round (the job's schedule)
    channel = _Channel(_world(["honest"] * 2))
    reports: list[tuple[int, int]] = []
    saved: list[int] = []

    class _Follow:
        def on_progress(self, progress: RoundProgress) -> None:  # type: ignore[override]
            reports.append((progress.round, progress.steps_done))

        def should_stop(self) -> bool:
            return False

    # act
    result = train_remote(
        module=_model(),
        plan=RemotePlan(rounds=3, clients_per_round=None, steps_per_round=13),
        dp=RemoteDP(level="sample", clip_norm=1.0),
        channel=channel,
        callbacks=_Follow(),
        checkpoint=lambda state: saved.append(int(state["steps"])),
        sleep=_no_wait,
    )
    # assert: the runner's schedule counts 13 steps a round (its ε and its resumption)
    assert result.rounds_done == 3
    assert reports == [(1, 13), (2, 26), (3, 39)]
    assert saved == [13, 26]


@pytest.mark.parametrize("behaviour", ["nan", "wide", "shape"])
def test_a_bad_update_is_rejected_recorded_and_left_out(behaviour: str) -> None:
    # arrange: node 2 sends garbage; the clip bounds honest client-level updates
    nodes = _world(["honest", "honest", behaviour])
    channel = _Channel(nodes, clip=1.0)
    dp = RemoteDP(level="sample", clip_norm=1.0)
    plan = RemotePlan(rounds=2, clients_per_round=None, norm_bound=client_norm_bound(1.0))
    # act
    result = train_remote(module=_model(), plan=plan, dp=dp, channel=channel, sleep=_no_wait)
    # assert
    assert [(r, n) for r, n, _ in channel.rejected] == [(0, "nod_2"), (1, "nod_2")]
    assert result.history[0]["updates_rejected"] == 1.0
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())


def test_a_silent_node_expires_at_the_deadline_and_the_quorum_carries_the_round() -> None:
    nodes = _world(["honest", "honest", "silent"])
    channel = _Channel(nodes)
    clock = iter(range(0, 10_000, 7))
    plan = RemotePlan(rounds=2, clients_per_round=None, round_timeout_s=20, quorum=2)

    result = train_remote(
        module=_model(),
        plan=plan,
        dp=None,
        channel=channel,
        sleep=_no_wait,
        clock=lambda: float(next(clock)),
    )

    assert result.rounds_done == 2
    assert result.history[0] == {"round": 1.0, "updates_accepted": 2.0, "updates_expired": 1.0}
    assert result.started["nod_2"] == 2  # it fetched the weights: it spent the round


def test_short_of_the_quorum_the_round_is_retried_then_the_job_fails() -> None:
    nodes = _world(["honest", "silent", "silent"])
    channel = _Channel(nodes)
    clock = iter(range(0, 10_000, 50))
    plan = RemotePlan(rounds=1, clients_per_round=None, quorum=2, max_round_retries=2)

    with pytest.raises(RoundFailed, match="round 1: fewer than 2"):
        train_remote(
            module=_model(),
            plan=plan,
            dp=None,
            channel=channel,
            sleep=_no_wait,
            clock=lambda: float(next(clock)),
        )
    assert [r for r, _ in channel.opened] == [0, 0, 0]


def test_a_node_that_refuses_is_not_asked_again() -> None:
    nodes = _world(["honest", "honest", "refuse"])
    channel = _Channel(nodes)

    result = train_remote(
        module=_model(),
        plan=RemotePlan(rounds=3, clients_per_round=None),
        dp=None,
        channel=channel,
        sleep=_no_wait,
    )

    assert result.refused == {"nod_2": "budget"}
    assert [ids for _, ids in channel.opened] == [["nod_0", "nod_1", "nod_2"]] + [
        ["nod_0", "nod_1"]
    ] * 2


def test_client_level_samples_nodes_at_the_admitted_rate_and_adds_noise() -> None:
    nodes = _world(["honest"] * 10)
    channel = _Channel(nodes, clip=0.5)
    dp = RemoteDP(level="client", clip_norm=0.5, noise_multiplier=1.0, sample_rate=0.3)
    plan = RemotePlan(rounds=40, clients_per_round=3, norm_bound=client_norm_bound(0.5))

    result = train_remote(
        module=_model(), plan=plan, dp=dp, channel=channel, sleep=_no_wait, dp_seed=3
    )

    asked = [len(ids) for _, ids in channel.opened]
    assert 0.2 < sum(asked) / (40 * 10) < 0.4  # Poisson sampling at q = 0.3
    assert len(set(asked)) > 1
    assert all(set(entry) == {"round"} for entry in result.history)  # no counts released
    noiseless = train_remote(
        module=_model(),
        plan=plan,
        dp=RemoteDP(level="client", clip_norm=0.5, sample_rate=0.3),
        channel=_Channel(nodes, clip=0.5),
        sleep=_no_wait,
        dp_seed=3,
    )
    gap = sum(
        float((result.state_dict[k] - noiseless.state_dict[k]).norm()) for k in result.state_dict
    )
    assert gap > 0.1


def test_a_resumed_job_goes_on_from_its_checkpoint() -> None:
    nodes = _world(["honest"] * 3)
    saved: list[dict[str, object]] = []
    full = train_remote(
        module=_model(),
        plan=RemotePlan(rounds=4, clients_per_round=None),
        dp=None,
        channel=_Channel(nodes),
        sleep=_no_wait,
        checkpoint=saved.append,
    )
    channel = _Channel(nodes)

    resumed = train_remote(
        module=_model(),
        plan=RemotePlan(rounds=4, clients_per_round=None),
        dp=None,
        channel=channel,
        sleep=_no_wait,
        resume=saved[1],
    )

    assert [r for r, _ in channel.opened] == [2, 3]
    assert resumed.started == full.started
    for key, value in full.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value)


def test_check_update_names_what_is_wrong() -> None:
    layout = ParamLayout.of(_model())
    good = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}

    assert check_update(layout, save_tensors(good), 1.0).shape == (10,)
    with pytest.raises(ValueError, match="not a safetensors"):
        check_update(layout, b"hello", None)
    with pytest.raises(ValueError, match="missing \\['bias'\\]"):
        check_update(layout, save_tensors({"weight": torch.zeros(2, 4)}), None)
    with pytest.raises(ValueError, match="float32"):
        check_update(
            layout, save_tensors({**good, "bias": torch.zeros(2, dtype=torch.float64)}), None
        )
    with pytest.raises(ValueError, match="exceeds"):
        check_update(layout, save_tensors({**good, "bias": torch.ones(2)}), 1.0)


def test_a_cancel_while_a_round_waits_closes_it_and_stops_with_the_rounds_done() -> None:
    # arrange: node 1 never answers, so round 2 waits; the job is cancelled meanwhile
    channel = _Channel(_world(["honest", "silent"]))
    polls = {"n": 0}

    class _CancelDuringRoundTwo:
        def on_progress(self, progress: RoundProgress) -> None:  # type: ignore[override]
            return None

        def should_stop(self) -> bool:
            polls["n"] += 1
            return len(channel.opened) == 2 and polls["n"] > 3

    clock = iter(range(0, 10_000))
    plan = RemotePlan(rounds=4, clients_per_round=None, round_timeout_s=5, quorum=1)
    # act
    result = train_remote(
        module=_model(),
        plan=plan,
        dp=None,
        channel=channel,
        callbacks=_CancelDuringRoundTwo(),
        sleep=_no_wait,
        clock=lambda: float(next(clock)),
    )
    # assert: round 1 counted, round 2 closed (its silent task expired) and not aggregated
    assert result.stopped and result.rounds_done == 1
    assert [r for r, _ in channel.opened] == [0, 1]
    assert {a.status for a in channel.answers(1)} == {"accepted", "expired"}
    assert result.started == {"nod_0": 2, "nod_1": 2}  # both fetched round 2: both spent it
