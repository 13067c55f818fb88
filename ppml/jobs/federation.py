"""An attempt of a job on a federation's remote nodes (``federated.federation_id``, #16).

The round loop is ``ppml.training.federated.remote``; this module gives it its channel to
the nodes (:class:`StoreChannel`: tasks in the database, the global weights and the
updates in the artefact store, which the node API reads and writes) and turns what it
returns into the runner's outcome: the global model, the rounds run (the client-level
ledger charges one step per round) and, under sample-level DP, what each node spent.

A node charges its own ledger for a round once it has fetched the round's weights; the
receipt's per-node ε is computed here from the same plan the node was sent
(``ppml.federation.privacy.node_sample_plan``) and the rounds it started, so it is never
less than what the node's ledger holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ppml.db.federations import FederationNode, TaskStatus
from ppml.db.models import Dataset, Job, utcnow
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.federation.keys import global_key
from ppml.federation.privacy import node_sample_plan
from ppml.jobs.heartbeat import Heartbeat
from ppml.jobs.records import NodeCharge
from ppml.jobs.schedule import schedule
from ppml.privacy import accounting as acc
from ppml.services import federations
from ppml.storage import ArtifactStore

if TYPE_CHECKING:  # torch: the worker imports it when a federation job runs
    import torch

    from ppml.training.federated.remote import NodeAnswer, RemoteDP, RemotePlan

__all__ = ["FederationOutcome", "StoreChannel", "node_charges", "train_federation_job"]


@dataclass(frozen=True, kw_only=True)
class FederationOutcome:
    """What the runner needs of a federation attempt (as of ``TrainResult``)."""

    state_dict: dict[str, torch.Tensor]
    steps_done: int  # rounds run × steps per round: the unit the job was scheduled in
    stopped: bool
    nodes: list[NodeCharge]
    history: list[dict[str, float]]
    metrics: dict[str, float] = field(default_factory=dict)  # no evaluation at the nodes yet


class StoreChannel:
    """The loop's channel: tasks in the database, weights and updates in the store."""

    def __init__(self, db: Database, store: ArtifactStore, job: Job) -> None:
        fed = job.spec.federated
        assert fed is not None and fed.federation_id is not None
        self.db, self.store, self.job = db, store, job
        self.federation_id = fed.federation_id
        self.opened: dict[int, set[str]] = {}  # round → the task ids of its latest opening
        # update key → its bytes: the loop asks for the answers at every look while a round
        # waits; an accepted update never changes while its opening lasts (open_round clears)
        self._updates: dict[str, bytes] = {}

    def nodes(self) -> list[str]:
        return [node.id for node in self.active_nodes()]

    def active_nodes(self) -> Sequence[FederationNode]:
        with self.db.session() as session:
            return list(Repositories(session).active_nodes(self.federation_id))

    def open_round(
        self, round_index: int, node_ids: Sequence[str], weights: bytes, timeout_s: float
    ) -> None:
        self.store.write(global_key(self.job.id, round_index), lambda p: p.write_bytes(weights))
        self._updates.clear()  # the earlier rounds' were collected
        chosen = set(node_ids)
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            federation = repos.federation_by_id(self.federation_id)
            assert federation is not None
            federations.mark_stale(repos, self.job.id, detail="the round was opened again")
            tasks = federations.open_tasks(
                repos,
                job_id=self.job.id,
                spec=self.job.spec,
                federation=federation,
                round_=round_index,
                nodes=[n for n in repos.active_nodes(self.federation_id) if n.id in chosen],
                deadline=utcnow() + timedelta(seconds=timeout_s),
                weights_sha256=hashlib.sha256(weights).hexdigest(),
                attempt=self.job.attempts,
            )
        self.opened[round_index] = {task.id for task in tasks}

    def answers(self, round_index: int) -> list[NodeAnswer]:
        from ppml.training.federated.remote import NodeAnswer

        ids = self.opened.get(round_index, set())
        with self.db.session() as session:
            rows = [
                (t.node_id, t.status, t.started_at, t.update_key, t.rows, t.detail)
                for t in federations.round_tasks(Repositories(session), self.job.id, round_index)
                if t.id in ids
            ]
        return [
            NodeAnswer(
                node_id=node_id,
                status=TaskStatus(status).value,
                started=started is not None,
                update=self._update(key) if status == TaskStatus.ACCEPTED and key else None,
                rows=rows or 0,
                detail=detail,
            )
            for node_id, status, started, key, rows, detail in rows
        ]

    def _update(self, key: str) -> bytes:
        if key not in self._updates:
            with self.store.open_plain(key) as path:
                self._updates[key] = path.read_bytes()
        return self._updates[key]

    def close_round(self, round_index: int) -> None:
        with self.db.session(write=True) as session:
            federations.close_round(Repositories(session), self.job.id, round_index)

    def reject(self, round_index: int, node_id: str, reason: str) -> None:
        with self.db.session(write=True) as session:
            repos = Repositories(session)
            for task in federations.round_tasks(repos, self.job.id, round_index):
                if task.id in self.opened.get(round_index, set()) and task.node_id == node_id:
                    repos.reject_accepted(task.id, now=utcnow(), detail=reason)


