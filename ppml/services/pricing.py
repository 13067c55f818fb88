"""Pricing a job before it runs: validate it against its dataset, plan its steps, calibrate σ.

Steps are counted by :func:`ppml.jobs.schedule.schedule`, which the worker plans with too,
so what runs is what was charged.

A job on a budgeted dataset also releases its held-out metrics through a Gaussian mechanism
(:mod:`ppml.privacy.evaluation`): its releases are part of the job's mechanism event, so the
quote, the reservation, the ledger and the receipt include them. Calibration gives them a
share of ``target_epsilon`` (3% by default) and training the rest.

The job's privacy unit must be its budget's unit: a client-level job (DP-FedAvg) only on a
client-unit budget and only over the data's natural clients (the ``column`` partition);
a record-level job only on a record-unit budget.

Every job also gets a compute estimate (:func:`estimate_compute`, in sample-gradients ×
parameters), refused here above ``limits.max_job_compute`` and summed over a tenant's active
jobs at admission (``ppml.services.jobs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ppml.architectures import count_parameters, model_problem
from ppml.config import Limits, Settings
from ppml.db.models import Dataset, DatasetStatus
from ppml.errors import DatasetNotReady, InvalidInput, PrivacyRequired
from ppml.jobs.records import PrivacyRecord
from ppml.jobs.schedule import Schedule, evaluation_plan, schedule
from ppml.privacy import accounting as acc
from ppml.privacy import calibration as cal
from ppml.privacy.evaluation import WITHHELD, EvaluationPlan
from ppml.services.pate import pate_event, price_compute
from ppml.services.synthesis import plan_synthesis
from ppml.specs import FederatedSpec, JobSpec

__all__ = ["Pricing", "estimate_compute", "price", "sample_gradients"]


@dataclass(frozen=True, kw_only=True)
class Pricing:
    """What a job will cost, computed before it runs."""

    schedule: Schedule
    event: acc.MechanismEvent | None  # None for non-private jobs
    epsilon: float  # the job's own ε at its δ (0 when non-private), metrics included
    delta: float | None
    evaluation: EvaluationPlan
    compute: int  # estimated work: sample-gradients × model parameters (estimate_compute)
    # "nodes": a sample-level job on a record-unit federation, charged at each node.
    charged_at: Literal["service", "nodes"] = "service"

    def privacy_plan(self, spec: JobSpec) -> PrivacyRecord | None:
        """The job's privacy record at admission."""
        if self.event is None or self.delta is None:
            return None
        if spec.privacy is None:  # a pate job: its student's answers, reserved now
            student = spec.pate.student if spec.pate is not None else None
            return PrivacyRecord(
                target_epsilon=self.epsilon,
                epsilon_planned=self.epsilon,
                epsilon_spent=None,
                delta=self.delta,
                noise_multiplier=self.event.noise_multiplier,
                max_grad_norm=0.0,
                sample_rate=1.0,
                steps=0,
                steps_planned=0,
                unit="record",
                grid_version=acc.GRID_VERSION,
                evaluation=self.evaluation,
                zcdp_rho=self.event.zcdp_rho,
                mechanism=self.event.mechanism,
                queries=student.queries if student is not None else 0,
            )
        return PrivacyRecord(
            target_epsilon=spec.privacy.target_epsilon,
            epsilon_planned=self.epsilon,
            epsilon_spent=None,
            delta=self.delta,
            noise_multiplier=self.event.noise_multiplier,
            max_grad_norm=spec.privacy.max_grad_norm,
            sample_rate=self.event.sample_rate,
            sampling=self.event.sampling,
            steps=0,
            steps_planned=self.event.steps,
            charge_interval=self.schedule.charge_interval,
            charged_at=self.charged_at,
            unit="client" if self.event.unit == "client" else "record",
            level=spec.privacy.level,
            accountant="rdp",
            grid_version=acc.GRID_VERSION,
            evaluation=self.evaluation,
            zcdp_rho=self.event.zcdp_rho,
            mechanism=self.event.mechanism,
        )


