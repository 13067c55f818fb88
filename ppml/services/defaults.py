"""A submitted spec with its left-out model and training chosen (ppml.defaults).

Only the dataset's registered, public facts reach the rule: its training-row count, feature
count, declared input shape, class count, privacy unit and whether its standardisation
statistics were released, with the spec's ε, δ and kind.
The rows themselves are never read here (the API process does not load them).
"""

from __future__ import annotations

from ppml.config import Limits
from ppml.db.models import Dataset
from ppml.defaults import PublicMetadata, fill
from ppml.specs import JobSpec

__all__ = ["public_metadata", "with_defaults"]


def public_metadata(spec: JobSpec, dataset: Dataset) -> PublicMetadata:
    """The public metadata the defaults of ``spec`` on ``dataset`` may depend on."""
    privacy = spec.privacy
    return PublicMetadata(
        num_train=dataset.num_train,
        num_features=dataset.num_features,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        epsilon=None if privacy is None else privacy.target_epsilon,
        delta=(privacy.delta if privacy is not None else None) or dataset.delta_total,
        unit=dataset.privacy_unit,
        kind=spec.kind,
        federated=spec.federated is not None,
        # Released by the owner (a DP release or public bounds): public from then on.
        standardised=dataset.statistics is not None,
    )


def with_defaults(spec: JobSpec, dataset: Dataset, limits: Limits) -> JobSpec:
    """``spec`` with the model and training it left out chosen for ``dataset``; chosen
    epochs are cut to the server's limits (``max_epochs``, ``max_sample_epochs``), so a job
    that names nothing is never refused for what ppml chose."""
    filled = fill(spec, public_metadata(spec, dataset))
    if "training" not in filled.defaults_applied or filled.federated is not None:
        return filled
    cap = min(limits.max_epochs, limits.max_sample_epochs // max(1, dataset.num_train))
    if filled.training.epochs <= cap:
        return filled
    training = filled.training.model_copy(update={"epochs": max(1, cap)})
    return filled.model_copy(update={"training": training})
