"""A job's compute estimate (issue #15, finding 4): sample-gradients × parameters, known at
pricing, and refused with its figures above the per-job limit."""

from __future__ import annotations

from typing import Any

import pytest

from ppml.architectures import count_parameters
from ppml.config import Limits, Settings
from ppml.db.models import Dataset, DatasetStatus
from ppml.errors import InvalidInput
from ppml.services.pricing import price
from ppml.specs import JobSpec

NUM_TRAIN = 1280  # a multiple of every batch size below: steps × batch = epochs × records


def dataset(*, num_clients: int | None = None) -> Dataset:
    return Dataset(
        id="ds_c",
        tenant_id="ten_c",
        name="compute",
        source={"upload": "x.csv"},
        task="classification",
        num_features=20,
        num_classes=4,
        num_train=NUM_TRAIN,
        num_test=320,
        num_clients=num_clients,
        classes={"labels": [0, 1, 2, 3]},
        privacy_unit="record",
        epsilon_total=None,
        delta_total=None,
        storage_key="datasets/ds_c.npz",
        status=DatasetStatus.READY,
    )


def job(
    *,
    epochs: int = 2,
    batch_size: int = 64,
    hidden: list[int] | None = None,
    federated: dict[str, Any] | None = None,
    private: bool = True,
) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "compute",
            "dataset_id": "ds_c",
            "model": {"arch": "mlp", "hidden_sizes": hidden or [16]},
            "training": {"epochs": epochs, "batch_size": batch_size, "learning_rate": 0.1},
            "privacy": {"target_epsilon": 2.0, "delta": 1e-5} if private else None,
            "federated": federated,
        }
    )


def parameters(spec: JobSpec) -> int:
    return count_parameters(spec.model, num_features=20, num_classes=4)


def compute(spec: JobSpec, settings: Settings | None = None) -> int:
    return price(spec, dataset(), settings or Settings()).compute


def fed(**fields: Any) -> dict[str, Any]:
    return {"num_clients": 10, "clients_per_round": 5, "rounds": 4, "local_epochs": 1, **fields}


def test_a_centralised_job_costs_its_sample_gradients_times_its_parameters() -> None:
    # arrange
    spec = job(epochs=3)
    # act
    estimate = compute(spec)
    # assert: 3 epochs of 20 steps of an expected 64 records
    assert estimate == 3 * NUM_TRAIN * parameters(spec)


def test_doubling_epochs_doubles_the_estimate() -> None:
    assert compute(job(epochs=4)) == 2 * compute(job(epochs=2))


def test_a_bigger_model_costs_more_in_proportion_to_its_parameters() -> None:
    small, big = job(hidden=[16]), job(hidden=[64, 64])

    assert compute(big) / compute(small) == parameters(big) / parameters(small) > 1


def test_privacy_does_not_change_the_work() -> None:
    assert compute(job(private=True)) == compute(job(private=False))


@pytest.mark.parametrize("private", [False, True], ids=["plain", "sample-level"])
def test_federated_jobs_count_rounds_clients_per_round_and_local_epochs(private: bool) -> None:
    # arrange: 10 clients of 128 records each; 5 take part in each of 4 rounds
    base = job(federated=fed(), private=private)
    # act
    estimate = compute(base)
    # assert: every chosen client passes once over its shard (sample-level: 2 Poisson steps
    # of an expected 64 of its 128 records)
    assert estimate == 4 * 5 * (NUM_TRAIN // 10) * parameters(base)
    assert compute(job(federated=fed(clients_per_round=10), private=private)) == 2 * estimate
    assert compute(job(federated=fed(rounds=8), private=private)) == 2 * estimate
    assert compute(job(federated=fed(local_epochs=3), private=private)) == 3 * estimate


def test_federated_local_training_is_not_counted_per_epoch_of_the_whole_dataset() -> None:
    # training.epochs does not drive a federated job: its rounds do
    assert compute(job(epochs=5, federated=fed())) == compute(job(epochs=1, federated=fed()))


@pytest.mark.parametrize(
    ("federated", "field"), [(None, "training.epochs"), (fed(), "federated.rounds")]
)
def test_a_job_over_the_per_job_limit_is_refused_with_its_figures(
    federated: dict[str, Any] | None, field: str
) -> None:
    # arrange
    spec = job(federated=federated)
    estimate = compute(spec)
    settings = Settings(limits=Limits(max_job_compute=estimate - 1))
    # act
    with pytest.raises(InvalidInput) as refused:
        price(spec, dataset(), settings)
    # assert
    assert refused.value.field == field
    assert refused.value.extra == {"compute": estimate, "limit": estimate - 1}
    assert compute(spec, Settings(limits=Limits(max_job_compute=estimate))) == estimate


def test_a_job_larger_than_its_whole_tenant_may_run_is_refused_at_pricing() -> None:
    # arrange: the per-job limit is generous, the tenant's is not
    spec = job()
    estimate = compute(spec)
    settings = Settings(limits=Limits(max_tenant_compute=estimate - 1))
    # act
    with pytest.raises(InvalidInput) as refused:
        price(spec, dataset(), settings)
    # assert: a 422 now, not a 429 that no wait could ever lift
    assert refused.value.extra["limit"] == estimate - 1