def _check_limits(spec: JobSpec, dataset: Dataset, settings: Settings) -> int:
    """Refuse what passes the server's limits; returns the model's parameter count."""
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
    input_shape = dataset.input_shape
    problem = model_problem(spec.model, num_features=dataset.num_features, input_shape=input_shape)
    if problem is not None:
        raise InvalidInput(problem.message, field=f"model.{problem.field}")
    params = count_parameters(
        spec.model,
        num_features=dataset.num_features,
        num_classes=dataset.num_classes,
        input_shape=input_shape,
    )
    if params > limits.max_parameters:
        raise InvalidInput(
            f"the model has {params} parameters; the limit is {limits.max_parameters}",
            field="model",
            limit=limits.max_parameters,
        )
    return params


def _check_gpus(spec: JobSpec, limits: Limits) -> None:
    gpus = spec.resources.gpus
    if gpus > limits.max_job_gpus:
        raise InvalidInput(
            f"the job asks for {gpus} GPUs; the limit per job is {limits.max_job_gpus}",
            field="resources.gpus",
            limit=limits.max_job_gpus,
        )
    if gpus > 1 and (spec.kind != "train" or spec.privacy is None or spec.federated is not None):
        raise InvalidInput(
            "several GPUs run centralised DP-SGD training only (kind train, privacy set, "
            "federated null)",
            field="resources.gpus",
        )


def sample_gradients(spec: JobSpec, dataset: Dataset, plan: Schedule) -> int:
    """Expected per-example gradients (forward and backward passes) of the whole job.

    Centralised: every step draws an expected batch of ``batch_size`` (``q · n``), so
    ``total_steps × batch_size``. Federated: ``rounds × clients_per_round`` clients each do
    their local work on a shard of ``n / num_clients`` records (on average): sample-level DP
    runs ``local_epochs × ceil(1/q)`` Poisson steps of expected batch ``q · shard``; DP-FedAvg
    and non-private clients make ``local_epochs`` shuffled passes over the shard. Held-out
    scoring (forward passes only) is left out.
    """
    fed = spec.federated
    if fed is None:
        return plan.total_steps * spec.training.batch_size
    shard = dataset.num_train / fed.num_clients
    if plan.unit == "record":  # sample-level DP on each client (ppml.jobs.schedule)
        local = plan.steps_per_epoch * plan.sample_rate * shard
    else:
        local = fed.local_epochs * shard
    return math.ceil(fed.rounds * fed.clients_per_round * local)


def estimate_compute(spec: JobSpec, dataset: Dataset, plan: Schedule, *, parameters: int) -> int:
    """A job's estimated work: :func:`sample_gradients` × the model's parameters.

    About a sixth of the job's training FLOPs (a forward and backward pass cost about six
    per parameter and example); DP's per-example clipping adds a constant factor.
    """
    return sample_gradients(spec, dataset, plan) * parameters


