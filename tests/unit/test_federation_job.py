"""What a federation job's receipt says of its nodes (``ppml.jobs.federation.node_charges``)."""

from __future__ import annotations

from ppml.db.models import Job
from ppml.federation.privacy import node_sample_plan
from ppml.jobs.federation import node_charges
from ppml.privacy import accounting as acc
from ppml.specs import JobSpec

SPEC = JobSpec.model_validate(
    {
        "name": "fed",
        "model": {"arch": "logreg"},
        "training": {"epochs": 1, "batch_size": 32, "learning_rate": 0.1},
        "privacy": {"target_epsilon": 4.0, "delta": 1e-5, "max_grad_norm": 1.0, "level": "sample"},
        "federated": {"federation_id": "fed_x", "rounds": 6},
    }
)


def test_each_node_is_given_what_its_ledger_composes_and_refusals_are_reported() -> None:
    # arrange: a ran every round, b four of them, c refused at once
    job = Job(id="job_x", spec=SPEC)
    names = {"nod_a": ("a", 400), "nod_b": ("b", 400), "nod_c": ("c", 200)}
    refused = {"nod_c": "budget: would spend ε=4 but this node has ε=1 left"}
    # act
    charges = {c.name: c for c in node_charges(job, {"nod_a": 6, "nod_b": 4}, names, refused)}
    # assert: the round's curve added once per round started, as the node's ledger adds its
    # charges (each rounded up in the ledger's units): never less than what a node holds
    plan = node_sample_plan(SPEC, 400)
    one = acc.rdp_curve(plan.event(1))
    assert charges["a"].epsilon == acc.epsilon(acc.add(*[one] * 6), 1e-5)
    assert charges["a"].epsilon >= acc.epsilon(acc.rdp_curve(plan.event(6)), 1e-5)
    assert charges["a"].epsilon <= 4.0 + 1e-6
    assert charges["b"].epsilon == acc.epsilon(acc.add(*[one] * 4), 1e-5)
    assert (charges["c"].rounds, charges["c"].epsilon, charges["c"].refused) == (
        0,
        0.0,
        refused["nod_c"],
    )
    assert charges["a"].refused is None


def test_a_client_level_job_lists_no_node_charges() -> None:
    spec = SPEC.model_copy(
        update={"privacy": SPEC.privacy.model_copy(update={"level": "client"})}  # type: ignore[union-attr]
    )
    assert node_charges(Job(id="job_y", spec=spec), {"nod_a": 3}, {"nod_a": ("a", 400)}) == []
