"""PATE jobs (``kind: pate``): pricing at admission, and the charge of every batch of answers.

The job itself releases nothing: its k teachers train without DP on disjoint partitions of
the training records (a keyed hash of each record under the dataset's secret, so adding or
removing one record moves no other) and stay inside the service. Its admission reserves a
zero curve (a dataset whose budget is spent cannot take one), and ends with a zero release.

Answers are the release. :func:`charge_answers` charges a batch of n answers as the n-fold
composition of GNMax (``ppml.privacy.gnmax``: rho = n/sigma²), under the budget row's lock
that admission takes, as a RESERVE and COMMIT pair on the chained ledger, before the noise
is drawn: a batch the filter refuses is a 409 that writes nothing. The job's privacy record
counts the answers, and its signed receipt is signed again, binding the new entries.

PATE protects single records: refused on client-unit budgets, and on public data (no
budget: train a model directly).
"""

from __future__ import annotations

from dataclasses import dataclass

from ppml.config import Settings
from ppml.db.models import Dataset, JobStatus
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import BudgetExceeded, Conflict, InvalidInput
from ppml.jobs.receipts import sign_release
from ppml.jobs.records import PRIVATE_ARTIFACTS
from ppml.privacy import accounting as acc
from ppml.privacy import gnmax
from ppml.privacy.budgets import budget_status
from ppml.privacy.ledger import Ledger
from ppml.services import audit
from ppml.services.tenants import Principal
from ppml.specs import JobSpec, PateSpec
from ppml.trust.keys import SigningKeys

__all__ = [
    "PARTITION_DOMAIN",
    "TEACHERS",
    "AnswerCharge",
    "PateNotReady",
    "charge_answers",
    "check_student",
    "pate_event",
    "pate_sigma",
]

#: Artefact name of a pate job's teachers (one ONNX graph; private, never downloadable).
TEACHERS = "teachers"
assert TEACHERS in PRIVATE_ARTIFACTS
#: The partition's keyed-hash domain (``ppml.datasets.keys.record_keys``).
PARTITION_DOMAIN = "pate-teachers"


class PateNotReady(Conflict):
    code = "pate-not-ready"
    title = "PATE answers not available"


def check_pate(spec: JobSpec, dataset: Dataset) -> PateSpec:
    """Refuse what PATE cannot protect or run on this dataset (422)."""
    pate = spec.pate
    assert pate is not None  # JobSpec's validator
    if dataset.epsilon_total is None:
        raise InvalidInput(
            "this dataset is public (no budget): train a model on it directly",
            field="kind",
        )
    if dataset.privacy_unit == "client":
        raise InvalidInput(
            "PATE protects single records, but this dataset's budget protects whole "
            "clients: one client's rows spread over many teachers",
            field="kind",
        )
    if pate.teachers > dataset.num_train:
        raise InvalidInput(
            f"more teachers than the dataset's {dataset.num_train} training records",
            field="pate.teachers",
        )
    return pate


def pate_sigma(pate: PateSpec, dataset: Dataset) -> float:
    """GNMax's sigma: as given, or the smallest whose one answer costs ``query_epsilon``."""
    if pate.sigma is not None:
        return pate.sigma
    assert pate.query_epsilon is not None and dataset.delta_total is not None
    try:
        return gnmax.sigma_for(query_epsilon=pate.query_epsilon, delta=dataset.delta_total)
    except ValueError as exc:
        raise InvalidInput(
            "no noise level reaches this query_epsilon", field="pate.query_epsilon"
        ) from exc


def pate_event(spec: JobSpec, dataset: Dataset) -> acc.MechanismEvent:
    """The event a pate job reserves at admission: its student's answers, else none (a
    zero curve)."""
    pate = check_pate(spec, dataset)
    student = pate.student.queries if pate.student is not None else 0
    return gnmax.gnmax_event(student, pate_sigma(pate, dataset))


def check_student(spec: JobSpec, dataset: Dataset, public: Dataset) -> None:
    """Refuse a student whose public set cannot be its input (422)."""
    student = spec.pate.student if spec.pate is not None else None
    assert student is not None
    field = "pate.student.public_dataset_id"
    if public.epsilon_total is not None:
        raise InvalidInput(
            "the student's dataset has a privacy budget: it must be public", field=field
        )
    if public.num_features != dataset.num_features:
        raise InvalidInput(
            f"the student's dataset has {public.num_features} features; the teachers take "
            f"{dataset.num_features}",
            field=field,
        )
    rows = public.num_train + public.num_test
    if student.queries > rows:
        raise InvalidInput(
            f"the student's dataset has {rows} rows; queries may not exceed that",
            field="pate.student.queries",
        )


