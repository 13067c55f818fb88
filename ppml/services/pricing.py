"""Pricing a job before it runs: validate it against its dataset, plan its steps, calibrate σ.

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

The worker plans its loops with the same :func:`schedule`, so what runs is what was charged.

A job on a budgeted dataset also releases its held-out metrics through a Gaussian mechanism
(:mod:`ppml.privacy.evaluation`): its releases are part of the job's mechanism event, so the
quote, the reservation, the ledger and the receipt include them. Calibration gives them a
share of ``target_epsilon`` (3% by default) and training the rest.

The job's privacy unit must be its budget's unit: a client-level job (DP-FedAvg) only on a
client-unit budget and only over the data's natural clients (the ``column`` partition);
a record-level job only on a record-unit budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from ppml.config import Settings
from ppml.db.models import Dataset, Job
from ppml.errors import InvalidInput, PrivacyRequired
from ppml.privacy import accounting as acc
from ppml.privacy.evaluation import (
    DEFAULT_LOSS_CLIP,
    MAX_METRIC_RELEASES,
    EvaluationPlan,
    metric_releases,
)
from ppml.specs import FederatedSpec, JobSpec, cnn1d_problem, count_parameters

__all__ = [
    "Pricing",
    "Schedule",
    "evaluation_plan",
    "price",
    "schedule",
    "steps_to_charge",
    "unreported_steps",
]


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


@dataclass(frozen=True, kw_only=True)
class Pricing:
    """What a job will cost, computed before it runs."""

    schedule: Schedule
    event: acc.MechanismEvent | None  # None for non-private jobs
    epsilon: float  # the job's own ε at its δ (0 when non-private), metrics included
    delta: float | None
    evaluation: EvaluationPlan

    def privacy_plan(self, spec: JobSpec) -> dict[str, Any] | None:
        if self.event is None or spec.privacy is None:
            return None
        return {
            "target_epsilon": spec.privacy.target_epsilon,
            "epsilon_planned": self.epsilon,
            "epsilon_spent": None,
            "delta": self.delta,
            "noise_multiplier": self.event.noise_multiplier,
            "max_grad_norm": spec.privacy.max_grad_norm,
            "sample_rate": self.event.sample_rate,
            "sampling": self.event.sampling,
            "steps": 0,
            "steps_planned": self.event.steps,
            "charge_interval": self.schedule.charge_interval,
            "unit": self.event.unit,
            "level": spec.privacy.level,
            "accountant": "rdp",
            "grid_version": acc.GRID_VERSION,
            "evaluation": self.evaluation.to_dict(),
        }


def schedule(spec: JobSpec, dataset: Dataset) -> Schedule:
    """How the job's steps are counted (see the module docstring)."""
    fed = spec.federated
    if fed is None:
        q, per_epoch, total = acc.plan_dp_sgd(
            num_records=dataset.num_train,
            batch_size=spec.training.batch_size,
            epochs=spec.training.epochs,
        )
        return Schedule(sample_rate=q, steps_per_epoch=per_epoch, total_steps=total, unit="record")
    if spec.privacy is not None and spec.privacy.level == "sample":
        shard = dataset.num_train / fed.num_clients
        q = min(1.0, spec.training.batch_size / shard)
        per_round = fed.local_epochs * acc.steps_per_epoch(q)
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


def _check_limits(spec: JobSpec, dataset: Dataset, settings: Settings) -> None:
    limits = settings.limits
    if spec.training.epochs > limits.max_epochs:
        raise InvalidInput(
            f"at most {limits.max_epochs} epochs", field="training.epochs", limit=limits.max_epochs
        )
    fed = spec.federated
    passes = spec.training.epochs if fed is None else fed.rounds * fed.local_epochs
    share = 1.0 if fed is None else fed.clients_per_round / fed.num_clients
    if passes * share * dataset.num_train > limits.max_sample_epochs:
        raise InvalidInput(
            "the job would visit more training records than this server allows "
            "(epochs × records, or rounds × local epochs × records per round)",
            field="federated.rounds" if fed else "training.epochs",
            limit=limits.max_sample_epochs,
        )
    if spec.model.arch == "cnn1d":
        problem = cnn1d_problem(spec.model.channels, dataset.num_features)
        if problem is not None:
            raise InvalidInput(problem, field="model.channels")
    params = count_parameters(
        spec.model, num_features=dataset.num_features, num_classes=dataset.num_classes
    )
    if params > limits.max_parameters:
        raise InvalidInput(
            f"the model has {params} parameters; the limit is {limits.max_parameters}",
            field="model",
            limit=limits.max_parameters,
        )


