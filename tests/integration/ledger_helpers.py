"""Rows and specs the ledger tests share: a tenant, a dataset with its budget, job specs.

The state machine (``test_ledger_state_machine.py``), the concurrency race
(``test_ledger_concurrency.py``) and the unit check (``test_ledger_units.py``) build the same
small world; it lives here so that no test module imports another.
"""

from __future__ import annotations

from typing import Any

from ppml.db.models import Dataset, new_id
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.privacy import accounting as acc
from ppml.privacy.ledger import Ledger
from ppml.services.tenants import create_tenant
from ppml.specs import JobSpec

NUM_TRAIN = 1000
BATCH = 50  # q = 0.05, 20 steps per epoch
DELTA = 1e-5


def make_tenant(db: Database) -> str:
    with db.session(write=True) as session:
        return create_tenant(Repositories(session), name=f"t-{new_id('x')}").id


def make_dataset(db: Database, tenant_id: str, *, epsilon: float) -> Dataset:
    """A dataset row and its budget, without the file (nothing here reads the data)."""
    dataset_id = new_id("ds")
    dataset = Dataset(
        id=dataset_id,
        tenant_id=tenant_id,
        name="ledger-machine",
        source={"builtin": "digits"},
        task="classification",
        num_features=64,
        num_classes=10,
        num_train=NUM_TRAIN,
        num_test=200,
        num_clients=None,
        classes={"labels": list(range(10))},
        privacy_unit="record",
        epsilon_total=epsilon,
        delta_total=DELTA,
        storage_key=f"datasets/{dataset_id}.npz",
    )
    with db.session(write=True) as session:
        repos = Repositories(session)
        repos.add(dataset)
        Ledger(repos).open_budget(
            dataset_id=dataset_id, epsilon_total=epsilon, delta_total=DELTA, unit="record"
        )
    return dataset


def job_spec(dataset_id: str, *, epsilon: float, epochs: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "machine",
            "dataset_id": dataset_id,
            "model": {"arch": "logreg"},
            "training": {"epochs": epochs, "batch_size": BATCH, "learning_rate": 0.1},
            "privacy": {"target_epsilon": epsilon, "delta": DELTA},
        }
    )


def within_filter(used: acc.Curve, caps: acc.Curve) -> bool:
    """The filter rule, written out here rather than trusted from ``acc.fits``."""
    return any(u <= c for u, c in zip(used, caps, strict=True))


def privacy_plan(event: acc.MechanismEvent) -> dict[str, Any]:
    """The job row's privacy plan, as admission writes it, for jobs reserved directly."""
    return {
        "target_epsilon": 1.0,
        "epsilon_planned": acc.epsilon(acc.rdp_curve(event), DELTA),
        "epsilon_spent": None,
        "delta": DELTA,
        "noise_multiplier": event.noise_multiplier,
        "max_grad_norm": 1.0,
        "sample_rate": event.sample_rate,
        "sampling": event.sampling,
        "steps": 0,
        "steps_planned": event.steps,
        "unit": event.unit,
        "level": "sample",
        "accountant": "rdp",
        "grid_version": acc.GRID_VERSION,
    }
