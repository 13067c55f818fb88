"""Pricing refuses jobs that cannot run on their dataset before anything is reserved."""

from __future__ import annotations

import pytest

from ppml.config import Settings
from ppml.db.models import Dataset
from ppml.errors import InvalidInput
from ppml.services.pricing import price
from ppml.specs import JobSpec


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