def _check_federated(fed: FederatedSpec, dataset: Dataset) -> None:
    if fed.num_clients > dataset.num_train:
        raise InvalidInput(
            f"more clients than the dataset's {dataset.num_train} training records",
            field="federated.num_clients",
        )
    if fed.partition.scheme == "column":
        if dataset.num_clients is None:
            raise InvalidInput(
                "partition 'column' needs a dataset uploaded with a client_column",
                field="federated.partition.scheme",
            )
        if fed.num_clients != dataset.num_clients:
            raise InvalidInput(
                f"this dataset has {dataset.num_clients} natural clients; "
                "set num_clients to that number",
                field="federated.num_clients",
            )


def _check_privacy(spec: JobSpec, dataset: Dataset) -> None:
    privacy = spec.privacy
    if privacy is None:
        if dataset.epsilon_total is not None:
            raise PrivacyRequired(
                "this dataset has a privacy budget: jobs on it must set 'privacy'"
            )
        return
    if privacy.sampling != "poisson":
        raise InvalidInput(
            "only Poisson sampling is certified by the accountant", field="privacy.sampling"
        )
    if privacy.level == "client" and spec.federated is None:
        raise InvalidInput("client-level privacy applies to federated jobs", field="privacy.level")
    _check_unit(spec, dataset)
    cap = dataset.delta_total
    if cap is not None and privacy.delta is not None and privacy.delta > cap:
        raise InvalidInput(
            f"delta may not exceed the dataset's delta ({cap:g})", field="privacy.delta"
        )
    population = _population(spec, dataset)
    if privacy.delta is not None and privacy.delta >= 1 / population:
        raise InvalidInput(
            f"delta must be well below 1/n = {1 / population:.3g} (n counts every protected "
            "unit, held-out ones included)",
            field="privacy.delta",
        )


def _check_unit(spec: JobSpec, dataset: Dataset) -> None:
    """A job's privacy unit is its budget's unit (PRIVACY.md "Units and neighbours")."""
    privacy, fed = spec.privacy, spec.federated
    if privacy is None or dataset.epsilon_total is None:
        return  # public data: nothing to protect, nothing charged
    if privacy.level == "sample" and dataset.privacy_unit == "client":
        raise InvalidInput(
            "this dataset's budget protects whole clients; record-level jobs cannot spend it",
            field="privacy.level",
        )
    if privacy.level != "client":
        return
    if dataset.privacy_unit != "client":
        raise InvalidInput(
            "client-level privacy (DP-FedAvg) protects whole clients, but this dataset's "
            "budget protects single records: one record changes a client's update without "
            "adding or removing a client. Use level 'sample', or register the data with "
            "privacy_unit 'client'",
            field="privacy.level",
        )
    if fed is None or fed.partition.scheme != "column":
        raise InvalidInput(
            "client-level privacy protects a client only where clients are the data's natural "
            "clients: use partition 'column' (iid and dirichlet spread one client's rows over "
            "many simulated clients)",
            field="federated.partition.scheme",
        )


def _population(spec: JobSpec, dataset: Dataset) -> int:
    """Protected units of the dataset, held-out ones included (for δ < 1/n)."""
    if spec.privacy is not None and spec.privacy.level == "client" and spec.federated:
        if dataset.num_clients is not None:
            return dataset.num_clients + (dataset.num_test_clients or 0)
        return spec.federated.num_clients
    return dataset.num_train + dataset.num_test


