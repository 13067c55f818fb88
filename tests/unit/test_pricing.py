"""Pricing refuses jobs that cannot run on their dataset before anything is reserved."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ppml.config import Settings
from ppml.db.models import Dataset
from ppml.errors import InvalidInput
from ppml.services.pricing import price
from ppml.specs import JobSpec, request_hash


def one_feature_dataset() -> Dataset:
    return Dataset(
        id="ds_one",
        tenant_id="ten_one",
        name="one feature",
        source={"upload": "x.csv"},
        task="classification",
        num_features=1,
        num_classes=2,
        num_train=500,
        num_test=100,
        num_clients=None,
        classes={"labels": [0, 1]},
        privacy_unit="record",
        epsilon_total=None,
        delta_total=None,
        storage_key="datasets/ds_one.npz",
    )


def cnn_spec(channels: list[int]) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "cnn",
            "dataset_id": "ds_one",
            "model": {"arch": "cnn1d", "channels": channels, "kernel_size": 3},
            "training": {"epochs": 1, "batch_size": 10, "learning_rate": 0.1},
            "privacy": None,
        }
    )


def test_a_one_channel_block_on_a_length_one_signal_is_a_422_naming_the_field() -> None:
    with pytest.raises(InvalidInput, match="block 1 has 1 channel") as refused:
        price(cnn_spec([4, 1]), one_feature_dataset(), Settings())

    assert refused.value.field == "model.channels"


def test_two_channels_on_a_length_one_signal_are_priced() -> None:
    pricing = price(cnn_spec([4, 2]), one_feature_dataset(), Settings())

    assert pricing.event is None  # non-private: priced, nothing to reserve


def image_spec(arch: str = "cnn2d") -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "images",
            "dataset_id": "ds_one",
            "model": {"arch": arch, "channels": [4, 8], "kernel_size": 3},
            "training": {"epochs": 1, "batch_size": 10, "learning_rate": 0.1},
            "privacy": None,
        }
    )


def image_dataset(input_shape: list[int] | None) -> Dataset:
    dataset = one_feature_dataset()
    dataset.num_features = 64
    dataset.data_schema = {"classes": ["0", "1"], "input_shape": input_shape}
    return dataset


@pytest.mark.parametrize("input_shape", [None, [64], [8, 8]])
def test_cnn2d_without_a_3d_input_shape_is_a_422_naming_the_field(
    input_shape: list[int] | None,
) -> None:
    with pytest.raises(InvalidInput, match="3-D input_shape") as refused:
        price(image_spec(), image_dataset(input_shape), Settings())

    assert refused.value.field == "model.arch"


def test_cnn2d_on_a_declared_image_shape_is_priced_by_its_parameters() -> None:
    pricing = price(image_spec(), image_dataset([1, 8, 8]), Settings())
    flat = price(image_spec("cnn1d"), image_dataset([1, 8, 8]), Settings())

    # cnn2d: 1->4 and 4->8 3x3 convs with GroupNorm, then 8 x 2 x 2 -> 2 logits
    parameters = (9 * 4 + 12) + (4 * 9 * 8 + 24) + (32 + 1) * 2
    assert pricing.compute == flat.compute // flat_parameters() * parameters


def flat_parameters() -> int:
    # cnn1d on 64 features: 1->4 and 4->8 convs of width 3 with GroupNorm, 8 x 16 -> 2
    return (3 * 4 + 12) + (4 * 3 * 8 + 24) + (128 + 1) * 2


def gpus_spec(gpus: int, *, private: bool = True) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "wide",
            "dataset_id": "ds_one",
            "model": {"arch": "logreg"},
            "training": {"epochs": 1, "batch_size": 50, "learning_rate": 0.1},
            "privacy": {"target_epsilon": 1.0} if private else None,
            "resources": {"gpus": gpus},
        }
    )


def budgeted_dataset() -> Dataset:
    dataset = one_feature_dataset()
    dataset.epsilon_total, dataset.delta_total = 8.0, 1e-5
    return dataset


def test_more_gpus_than_workers_have_is_a_422_naming_the_field_and_the_limit() -> None:
    settings = Settings(limits={"max_job_gpus": 2})

    with pytest.raises(InvalidInput, match="asks for 3 GPUs") as refused:
        price(gpus_spec(3), budgeted_dataset(), settings)

    assert refused.value.field == "resources.gpus"
    assert refused.value.extra["limit"] == 2


def test_a_dp_job_on_as_many_gpus_as_allowed_is_priced_as_on_one() -> None:
    settings = Settings(limits={"max_job_gpus": 2})

    wide = price(gpus_spec(2), budgeted_dataset(), settings)
    narrow = price(gpus_spec(1), budgeted_dataset(), settings)

    # the noise is added once to the global sum, so σ and the charge do not change
    assert wide.event is not None and narrow.event is not None
    assert wide.event.noise_multiplier == narrow.event.noise_multiplier
    assert wide.epsilon == narrow.epsilon


def test_several_gpus_for_a_non_private_job_are_refused() -> None:
    settings = Settings(limits={"max_job_gpus": 4})

    with pytest.raises(InvalidInput, match="centralised DP-SGD training only") as refused:
        price(gpus_spec(2, private=False), one_feature_dataset(), settings)

    assert refused.value.field == "resources.gpus"


def test_zero_gpus_do_not_validate_and_the_default_keeps_the_request_hash() -> None:
    with pytest.raises(ValidationError):
        gpus_spec(0)
    plain = gpus_spec(1).model_dump(mode="json")
    del plain["resources"]

    assert request_hash(JobSpec.model_validate(plain)) == request_hash(gpus_spec(1))
    assert request_hash(gpus_spec(2)) != request_hash(gpus_spec(1))