@dataclass(frozen=True, kw_only=True)
class AnswerCharge:
    """A charged batch of answers: its sigma, its ledger entry and the job's totals."""

    sigma: float
    ledger_entry_id: str
    epsilon: float  # this batch's own ε at the dataset's δ
    queries: int  # the job's answers so far, this batch included
    epsilon_remaining: float


def charge_answers(
    db: Database,
    *,
    job_id: str,
    queries: int,
    by: Principal,
    keys: SigningKeys,
) -> AnswerCharge:
    """Charge ``queries`` answers of a succeeded pate job, in one writer transaction.

    Lock order as everywhere: the budget row, then the job row. Raises PateNotReady when
    the job cannot answer, BudgetExceeded (with ``epsilon_remaining``) when the filter
    refuses; both write nothing.
    """
    with db.session(write=True) as session:
        repos = Repositories(session)
        ledger = Ledger(repos)
        found = repos.job_by_id(job_id)
        assert found is not None
        budget = ledger.lock(found.dataset_id)
        job = repos.job_by_id(job_id, lock=True)
        if job is None or job.status != JobStatus.SUCCEEDED or job.privacy is None:
            raise PateNotReady("the job has no teachers to answer with")
        if budget is None:
            raise PateNotReady("the job's dataset has no budget to charge")
        ledger.require_current(job.dataset_id)
        privacy, sigma = job.privacy, job.privacy.noise_multiplier
        event = gnmax.gnmax_event(queries, sigma)
        before = privacy.queries
        try:
            # The batch is named by its first answer's number: unique per job, and every
            # earlier batch is on the chain before it (this lock orders them).
            commit = ledger.charge(budget, job.id, f"q{before}", event)
        except BudgetExceeded as refused:
            raise _refusal(refused, queries) from None
        total = before + queries
        rho = gnmax.gnmax_rho(total, sigma)
        job.privacy = privacy.model_copy(
            update={
                "queries": total,
                "zcdp_rho": rho,
                "epsilon_spent": acc.epsilon(acc.zcdp_curve(rho), privacy.delta),
                "ledger_entry_id": commit.id,
            }
        )
        job.progress = job.progress.model_copy(update={"epsilon_spent": job.privacy.epsilon_spent})
        if job.receipt is not None and job.artifacts is not None:
            job.receipt = job.receipt.model_copy(update={"privacy": job.privacy, "signed": None})
            sign_release(repos, job, keys)  # binds this batch's entries and the new head
        detail = {"rows": queries, "ledger_entry_id": commit.id, "epsilon": commit.epsilon}
        audit.record(repos, by, "model.predict", "job", job.id, detail)
        remaining = budget_status(budget).epsilon_remaining
    return AnswerCharge(
        sigma=sigma,
        ledger_entry_id=commit.id,
        epsilon=commit.epsilon,
        queries=total,
        epsilon_remaining=remaining,
    )


def _refusal(refused: BudgetExceeded, queries: int) -> BudgetExceeded:
    requested = refused.extra["epsilon_requested"]
    remaining = refused.extra["epsilon_remaining"]
    return BudgetExceeded(
        f"{queries} answer(s) would spend ε={requested:.4g} but the dataset has "
        f"ε={remaining:.4g} left; nothing was answered or charged.",
        epsilon_remaining=remaining,
        epsilon_requested=requested,
        queries=queries,
    )


def price_compute(spec: JobSpec, dataset: Dataset, parameters: int, settings: Settings) -> int:
    """The teachers' work: every training record is visited ``epochs`` times, by its own
    teacher (sample-gradients × parameters, as ``ppml.services.pricing.estimate_compute``)."""
    compute = spec.training.epochs * dataset.num_train * parameters
    limit = min(settings.limits.max_job_compute, settings.limits.max_tenant_compute)
    if compute > limit:
        raise InvalidInput(
            f"the teachers' estimated compute is {compute:.3g}; this server allows "
            f"{limit:.3g} per job (fewer epochs or a smaller model)",
            field="training.epochs",
            compute=compute,
            limit=limit,
        )
    return compute
