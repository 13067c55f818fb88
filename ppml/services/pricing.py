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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ppml.config import Settings
from ppml.db.models import Dataset, Job
from ppml.errors import InvalidInput, PrivacyRequired
from ppml.privacy import accounting as acc
from ppml.specs import FederatedSpec, JobSpec, cnn1d_problem, count_parameters

__all__ = ["Pricing", "Schedule", "price", "schedule", "steps_to_charge"]


@dataclass(frozen=True, kw_only=True)
class Schedule:
    sample_rate: float
    steps_per_epoch: int  # per epoch (centralised) or per round (federated)
    total_steps: int
    unit: Literal["record", "client"]
    federated: bool = False


@dataclass(frozen=True, kw_only=True)
class Pricing:
    """What a job will cost, computed before it runs."""

    schedule: Schedule
    event: acc.MechanismEvent | None  # None for non-private jobs
    epsilon: float  # the job's own ε at its δ (0 when non-private)
    delta: float | None

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
            "unit": self.event.unit,
            "level": spec.privacy.level,
            "accountant": "rdp",
            "grid_version": acc.GRID_VERSION,
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
    budget_protects_clients = dataset.privacy_unit == "client" and dataset.epsilon_total is not None
    if privacy.level == "sample" and budget_protects_clients:
        raise InvalidInput(
            "this dataset's budget protects whole clients; record-level jobs cannot spend it",
            field="privacy.level",
        )
    cap = dataset.delta_total
    if cap is not None and privacy.delta is not None and privacy.delta > cap:
        raise InvalidInput(
            f"delta may not exceed the dataset's delta ({cap:g})", field="privacy.delta"
        )
    population = dataset.num_train
    if privacy.level == "client" and spec.federated is not None:
        population = spec.federated.num_clients
    if privacy.delta is not None and privacy.delta >= 1 / population:
        raise InvalidInput(
            f"delta must be well below 1/n = {1 / population:.3g}", field="privacy.delta"
        )


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
    if spec.privacy is None:
        return Pricing(schedule=plan, event=None, epsilon=0.0, delta=None)
    fed = spec.federated
    population = fed.num_clients if fed is not None and plan.unit == "client" else dataset.num_train
    delta = spec.privacy.delta or dataset.delta_total or min(1e-5, 0.1 / population)
    try:
        sigma = acc.calibrate_noise(
            target_epsilon=spec.privacy.target_epsilon,
            delta=delta,
            sample_rate=plan.sample_rate,
            steps=plan.total_steps,
            unit=plan.unit,
        )
    except ValueError as exc:
        raise InvalidInput(
            "no noise level reaches this target_epsilon for this job",
            field="privacy.target_epsilon",
        ) from exc
    event = acc.MechanismEvent(
        sample_rate=plan.sample_rate, noise_multiplier=sigma, steps=plan.total_steps, unit=plan.unit
    )
    return Pricing(
        schedule=plan, event=event, epsilon=acc.epsilon(acc.rdp_curve(event), delta), delta=delta
    )


def steps_to_charge(job: Job, *, report_every: int) -> int | None:
    """What a job stopped short of its end by a cancel or a lost worker is charged.

    PRIVACY.md's lifecycle: None (a full release) while the data was never touched;
    otherwise the steps last reported plus one reporting interval, capped at the plan;
    the whole plan when no report ever arrived (progress unknown).
    """
    if not job.data_touched:
        return None
    planned = int((job.privacy or {}).get("steps_planned") or job.steps_done)
    if job.heartbeat_at is None:
        return planned
    return min(planned, job.steps_done + report_every)