def node_charges(
    job: Job,
    started: dict[str, int],
    names: dict[str, tuple[str, int]],
    refused: dict[str, str] | None = None,
) -> list[NodeCharge]:
    """Each node's ε under sample-level DP: its plan's mechanism over the rounds it started
    (``names``: node id → its name and enrolled rows), and why a node refused the job."""
    spec = job.spec
    if spec.privacy is None or spec.privacy.level != "sample":
        return []
    refused = refused or {}
    charges = []
    for node_id in sorted(set(started) | set(refused)):
        rounds = started.get(node_id, 0)
        name, rows = names.get(node_id, (node_id, 0))
        plan = node_sample_plan(spec, rows)
        # composed round by round, as the node's ledger composes its charges (a curve is
        # rounded up in the ledger's units, so this is what the node holds, not less)
        curve = acc.add(*([acc.rdp_curve(plan.event(1))] * rounds)) if rounds else None
        epsilon = acc.epsilon(curve, plan.delta) if curve is not None else 0.0
        charges.append(
            NodeCharge(
                node_id=node_id,
                name=name,
                rounds=rounds,
                epsilon=epsilon,
                delta=plan.delta,
                refused=refused.get(node_id),
            )
        )
    return charges


def train_federation_job(
    job: Job,
    dataset: Dataset,
    db: Database,
    store: ArtifactStore,
    *,
    beat: Heartbeat,
    checkpoint: Callable[[dict[str, Any]], None],
    resume: dict[str, Any] | None,
) -> FederationOutcome:
    """Run the job's rounds over its federation's active nodes."""
    from ppml.training.dp_sgd import TrainingPlan, initial_model
    from ppml.training.federated.remote import train_remote

    spec = job.spec
    fed = spec.federated
    assert fed is not None
    plan = TrainingPlan(
        model=spec.model,
        epochs=1,
        batch_size=spec.training.batch_size,
        learning_rate=spec.training.learning_rate,
        optimizer=spec.training.optimizer,
        momentum=spec.training.momentum,
        seed=spec.training.seed,
        steps_per_epoch=1,
        total_steps=1,
        input_shape=dataset.input_shape,
    )
    module = initial_model(plan, dataset.num_features, dataset.num_classes)
    # A round in the unit the job was priced and is reported in: a node's local DP-SGD steps
    # per round (sample level), or 1 (client level, non-private).
    steps_per_round = schedule(spec, dataset).steps_per_epoch
    channel = StoreChannel(db, store, job)
    with db.session(write=True) as session:  # an earlier attempt's tasks are void now
        federations.mark_stale(Repositories(session), job.id)
    nodes = {n.id: (n.name, n.rows or 0) for n in channel.active_nodes()}
    result = train_remote(
        module=module,
        plan=_remote_plan(job, sum(p.numel() for p in module.parameters()), nodes, steps_per_round),
        dp=_remote_dp(job),
        channel=channel,
        callbacks=beat,
        checkpoint=checkpoint,
        resume=resume,
    )
    with db.session(write=True) as session:
        federations.mark_stale(Repositories(session), job.id, detail="the job ended")
    nodes |= {n.id: (n.name, n.rows or 0) for n in channel.active_nodes()}
    return FederationOutcome(
        state_dict=result.state_dict,
        steps_done=result.rounds_done * steps_per_round,
        stopped=result.stopped,
        nodes=node_charges(job, result.started, nodes, result.refused),
        history=result.history,
    )


def _remote_dp(job: Job) -> RemoteDP | None:
    from ppml.training.federated.remote import RemoteDP

    spec, private = job.spec, job.privacy
    if spec.privacy is None:
        return None
    if spec.privacy.level == "client":
        assert private is not None
        return RemoteDP(
            level="client",
            clip_norm=spec.privacy.max_grad_norm,
            noise_multiplier=private.noise_multiplier,
            sample_rate=private.sample_rate,
        )
    return RemoteDP(level="sample", clip_norm=spec.privacy.max_grad_norm)


def _remote_plan(
    job: Job, num_params: int, nodes: dict[str, tuple[str, int]], steps_per_round: int
) -> RemotePlan:
    from ppml.training.federated.remote import RemotePlan
    from ppml.training.federated.updates import client_norm_bound, sample_norm_bound

    spec = job.spec
    fed = spec.federated
    assert fed is not None
    bound = None
    if spec.privacy is not None and spec.privacy.level == "client":
        bound = client_norm_bound(spec.privacy.max_grad_norm)
    elif spec.privacy is not None and nodes:  # the loosest node's plan bounds every node
        plans = [node_sample_plan(spec, rows) for _, rows in nodes.values() if rows]
        bound = max(
            sample_norm_bound(
                learning_rate=spec.training.learning_rate,
                momentum=spec.training.momentum,
                steps=p.steps,
                clip_norm=p.max_grad_norm,
                sigma=p.noise_multiplier,
                expected_batch=p.sample_rate * rows,
                num_params=num_params,
            )
            for p, rows in zip(plans, [r for _, r in nodes.values() if r], strict=True)
        )
    return RemotePlan(
        rounds=fed.rounds,
        clients_per_round=fed.clients_per_round or None,
        strategy=fed.strategy,
        local_epochs=fed.local_epochs,
        mu=fed.mu,
        server_learning_rate=fed.server_learning_rate,
        round_timeout_s=float(fed.round_timeout_s),
        quorum=fed.quorum,
        norm_bound=bound,
        steps_per_round=steps_per_round,
    )
