"""Pricing a synthesize job (DP synthetic data by MST): validate it against its dataset and
turn its target ε into the zCDP rho it may spend, charged as the curve α·rho (PRIVACY.md).

rho is the largest whose curve, on the ledger's grid and rounded up as the ledger charges it,
converts to at most the target ε at the job's δ (``ppml.privacy.zcdp.calibrate_zcdp``). Whatever the
job spends on preprocessing (bounds estimated under DP) comes out of that rho: see
:func:`budget_split`, which the worker uses too, so what runs is what was charged.

Synthetic data is a record-level mechanism: refused on client-unit budgets.
"""

from __future__ import annotations

from dataclasses import dataclass

from ppml.config import Settings
from ppml.db.models import Dataset
from ppml.errors import InvalidInput
from ppml.privacy import accounting as acc
from ppml.privacy.zcdp import calibrate_zcdp
from ppml.specs import JobSpec, SynthesizeSpec

__all__ = ["BOUNDS_SHARE", "DOCUMENTED_BOUNDS", "SynthesisPlan", "budget_split", "plan_synthesis"]

#: Share of rho spent on estimating bounds under DP, when some feature needs them.
BOUNDS_SHARE = 0.1
#: Built-ins whose documentation gives every feature's range (ppml.synthesis.table).
DOCUMENTED_BOUNDS = frozenset({"digits", "breast_cancer"})


@dataclass(frozen=True, kw_only=True)
class SynthesisPlan:
    event: acc.MechanismEvent
    epsilon: float
    delta: float
    compute: int


def features_of(spec: SynthesizeSpec, dataset: Dataset) -> list[int]:
    """The feature indices the job synthesizes, in order."""
    return list(spec.features) if spec.features is not None else list(range(dataset.num_features))


def dp_bounded(spec: SynthesizeSpec, dataset: Dataset) -> list[int]:
    """Features whose bounds are neither given nor documented: estimated under DP."""
    if dataset.source.get("builtin") in DOCUMENTED_BOUNDS:
        return []
    given = spec.bounds or {}
    return [j for j in features_of(spec, dataset) if j not in given]


def budget_split(spec: SynthesizeSpec, dataset: Dataset, rho: float) -> tuple[float, float]:
    """``(rho of the DP bounds, rho of MST)``: they add up to at most ``rho``."""
    if not dp_bounded(spec, dataset):
        return 0.0, rho
    return rho * BOUNDS_SHARE, rho * (1 - BOUNDS_SHARE)


def _check(spec: JobSpec, dataset: Dataset) -> SynthesizeSpec:
    synth = spec.synthesize
    assert synth is not None and spec.privacy is not None  # JobSpec's validator
    if dataset.privacy_unit == "client" and dataset.epsilon_total is not None:
        raise InvalidInput(
            "synthetic data protects single records, but this dataset's budget protects "
            "whole clients; it cannot be synthesized from",
            field="kind",
        )
    if spec.privacy.level != "sample":
        raise InvalidInput(
            "synthetic data protects records: use level 'sample'", field="privacy.level"
        )
    cap = dataset.delta_total
    if cap is not None and spec.privacy.delta is not None and spec.privacy.delta > cap:
        raise InvalidInput(
            f"delta may not exceed the dataset's delta ({cap:g})", field="privacy.delta"
        )
    wrong = [j for j in synth.features or [] if j >= dataset.num_features]
    wrong += [j for j in synth.bounds or {} if j >= dataset.num_features]
    if wrong:
        raise InvalidInput(
            f"feature {wrong[0]} does not exist: the dataset has {dataset.num_features} "
            "features (0-based)",
            field="synthesize.features"
            if synth.features and wrong[0] in synth.features
            else "synthesize.bounds",
        )
    return synth


def plan_synthesis(spec: JobSpec, dataset: Dataset, settings: Settings) -> SynthesisPlan:
    """The priced plan of a synthesize job (no writes)."""
    synth = _check(spec, dataset)
    assert spec.privacy is not None
    population = dataset.num_train + dataset.num_test
    delta = spec.privacy.delta or dataset.delta_total or min(1e-5, 0.1 / population)
    if delta >= 1 / population:
        raise InvalidInput(
            f"delta must be well below 1/n = {1 / population:.3g}", field="privacy.delta"
        )
    try:
        rho = calibrate_zcdp(target_epsilon=spec.privacy.target_epsilon, delta=delta)
    except ValueError as exc:
        raise InvalidInput(
            "no zCDP budget reaches this target_epsilon", field="privacy.target_epsilon"
        ) from exc
    event = acc.MechanismEvent(
        sample_rate=1.0, noise_multiplier=0.0, steps=0, zcdp_rho=rho, mechanism="mst"
    )
    columns = len(features_of(synth, dataset)) + 1
    rows = synth.rows or dataset.num_train
    # Work of the marginals and the model: records × column pairs × cells of a pair.
    compute = (dataset.num_train + rows) * columns * columns * synth.bins**2
    limit = min(settings.limits.max_job_compute, settings.limits.max_tenant_compute)
    if compute > limit:
        raise InvalidInput(
            f"the synthetic table's estimated work is {compute:.3g}; this server allows "
            f"{limit:.3g} per job (fewer rows, features or bins)",
            field="synthesize.rows",
            compute=compute,
            limit=limit,
        )
    return SynthesisPlan(
        event=event,
        epsilon=acc.epsilon(acc.rdp_curve(event), delta),
        delta=delta,
        compute=compute,
    )
