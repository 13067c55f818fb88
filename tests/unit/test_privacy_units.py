"""A job is charged only to a budget of its own privacy unit, metrics included in its price.

Every refusal here happens at pricing, before anything is reserved (a 422 over HTTP).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from ppml.config import Settings
from ppml.db.models import Dataset, Job
from ppml.errors import InvalidInput
from ppml.jobs.schedule import schedule, steps_to_charge
from ppml.privacy import accounting as acc
from ppml.services.pricing import price
from ppml.specs import JobSpec


def dataset(
    *,
    unit: str = "record",
    budget: bool = True,
    clients: int | None = None,
    validation: str | None = None,
) -> Dataset:
    return Dataset(
        id="ds_1",
        tenant_id="ten_1",
        name="patients",
        source={"upload": {"format": "csv"}},
        task="classification",
        num_features=4,
        num_classes=2,
        num_train=800,
        num_test=200,
        num_clients=clients,
        num_test_clients=None if clients is None else 20,
        classes={"labels": ["a", "b"]},
        privacy_unit=unit,
        epsilon_total=8.0 if budget else None,
        delta_total=1e-4 if budget else None,
        storage_key="datasets/ds_1.npz",
        validation_dataset_id=validation,
    )


def spec(
    *,
    level: str = "sample",
    scheme: str | None = None,
    num_clients: int = 80,
    share: float | None = None,
    rounds: int = 5,
) -> JobSpec:
    privacy: dict[str, Any] = {"target_epsilon": 1.3, "level": level}
    if share is not None:
        privacy["evaluation"] = {"epsilon_share": share}
    body: dict[str, Any] = {
        "name": "job",
        "dataset_id": "ds_1",
        "model": {"arch": "logreg"},
        "training": {"epochs": 2, "batch_size": 5, "learning_rate": 0.1},
        "privacy": privacy,
    }
    if scheme is not None:
        body["federated"] = {
            "num_clients": num_clients,
            "clients_per_round": 20,
            "rounds": rounds,
            "partition": {"scheme": scheme},
        }
    return JobSpec.model_validate(body)


# --- finding 1: the unit of the job is the unit of the budget ---------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_client_level_over_simulated_clients_of_a_client_budget_is_refused(scheme: str) -> None:
    # arrange: the reproduction of the audit, one real client's rows spread over many
    data = dataset(unit="client", clients=80)
    # act / assert
    with pytest.raises(InvalidInput, match="natural clients") as refused:
        price(spec(level="client", scheme=scheme, num_clients=800), data, Settings())
    assert refused.value.field == "federated.partition.scheme"


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "column"])
def test_client_level_on_a_record_budget_is_refused(scheme: str) -> None:
    data = dataset(unit="record", clients=80)
    with pytest.raises(InvalidInput, match="protects single records") as refused:
        price(spec(level="client", scheme=scheme), data, Settings())
    assert refused.value.field == "privacy.level"


@pytest.mark.parametrize("scheme", [None, "iid", "column"])
def test_record_level_on_a_client_budget_is_refused(scheme: str | None) -> None:
    data = dataset(unit="client", clients=80)
    with pytest.raises(InvalidInput, match="protects whole clients"):
        price(spec(level="sample", scheme=scheme), data, Settings())


def test_client_level_over_the_natural_clients_is_priced_in_clients() -> None:
    pricing = price(
        spec(level="client", scheme="column"), dataset(unit="client", clients=80), Settings()
    )
    assert pricing.event is not None and pricing.event.unit == "client"
    assert pricing.event.sample_rate == 20 / 80


def test_record_level_jobs_on_record_budgets_are_priced_in_records() -> None:
    for scheme in (None, "iid", "dirichlet", "column"):
        data = dataset(unit="record", clients=80)
        pricing = price(spec(level="sample", scheme=scheme), data, Settings())
        assert pricing.event is not None and pricing.event.unit == "record", scheme


def test_delta_counts_held_out_units_too() -> None:
    # 800 train + 200 test rows: 1/n is 1e-3, not 1/800.
    data = dataset(budget=False)
    body = spec().model_dump()
    body["privacy"]["delta"] = 1.1e-3
    with pytest.raises(InvalidInput, match="held-out"):
        price(JobSpec.model_validate(body), data, Settings())
    body["privacy"]["delta"] = 1e-5
    assert price(JobSpec.model_validate(body), data, Settings()).delta == 1e-5


# --- finding 2: metrics are a priced release --------------------------------------------


def test_metrics_on_budgeted_data_are_a_gaussian_release_inside_the_target() -> None:
    # act
    pricing = price(spec(), dataset(), Settings())
    # assert: the event carries the releases, and the whole job still spends the target
    event = pricing.event
    assert event is not None and pricing.delta is not None
    assert pricing.evaluation.mechanism == "gaussian"
    assert event.eval_releases == 2 and event.eval_noise_multiplier is not None
    assert pricing.evaluation.noise_multiplier == event.eval_noise_multiplier
    assert pricing.epsilon <= 1.3
    training_only = acc.MechanismEvent(
        sample_rate=event.sample_rate, noise_multiplier=event.noise_multiplier, steps=event.steps
    )
    metrics_cost = pricing.epsilon - acc.epsilon(acc.rdp_curve(training_only), pricing.delta)
    assert 0 < metrics_cost <= 0.05 * 1.3  # "a few percent of the job's target"


def test_federated_history_releases_are_all_charged() -> None:
    pricing = price(spec(scheme="iid", rounds=40), dataset(clients=80), Settings())
    assert pricing.evaluation.releases == 20  # default: every 2 rounds
    assert pricing.event is not None and pricing.event.eval_releases == 40


def test_more_than_fifty_scores_are_refused() -> None:
    body = spec(scheme="iid", rounds=60).model_dump()
    body["federated"]["evaluate_every"] = 1
    with pytest.raises(InvalidInput) as refused:
        price(JobSpec.model_validate(body), dataset(clients=80), Settings())
    assert refused.value.field == "federated.evaluate_every"


def test_public_data_and_public_validation_sets_score_exactly_and_for_free() -> None:
    public = price(spec(), dataset(budget=False), Settings())
    validated = price(spec(), dataset(validation="ds_public"), Settings())
    assert public.evaluation.mechanism == "exact-public-data"
    assert validated.evaluation.mechanism == "exact-public-validation"
    assert validated.evaluation.validation_dataset_id == "ds_public"
    for pricing in (public, validated):
        assert pricing.event is not None and pricing.event.eval_releases == 0


def test_an_evaluation_share_of_zero_withholds_metrics_from_analysts() -> None:
    pricing = price(spec(share=0.0), dataset(), Settings())
    assert pricing.evaluation.mechanism == "withheld"
    assert pricing.event is not None and pricing.event.eval_releases == 0


def test_the_privacy_plan_records_the_evaluation_mechanism() -> None:
    job_spec = spec()
    pricing = price(job_spec, dataset(), Settings())
    plan = pricing.privacy_plan(job_spec)
    assert plan is not None and plan.evaluation is not None
    assert plan.evaluation.mechanism == "gaussian"
    assert plan.evaluation.scalar_releases == 2
    # The record rebuilds the very event that was reserved.
    assert plan.event(plan.steps_planned) == pricing.event


def test_a_partial_run_is_charged_its_steps_and_every_evaluation() -> None:
    event = price(spec(), dataset(), Settings()).event
    assert event is not None
    nothing_ran = acc.rdp_curve(event.with_steps(0))
    assert any(nothing_ran)  # a model scored before its first step is still a release
    assert nothing_ran == acc.evaluation_curve(event.eval_noise_multiplier or 0.0, 2)


# --- finding 6: a lost sample-level federated job is charged a whole round --------------


def test_a_lost_sample_level_federated_job_is_charged_a_whole_round_beyond_its_report() -> None:
    # arrange: 5 local epochs at q = 5/10 → a round is 10 local steps... made large here
    data = dataset(clients=80)
    body = spec(scheme="iid").model_dump()
    body["federated"]["local_epochs"] = 5
    body["training"]["batch_size"] = 1  # q = 1/10: 10 steps an epoch, 50 a round
    job_spec = JobSpec.model_validate(body)
    pricing = price(job_spec, data, Settings())
    per_round = schedule(job_spec, data).steps_per_epoch
    assert per_round == 50
    job = Job(
        id="job_1",
        privacy=pricing.privacy_plan(job_spec),
        data_touched=True,
        steps_done=2 * per_round,
        heartbeat_at=datetime.now(UTC),
    )
    # act
    charged = steps_to_charge(job, report_every=10)
    # assert: one whole round, not 10 local steps
    assert charged == 3 * per_round


def test_the_receipt_states_the_unit_of_the_jobs_mechanism() -> None:
    # arrange: a client-level job on public data (whose dataset row says "record")
    from ppml.jobs.receipts import build_receipt

    data = dataset(budget=False, clients=80)
    job_spec = spec(level="client", scheme="column")
    pricing = price(job_spec, data, Settings())
    job = Job(id="job_1", spec=job_spec, privacy=pricing.privacy_plan(job_spec))
    # act
    receipt = build_receipt(job, data, privacy=job.privacy, metrics=None, architecture={})
    # assert
    assert receipt.privacy_unit == "client"
