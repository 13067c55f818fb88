"""What a job runs and what it may be charged, known before it runs: worker and API alike.

One :class:`Schedule` says how a job's steps are counted, in the unit of its mechanism event:

* centralised DP-SGD: Poisson rate ``q = batch_size / n`` over records, ``ceil(n / batch)``
  steps per epoch;
* federated, client level (DP-FedAvg): Poisson client sampling ``q = clients_per_round /
  num_clients``, one step per round, the client as privacy unit;
* federated, sample level: every client runs DP-SGD on its own shard with the same Poisson
  rate ``q = batch_size / (n / num_clients)`` and the same σ, ``local_epochs × ceil(1/q)`` steps
  per round. The shards are disjoint, so the dataset is charged the maximum over clients
  (parallel composition); as every client's curve is the same, that maximum is that curve,
  priced as if each client took part in every round (an upper bound).

Pricing (``ppml.services.pricing``) and the worker's runner plan with the same
:func:`schedule`, so what runs is what was charged; a job stopped short is charged per
:func:`steps_to_charge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ppml.db.models import Dataset, Job
from ppml.errors import InvalidInput
from ppml.jobs.records import PrivacyRecord
from ppml.privacy import calibration as cal
from ppml.privacy.evaluation import (
    DEFAULT_LOSS_CLIP,
    MAX_METRIC_RELEASES,
    EvaluationPlan,
    metric_releases,
)
from ppml.specs import JobSpec

__all__ = ["Schedule", "evaluation_plan", "schedule", "steps_to_charge", "unreported_steps"]


@dataclass(frozen=True, kw_only=True)
class Schedule:
    sample_rate: float
    steps_per_epoch: int  # per epoch (centralised) or per round (federated)
    total_steps: int
    unit: Literal["record", "client"]
    federated: bool = False

    @property
    def charge_interval(self) -> int:
        """Steps that may run beyond the last progress report: a sample-level federated
        job reports once a round, and a round runs ``steps_per_epoch`` local steps."""
        return self.steps_per_epoch if self.federated and self.unit == "record" else 0


def schedule(spec: JobSpec, dataset: Dataset) -> Schedule:
    """How the job's steps are counted (see the module docstring). A synthesize job runs its
    mechanism once and has no steps: its zCDP charge is whole once it touched the data."""
    if spec.kind != "train":
        return Schedule(sample_rate=1.0, steps_per_epoch=1, total_steps=0, unit="record")
    fed = spec.federated
    if fed is None:
        q, per_epoch, total = cal.plan_dp_sgd(
            num_records=dataset.num_train,
            batch_size=spec.training.batch_size,
            epochs=spec.training.epochs,
        )
        return Schedule(sample_rate=q, steps_per_epoch=per_epoch, total_steps=total, unit="record")
    if spec.privacy is not None and spec.privacy.level == "sample":
        shard = dataset.num_train / fed.num_clients
        q = min(1.0, spec.training.batch_size / shard)
        per_round = fed.local_epochs * cal.steps_per_epoch(q)
        return Schedule(
            sample_rate=q,
            steps_per_epoch=per_round,
            total_steps=fed.rounds * per_round,
            unit="record",
            federated=True,
        )
    return Schedule(
        sample_rate=fed.clients_per_round / fed.num_clients,
        steps_per_epoch=1,
        total_steps=fed.rounds,
        unit="client",
        federated=True,
    )


def evaluation_plan(spec: JobSpec, dataset: Dataset) -> EvaluationPlan:
    """How the job's held-out metrics will be released (see ppml.privacy.evaluation)."""
    fed = spec.federated
    releases = metric_releases(fed.rounds if fed else None, fed.evaluate_every if fed else None)
    if releases > MAX_METRIC_RELEASES:
        raise InvalidInput(
            f"at most {MAX_METRIC_RELEASES} scores per job; raise evaluate_every",
            field="federated.evaluate_every",
            limit=MAX_METRIC_RELEASES,
        )
    if dataset.federation_backing:  # no evaluation at the nodes yet (#16)
        return EvaluationPlan(mechanism="withheld", releases=0)
    if dataset.validation_dataset_id is not None:
        return EvaluationPlan(
            mechanism="exact-public-validation",
            releases=releases,
            scored_on="validation",
            validation_dataset_id=dataset.validation_dataset_id,
        )
    if dataset.epsilon_total is None:
        return EvaluationPlan(mechanism="exact-public-data", releases=releases)
    share = spec.privacy.evaluation.epsilon_share if spec.privacy else 0.0
    if share == 0:
        return EvaluationPlan(mechanism="withheld", releases=0)
    clip = spec.privacy.evaluation.loss_clip if spec.privacy else DEFAULT_LOSS_CLIP
    return EvaluationPlan(
        mechanism="gaussian", loss_clip=clip, releases=releases, epsilon_share=share
    )


def steps_to_charge(job: Job, *, report_every: int) -> int | None:
    """What a job stopped short of its end by a cancel or a lost worker is charged.

    PRIVACY.md's lifecycle: None (a full release) while the data was never touched;
    otherwise the steps last reported plus what may have run since, capped at the plan:
    one reporting interval, or one whole round of local steps for a sample-level federated
    job (it reports once a round); the whole plan when no report ever arrived.
    """
    if not job.data_touched:
        return None
    privacy = job.privacy
    planned = privacy.steps_planned if privacy is not None else job.steps_done
    if job.heartbeat_at is None:
        return planned
    return min(planned, job.steps_done + unreported_steps(privacy, report_every=report_every))


def unreported_steps(privacy: PrivacyRecord | None, *, report_every: int) -> int:
    """Steps a job may have run since its last report (see :func:`steps_to_charge`)."""
    return max(report_every, privacy.charge_interval if privacy is not None else 0)
