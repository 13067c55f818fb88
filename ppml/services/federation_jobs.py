"""Admission of jobs on a federation (``federated.federation_id``, #16).

The job names no dataset: admission sets ``dataset_id`` to the federation's backing dataset
and fills in what the federation decides (``num_clients``: its active nodes;
``clients_per_round``: all of them unless asked), so pricing, the ledger and the worker see
an ordinary federated job. Client-level jobs reserve on the federation's budget exactly as
DP-FedAvg does today; sample-level jobs on a record-unit federation are charged at the nodes
(each node's own ledger), nothing here.
"""

from __future__ import annotations

from ppml.db.models import Dataset
from ppml.db.repositories import Repositories
from ppml.errors import InvalidInput, NotFound
from ppml.federation.privacy import DEFAULT_NODE_DELTA, node_sample_plan
from ppml.services.federations import require_active_nodes
from ppml.specs import JobSpec

__all__ = ["NOT_WITH_FEDERATION", "federation_target"]

#: Fields of a simulation that a federation decides for itself.
NOT_WITH_FEDERATION = ("num_clients", "partition", "dropout")


def _refuse_simulation_fields(spec: JobSpec) -> None:
    fed = spec.federated
    assert fed is not None
    if spec.dataset_id is not None:
        raise InvalidInput(
            "a job on a federation names no dataset_id (its federation's data is used)",
            field="dataset_id",
        )
    if spec.kind != "train":
        raise InvalidInput("federations run kind 'train' jobs only", field="kind")
    for name in NOT_WITH_FEDERATION:
        if name in fed.model_fields_set:
            raise InvalidInput(
                f"federated.{name} does not apply to a federation (its nodes are the clients)",
                field=f"federated.{name}",
            )


def federation_target(
    repos: Repositories, tenant_id: str, spec: JobSpec
) -> tuple[Dataset, JobSpec]:
    """The backing dataset and the spec as it will be priced and stored.

    Raises:
        InvalidInput: fields a federation decides, a quorum above the nodes per round, a
            client-level job on a record-unit federation, a node no σ fits.
        NotFound: no such federation of the tenant.
        Conflict: no active node.
    """
    _refuse_simulation_fields(spec)
    fed = spec.federated
    assert fed is not None and fed.federation_id is not None
    federation = repos.federation(tenant_id, fed.federation_id)
    if federation is None:
        raise NotFound("federation not found", field="federated.federation_id")
    dataset = repos.dataset_by_id(federation.dataset_id)
    assert dataset is not None
    nodes = require_active_nodes(repos, federation)
    per_round = fed.clients_per_round or len(nodes)
    if per_round > len(nodes):
        raise InvalidInput(
            f"federation {federation.name} has {len(nodes)} active nodes; clients_per_round "
            "must not exceed that",
            field="federated.clients_per_round",
        )
    if fed.quorum > per_round:
        raise InvalidInput("quorum must not exceed the nodes per round", field="federated.quorum")
    privacy = spec.privacy
    if privacy is not None and privacy.level == "client" and federation.privacy_unit != "client":
        raise InvalidInput(
            "client-level privacy needs a client-unit federation (with a budget); this one "
            "protects records, each at its node: use level 'sample'",
            field="privacy.level",
        )
    if privacy is not None and privacy.level == "sample" and privacy.delta is None:
        privacy = privacy.model_copy(update={"delta": DEFAULT_NODE_DELTA})
    filled = spec.model_copy(
        update={
            "dataset_id": dataset.id,
            "privacy": privacy,
            "federated": fed.model_copy(
                update={"num_clients": len(nodes), "clients_per_round": per_round}
            ),
        }
    )
    if privacy is not None and privacy.level == "sample":
        for node in nodes:  # each node's σ must exist before the job is admitted
            node_sample_plan(filled, node.rows or 0)
    return dataset, filled