def _evaluation(spec: JobSpec, dataset: Dataset) -> EvaluationPlan:
    """How the job's held-out metrics will be released (see ppml.privacy.evaluation)."""
    fed = spec.federated
    releases = metric_releases(fed.rounds if fed else None, fed.evaluate_every if fed else None)
    if releases > MAX_METRIC_RELEASES:
        raise InvalidInput(
            f"at most {MAX_METRIC_RELEASES} scores per job; raise evaluate_every",
            field="federated.evaluate_every",
            limit=MAX_METRIC_RELEASES,
        )
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


def evaluation_plan(spec: JobSpec, dataset: Dataset) -> EvaluationPlan:
    """The evaluation plan of a job without a privacy record (non-private, public data)."""
    return _evaluation(spec, dataset)


def price(spec: JobSpec, dataset: Dataset, settings: Settings) -> Pricing:
    """Validate a job against its dataset and compute its privacy cost (no writes)."""
    if spec.training.batch_size > dataset.num_train:
        raise InvalidInput(
            f"batch_size exceeds the dataset's {dataset.num_train} training records",
            field="training.batch_size",
        )
    _check_limits(spec, dataset, settings)
    if spec.federated is not None:
        _check_federated(spec.federated, dataset)
    _check_privacy(spec, dataset)
    plan = schedule(spec, dataset)
    evaluation = _evaluation(spec, dataset)
    if spec.privacy is None:
        return Pricing(schedule=plan, event=None, epsilon=0.0, delta=None, evaluation=evaluation)
    population = _population(spec, dataset)
    delta = spec.privacy.delta or dataset.delta_total or min(1e-5, 0.1 / population)
    try:
        event, evaluation = _calibrate(spec.privacy.target_epsilon, delta, plan, evaluation)
    except ValueError as exc:
        raise InvalidInput(
            "no noise level reaches this target_epsilon for this job",
            field="privacy.target_epsilon",
        ) from exc
    return Pricing(
        schedule=plan,
        event=event,
        epsilon=acc.epsilon(acc.rdp_curve(event), delta),
        delta=delta,
        evaluation=evaluation,
    )


def _calibrate(
    target: float, delta: float, plan: Schedule, evaluation: EvaluationPlan
) -> tuple[acc.MechanismEvent, EvaluationPlan]:
    """σ of training (and of the metric releases) for a job that spends ``target``."""
    q, steps, unit = plan.sample_rate, plan.total_steps, plan.unit
    if evaluation.mechanism != "gaussian":
        sigma = acc.calibrate_noise(
            target_epsilon=target, delta=delta, sample_rate=q, steps=steps, unit=unit
        )
        event = acc.MechanismEvent(sample_rate=q, noise_multiplier=sigma, steps=steps, unit=unit)
        return event, evaluation
    sigma, z = acc.calibrate_with_evaluation(
        target_epsilon=target,
        delta=delta,
        sample_rate=q,
        steps=steps,
        unit=unit,
        eval_releases=evaluation.scalar_releases,
        eval_share=evaluation.epsilon_share,
    )
    event = acc.MechanismEvent(
        sample_rate=q,
        noise_multiplier=sigma,
        steps=steps,
        unit=unit,
        eval_noise_multiplier=z,
        eval_releases=evaluation.scalar_releases,
    )
    return event, replace(evaluation, noise_multiplier=z)


def steps_to_charge(job: Job, *, report_every: int) -> int | None:
    """What a job stopped short of its end by a cancel or a lost worker is charged.

    PRIVACY.md's lifecycle: None (a full release) while the data was never touched;
    otherwise the steps last reported plus what may have run since, capped at the plan:
    one reporting interval, or one whole round of local steps for a sample-level federated
    job (it reports once a round); the whole plan when no report ever arrived.
    """
    if not job.data_touched:
        return None
    privacy = job.privacy or {}
    planned = int(privacy.get("steps_planned") or job.steps_done)
    if job.heartbeat_at is None:
        return planned
    return min(planned, job.steps_done + unreported_steps(privacy, report_every=report_every))


def unreported_steps(privacy: dict[str, Any], *, report_every: int) -> int:
    """Steps a job may have run since its last report (see :func:`steps_to_charge`)."""
    return max(report_every, int(privacy.get("charge_interval") or 0))
