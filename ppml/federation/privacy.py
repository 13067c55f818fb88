"""A node's sample-level DP-SGD plan for a federated job (pure, torch-free).

Each node runs DP-SGD on its own rows with Poisson rate ``q_k = batch_size / rows_k`` and
``local_epochs × ceil(1/q_k)`` steps a round (:func:`ppml.privacy.calibration.steps_per_epoch`,
the expression pricing and training share). σ is calibrated with the ledger's RDP accounting
so that a node taking part in every round spends exactly ``target_epsilon`` at δ. The node
recomputes its ε with :mod:`ppml.privacy.accounting` from ``(q, σ, steps)``; it never trusts
a number from the server.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ppml.errors import InvalidInput
from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from ppml.specs import JobSpec

__all__ = ["DEFAULT_NODE_DELTA", "NodeSamplePlan", "node_delta", "node_sample_plan"]

#: δ of a node's charge when the job names none.
DEFAULT_NODE_DELTA = 1e-5


@dataclass(frozen=True, kw_only=True)
class NodeSamplePlan:
    """What one node runs each round: the task JSON's ``privacy`` (sample mode)."""

    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int  # local DP-SGD steps per round
    delta: float
    rounds: int

    def event(self, rounds: int | None = None) -> acc.MechanismEvent:
        """The node's mechanism after ``rounds`` rounds (default: all of them)."""
        done = self.rounds if rounds is None else rounds
        return acc.MechanismEvent(
            sample_rate=self.sample_rate,
            noise_multiplier=self.noise_multiplier,
            steps=done * self.steps,
            unit="record",
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def node_delta(spec: JobSpec) -> float:
    """δ each node charges at: the job's, else :data:`DEFAULT_NODE_DELTA`."""
    assert spec.privacy is not None
    return spec.privacy.delta if spec.privacy.delta is not None else DEFAULT_NODE_DELTA


def node_sample_plan(spec: JobSpec, rows: int) -> NodeSamplePlan:
    """The sample-level plan of a node holding ``rows`` training rows.

    Raises:
        InvalidInput: the job is not a sample-level federated job, the node has no rows, or
            no σ reaches ``target_epsilon``.
    """
    fed, privacy = spec.federated, spec.privacy
    if fed is None or privacy is None or privacy.level != "sample":
        raise InvalidInput("a node's sample plan needs a sample-level federated job")
    if rows < 1:
        raise InvalidInput("the node reported no rows", field="rows")
    q = min(1.0, spec.training.batch_size / rows)
    per_round = fed.local_epochs * cal.steps_per_epoch(q)
    delta = node_delta(spec)
    try:
        sigma = cal.calibrate_noise(
            target_epsilon=privacy.target_epsilon,
            delta=delta,
            sample_rate=q,
            steps=fed.rounds * per_round,
        )
    except ValueError as exc:
        raise InvalidInput(
            "no noise level reaches this target_epsilon for a node of this size",
            field="privacy.target_epsilon",
        ) from exc
    return NodeSamplePlan(
        sample_rate=q,
        noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm,
        steps=per_round,
        delta=delta,
        rounds=fed.rounds,
    )
