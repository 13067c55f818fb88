"""A dataset's DP standardisation statistics: released once (owner keys), read by any key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from api.deps import CurrentPrincipal, DatabaseDep, OwnedDataset
from api.routes.common import Router, errors
from ppml.datasets.statistics import DatasetStatistics
from ppml.errors import NotFound
from ppml.services.statistics import release_statistics, statistics_of

router = Router(prefix="/v1/datasets", tags=["datasets"])


class StatisticsRequest(BaseModel):
    """What an owner releases: the statistics' ε and, optionally, the clipping bounds."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="ε of the release alone at the dataset's δ, charged once to its budget "
        "as a dataset-level ledger entry. Absent on budgeted data: 30% of the budget's "
        "ε (docs/defaults.md, 'Standardisation'); ignored on public data (exact statistics, "
        "no charge).",
    )
    bounds: list[tuple[float, float]] | None = Field(
        default=None,
        max_length=100_000,
        description="Each feature's clipping bounds [low, high] (public metadata the owner "
        "declares). Absent: the declared schema's bounds, a built-in's documented ranges, or "
        "else DP bounds estimated from the data (a quarter of the release's rho).",
    )


@router.post(
    "/{dataset_id}/statistics",
    status_code=201,
    operation_id="release_dataset_statistics",
    responses=errors(403, 404, 409),
    response_model=DatasetStatistics,
)
def release_dataset_statistics(
    body: StatisticsRequest,
    dataset_id: Annotated[str, Path(max_length=64)],
    principal: CurrentPrincipal,
    db: DatabaseDep,
) -> DatasetStatistics:
    """Charge the dataset's DP standardisation statistics (owner keys), once.

    Each feature is clipped to its bounds; the means and variances of the clipped values
    are released by the Gaussian mechanism (docs/privacy.md, "Dataset statistics"). The
    charge is made now (409 ``budget-exceeded`` when the budget cannot pay, 409 when they
    were released before); the values are drawn by the first job that standardises
    (``preprocessing.standardize``) and reused by every later one at no further cost.
    """
    # No request session: the charge takes the budget lock in a writer transaction of its
    # own (on SQLite a second writer would wait on the request's).
    return release_statistics(
        db,
        tenant_id=principal.tenant_id,
        dataset_id=dataset_id,
        epsilon=body.epsilon,
        bounds=body.bounds,
        by=principal,
    )


@router.get(
    "/{dataset_id}/statistics",
    operation_id="get_dataset_statistics",
    responses=errors(404),
    response_model=DatasetStatistics,
)
def get_dataset_statistics(dataset: OwnedDataset) -> DatasetStatistics:
    """The dataset's standardisation statistics: DP releases, shown to every key of its
    tenant (``pending`` until the first job that uses them draws them)."""
    found = statistics_of(dataset)
    if found is None:
        raise NotFound("this dataset's statistics were never released")
    return found