def _check_compute(spec: JobSpec, compute: int, settings: Settings) -> None:
    """A job larger than one job may be, or than its whole tenant may run at once, is a 422
    (a 429 would ask the client to retry what can never be admitted)."""
    limits = settings.limits
    limit = min(limits.max_job_compute, limits.max_tenant_compute)
    if compute > limit:
        raise InvalidInput(
            f"the job's estimated compute is {compute:.3g} sample-gradients × parameters; "
            f"this server allows {limit:.3g} per job (fewer epochs or rounds, or a smaller "
            "model)",
            field="federated.rounds" if spec.federated else "training.epochs",
            compute=compute,
            limit=limit,
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
    if fed is None or (fed.partition.scheme != "column" and not dataset.federation_backing):
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


def price(spec: JobSpec, dataset: Dataset, settings: Settings) -> Pricing:
    """Validate a job against its dataset and compute its privacy cost (no writes)."""
    if dataset.status != DatasetStatus.READY:  # its counts are not known yet (or never will be)
        raise DatasetNotReady(
            f"dataset {dataset.id} is {dataset.status}; it takes jobs once it is ready",
            field="dataset_id",
            dataset_status=dataset.status,
        )
    _check_gpus(spec, settings.limits)
    if spec.kind == "synthesize":
        return _price_synthesis(spec, dataset, settings)
    if spec.kind == "pate":
        return _price_pate(spec, dataset, settings)
    if spec.training.batch_size > dataset.num_train:
        raise InvalidInput(
            f"batch_size exceeds the dataset's {dataset.num_train} training records",
            field="training.batch_size",
        )
    parameters = _check_limits(spec, dataset, settings)
    if spec.federated is not None and not dataset.federation_backing:
        _check_federated(spec.federated, dataset)
    _check_privacy(spec, dataset)
    plan = schedule(spec, dataset)
    compute = estimate_compute(spec, dataset, plan, parameters=parameters)
    _check_compute(spec, compute, settings)
    evaluation = evaluation_plan(spec, dataset)
    if spec.privacy is None:
        return Pricing(
            schedule=plan,
            event=None,
            epsilon=0.0,
            delta=None,
            evaluation=evaluation,
            compute=compute,
        )
    population = _population(spec, dataset)
    delta = spec.privacy.delta or dataset.delta_total or min(1e-5, 0.1 / population)
    try:
        event, evaluation = _calibrate(spec.privacy.target_epsilon, delta, plan, evaluation)
    except ValueError as exc:
        raise InvalidInput(
            "no noise level reaches this target_epsilon for this job",
            field="privacy.target_epsilon",
        ) from exc
    at_nodes = dataset.federation_backing and dataset.epsilon_total is None
    return Pricing(
        schedule=plan,
        event=event,
        epsilon=acc.epsilon(acc.rdp_curve(event), delta),
        delta=delta,
        evaluation=evaluation,
        compute=compute,
        charged_at="nodes" if at_nodes else "service",
    )


def _price_synthesis(spec: JobSpec, dataset: Dataset, settings: Settings) -> Pricing:
    """A synthesize job: a zCDP mechanism run once (ppml.services.synthesis), no steps."""
    plan = plan_synthesis(spec, dataset, settings)
    return Pricing(
        schedule=schedule(spec, dataset),
        event=plan.event,
        epsilon=plan.epsilon,
        delta=plan.delta,
        evaluation=WITHHELD,
        compute=plan.compute,
    )


def _price_pate(spec: JobSpec, dataset: Dataset, settings: Settings) -> Pricing:
    """A pate job: its teachers release nothing; its student's answers are reserved (a zero
    curve without a student); each later batch of answers is charged when it is asked
    (ppml.services.pate)."""
    event = pate_event(spec, dataset)
    parameters = _check_limits(spec, dataset, settings)
    assert dataset.delta_total is not None  # check_pate: a budgeted dataset
    return Pricing(
        schedule=schedule(spec, dataset),
        event=event,
        epsilon=acc.epsilon(acc.rdp_curve(event), dataset.delta_total),
        delta=dataset.delta_total,
        evaluation=WITHHELD,
        compute=price_compute(spec, dataset, parameters, settings),
    )


def _calibrate(
    target: float, delta: float, plan: Schedule, evaluation: EvaluationPlan
) -> tuple[acc.MechanismEvent, EvaluationPlan]:
    """σ of training (and of the metric releases) for a job that spends ``target``."""
    q, steps, unit = plan.sample_rate, plan.total_steps, plan.unit
    if evaluation.mechanism != "gaussian":
        sigma = cal.calibrate_noise(
            target_epsilon=target, delta=delta, sample_rate=q, steps=steps, unit=unit
        )
        event = acc.MechanismEvent(sample_rate=q, noise_multiplier=sigma, steps=steps, unit=unit)
        return event, evaluation
    sigma, z = cal.calibrate_with_evaluation(
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
    return event, evaluation.model_copy(update={"noise_multiplier": z})
