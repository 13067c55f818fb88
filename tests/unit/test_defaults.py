"""ppml's default model and training (ppml.defaults): a pure function of public metadata,
filled into a submitted spec by the job service, and a job that names neither succeeds on
every built-in."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.routes.jobs import to_schema
from ppml import defaults
from ppml.config import Settings
from ppml.datasets import BUILTINS
from ppml.db.models import Dataset, JobStatus
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.defaults import PublicMetadata, choose
from ppml.jobs.runner import JobRunner
from ppml.services import defaults as service_defaults
from ppml.services.datasets import BudgetRequest, register_builtin
from ppml.specs import JobSpec
from tests.conftest import ADMIN_TOKEN
from tests.unit.worlds import RunnerWorld, make_world, worker_settings


def meta(**fields: Any) -> PublicMetadata:
    base: dict[str, Any] = {
        "num_train": 1437,
        "num_features": 64,
        "num_classes": 10,
        "input_shape": None,
        "epsilon": 3.0,
        "delta": 1e-5,
    }
    return PublicMetadata(**{**base, **fields})


def bare_spec(**fields: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"name": "bare", "dataset_id": "ds_x", "privacy": {"target_epsilon": 1.0}, **fields}
    )


# ------------------------------------------------------------------------------ the rule


def test_the_rule_is_a_pure_function_of_public_metadata_alone() -> None:
    # The rule takes one argument, the metadata; every field of which is a count, a shape,
    # a number, a name or a flag: there is no place for rows to reach it.
    assert list(inspect.signature(choose).parameters) == ["meta"]
    hints = typing.get_type_hints(PublicMetadata)
    allowed = {int, float, str, bool, float | None, tuple[int, ...] | None}
    assert {f.name: hints[f.name] in allowed for f in dataclasses.fields(PublicMetadata)} == {
        f.name: True for f in dataclasses.fields(PublicMetadata)
    }
    # Same metadata, same choice (and a fresh but equal metadata object too).
    assert choose(meta()) == choose(meta()) == choose(dataclasses.replace(meta()))


@pytest.mark.parametrize(
    ("shape", "features", "epsilon", "arch"),
    [
        ((1, 8, 8), 64, 1.0, "logreg"),
        ((1, 8, 8), 64, 2.99, "logreg"),
        ((1, 8, 8), 64, 3.0, "cnn2d"),
        ((1, 8, 8), 64, 8.0, "cnn2d"),
        ((1, 8, 8), 64, None, "cnn2d"),
        ((1, 40), 40, 1.0, "cnn1d"),
        ((40,), 40, 8.0, "cnn1d"),
        ((1, 40), 40, None, "cnn1d"),
        (None, 30, 1.0, "logreg"),
        (None, 30, None, "logreg"),
    ],
)
def test_images_signals_and_tables_get_the_studys_architectures(
    shape: tuple[int, ...] | None, features: int, epsilon: float | None, arch: str
) -> None:
    choice = choose(meta(input_shape=shape, num_features=features, epsilon=epsilon))

    assert choice.model.arch == arch
    assert choice.training.optimizer == "sgd" and choice.training.momentum == 0.9


def test_private_tables_and_images_from_epsilon_3_average_their_weights() -> None:
    image = {"input_shape": (1, 8, 8), "num_features": 64}

    federated = choose(meta(epsilon=8.0, federated=True, **image)).training

    for epsilon in (3.0, 5.0, 8.0):
        assert choose(meta(epsilon=epsilon, **image)).training.ema_decay == 0.95
    assert federated.ema_decay == 0.0
    for epsilon in (None, 1.0, 2.99):
        assert choose(meta(epsilon=epsilon, **image)).training.ema_decay == 0.0
    assert choose(meta(epsilon=1.0)).training.ema_decay == 0.9
    assert choose(meta(epsilon=None)).training.ema_decay == 0.0
    signal = choose(meta(epsilon=8.0, input_shape=(1, 40), num_features=40)).training
    assert signal.ema_decay == 0.0


@pytest.mark.parametrize(("epsilon", "lr"), [(3.0, 0.1), (5.0, 0.1), (7.99, 0.1), (8.0, 0.15)])
def test_private_image_cnns_take_small_steps_and_larger_ones_from_epsilon_8(
    epsilon: float, lr: float
) -> None:
    training = choose(meta(epsilon=epsilon, input_shape=(1, 8, 8), num_features=64)).training

    assert training.learning_rate == lr
    assert training.batch_size == 256 and training.epochs == 30


@pytest.mark.parametrize(("epsilon", "kernel"), [(3.0, 5), (5.0, 5), (8.0, 5), (None, 3)])
def test_private_image_cnns_have_5x5_kernels_and_the_non_private_one_3x3(
    epsilon: float | None, kernel: int
) -> None:
    model = choose(meta(epsilon=epsilon, input_shape=(1, 8, 8), num_features=64)).model

    assert model.arch == "cnn2d" and model.channels == [16, 32]
    assert model.kernel_size == kernel


@pytest.mark.parametrize("rows", [1, 3, 10, 455, 100_000])
@pytest.mark.parametrize("epsilon", [None, 0.5, 1.0, 8.0])
def test_the_batch_never_exceeds_the_rows(rows: int, epsilon: float | None) -> None:
    for shape, features in [((1, 8, 8), 64), ((1, 40), 40), (None, 30)]:
        training = choose(
            meta(num_train=rows, epsilon=epsilon, input_shape=shape, num_features=features)
        ).training

        assert 1 <= training.batch_size <= max(1, rows)


def test_pate_teachers_are_not_chosen_for() -> None:
    with pytest.raises(ValueError, match="pate"):
        choose(meta(kind="pate"))
    with pytest.raises(ValueError, match="a pate job needs model and training"):
        JobSpec.model_validate(
            {
                "name": "p",
                "dataset_id": "ds_x",
                "kind": "pate",
                "privacy": None,
                "pate": {"teachers": 2, "sigma": 10.0},
            }
        )


# -------------------------------------------------------------------- the service's fill


def test_a_spec_naming_neither_is_valid_and_fill_lists_what_was_chosen() -> None:
    spec = bare_spec()
    filled = defaults.fill(spec, meta(input_shape=(1, 40), num_features=40))

    assert defaults.omitted(spec) == ["model", "training"]
    assert filled.defaults_applied == ["model", "training"]
    assert filled.model.arch == "cnn1d"
    # A spec that names both keeps them, and nothing is listed.
    named = bare_spec(
        model={"arch": "mlp"}, training={"epochs": 2, "batch_size": 8, "learning_rate": 0.1}
    )
    kept = defaults.fill(named, meta())
    assert kept.defaults_applied == [] and kept.model == named.model
    assert kept.training == named.training


def test_released_statistics_make_a_private_tabular_job_standardise_unless_it_says_otherwise() -> (
    None
):
    tabular = meta(num_features=30, num_classes=2, num_train=450, standardised=True)
    # act
    filled = defaults.fill(bare_spec(), tabular)
    declined = defaults.fill(bare_spec(preprocessing={"standardize": False}), tabular)
    unreleased = defaults.fill(bare_spec(), dataclasses.replace(tabular, standardised=False))
    image = defaults.fill(bare_spec(), meta(input_shape=(1, 8, 8), standardised=True))
    public = defaults.fill(bare_spec(privacy=None), dataclasses.replace(tabular, epsilon=None))
    # assert
    assert filled.preprocessing.standardize is True
    assert filled.defaults_applied == ["model", "training", "preprocessing"]
    assert declined.preprocessing.standardize is False
    assert "preprocessing" not in declined.defaults_applied
    assert unreleased.preprocessing.standardize is False
    assert image.preprocessing.standardize is False
    assert public.preprocessing.standardize is False


def test_the_service_passes_only_metadata_and_never_reads_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dataset whose rows are nowhere: filling its spec must not need them.
    dataset = Dataset(
        id="ds_x",
        tenant_id="t",
        name="d",
        source={},
        num_features=40,
        num_classes=10,
        num_train=8000,
        num_test=2000,
        classes={},
        data_schema={"input_shape": [1, 40]},
        privacy_unit="record",
        epsilon_total=8.0,
        delta_total=1e-5,
        storage_key="nowhere/at/all.npz",
    )
    seen: list[tuple[Any, ...]] = []
    real_fill = defaults.fill

    def spy(*args: Any) -> JobSpec:
        seen.append(args)
        return real_fill(*args)

    monkeypatch.setattr(service_defaults, "fill", spy)
    filled = service_defaults.with_defaults(bare_spec(), dataset, Settings().limits)

    assert [type(a) for a in seen[0]] == [JobSpec, PublicMetadata]
    assert seen[0][1] == PublicMetadata(
        num_train=8000,
        num_features=40,
        num_classes=10,
        input_shape=(1, 40),
        epsilon=1.0,
        delta=1e-5,
        unit="record",
        kind="train",
        federated=False,
    )
    assert filled.model.arch == "cnn1d"
    # Chosen epochs respect the server's limits.
    capped = Settings().limits.model_copy(update={"max_epochs": 3})
    assert service_defaults.with_defaults(bare_spec(), dataset, capped).training.epochs == 3


# ----------------------------------------------------- a bare job on every built-in


@pytest.fixture
def world(sqlite_database_url: str, tmp_path: Path) -> Iterator[RunnerWorld]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=sqlite_database_url,
        broker_url="memory://",
        admin_token=ADMIN_TOKEN,
    )
    # One epoch keeps the test fast: the chosen epochs are cut to the server's limit.
    settings = settings.model_copy(
        update={"limits": settings.limits.model_copy(update={"max_epochs": 1})}
    )
    db = Database(sqlite_database_url)
    yield make_world(db, worker_settings(settings))
    db.dispose()


@pytest.mark.parametrize("builtin", BUILTINS)
def test_a_job_with_only_name_dataset_and_privacy_succeeds_on_every_builtin(
    world: RunnerWorld, builtin: str
) -> None:
    # arrange
    with world.db.session(write=True) as session:
        dataset = register_builtin(
            Repositories(session),
            world.store,
            world.settings,
            tenant_id=world.tenant_id,
            name=builtin,
            builtin=builtin,
            budget=BudgetRequest(epsilon=8.0, delta=1e-5),
        )
    spec = JobSpec.model_validate(
        {"name": "bare", "dataset_id": dataset.id, "privacy": {"target_epsilon": 2.0}}
    )
    # act
    quote = world.service.quote(world.tenant_id, spec)
    job, created = world.service.submit(world.tenant_id, spec)
    outcome = JobRunner(world.db, world.settings, owner="w").run(job.id)
    # assert: the stored spec (what GET /v1/jobs/{id} shows) holds the choice
    stored = world.job(job.id)
    assert created and outcome == "succeeded" and stored.status == JobStatus.SUCCEEDED
    arch = {"digits": "logreg", "mnist1d": "cnn1d", "breast_cancer": "logreg"}[builtin]
    assert stored.spec.defaults_applied == ["model", "training"]
    assert stored.spec.model.arch == arch and stored.spec.training.epochs == 1
    assert quote.model == stored.spec.model and quote.training == stored.spec.training
    assert quote.defaults_applied == ["model", "training"]
    assert stored.metrics is not None
    # GET /v1/jobs/{id} answers with its route's view of the row: the choice is in it.
    shown = to_schema(stored).model_dump(mode="json")["spec"]
    assert shown["defaults_applied"] == ["model", "training"]
    assert shown["model"]["arch"] == arch and shown["training"]["epochs"] == 1
