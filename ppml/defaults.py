"""The model and training ppml chooses when a job spec leaves them out.

The choice is a pure function of public metadata (:class:`PublicMetadata`): the number of
training rows, the feature count and declared input shape, the number of classes, the job's
ε and δ, its privacy unit and kind. It never sees a row: looking at the private data to
choose would itself be a release (docs/privacy.md). The service builds the metadata from
the dataset's registered counts and schema and the spec (``ppml.services.defaults``).

The rules come from a study on public proxy data, never on the built-ins the service ships
(``bench/defaults_study.py``; its table is in docs/defaults.md):

* data that declares a 3-D input shape ``[C, H, W]`` (images) gets ``cnn2d`` (two 3x3
  conv blocks of 16 and 32 channels), batch 256, learning rate 0.5;
* data that declares a 1-D or ``[1, L]`` shape (signals of length ≥ 16) gets ``cnn1d`` with
  three blocks of 32 channels, batches of 1,024 and learning rate 0.4;
* anything else (tabular) gets a logistic regression on batches of a quarter of the rows,
  learning rate 0.5 (1.0 when the features are standardised, a hook for DP standardisation);

always SGD with momentum 0.9 (it won on every proxy), and more epochs the larger ε is
relative to the noise. Non-private jobs keep the architecture and take smaller batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ppml.specs import JobSpec, ModelSpec, TrainingSpec

__all__ = ["CHOOSABLE", "Choice", "PublicMetadata", "choose", "fill", "omitted"]

#: The spec fields ppml may choose.
CHOOSABLE: tuple[Literal["model", "training"], ...] = ("model", "training")

_MOMENTUM = 0.9


@dataclass(frozen=True, kw_only=True)
class PublicMetadata:
    """What the defaults may depend on: public facts of the dataset and the job.

    Attributes:
        num_train: Training rows (the dataset's registered count).
        num_features: Values per row.
        num_classes: Declared classes.
        input_shape: The declared shape of a row, or None.
        epsilon: The job's target ε; None for a non-private job.
        delta: The job's δ, or None.
        unit: The privacy unit (``"record"`` or ``"client"``).
        kind: The job's kind (only ``"train"`` is chosen for).
        federated: Whether the job is a federated simulation.
        standardised: Whether DP-standardised features are available for the dataset
            (published once, charged to the dataset); the tabular rule then uses a larger
            step. Always False until DP standardisation exists.
    """

    num_train: int
    num_features: int
    num_classes: int
    input_shape: tuple[int, ...] | None
    epsilon: float | None
    delta: float | None
    unit: str = "record"
    kind: str = "train"
    federated: bool = False
    standardised: bool = False


@dataclass(frozen=True)
class Choice:
    """A chosen model and training."""

    model: ModelSpec
    training: TrainingSpec


def _data_kind(meta: PublicMetadata) -> str:
    shape = meta.input_shape
    if shape is not None and len(shape) == 3:
        return "image"
    one_channel = shape is not None and (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1))
    if shape is not None and one_channel and shape[-1] >= 16:
        return "signal"
    return "tabular"


def _batch(meta: PublicMetadata, wanted: int) -> int:
    # Never more than a quarter of the rows (so an epoch is at least 4 noisy steps), never
    # more than the rows (pricing's limit).
    return max(1, min(wanted, meta.num_train // 4 or 1, meta.num_train))


def _epochs(meta: PublicMetadata, low: int, high: int) -> int:
    # More steps pay off once the noise per step is small enough: ε ≥ 3 takes ``high``.
    if meta.epsilon is None or meta.epsilon >= 3:
        return high
    return low


def choose(meta: PublicMetadata) -> Choice:
    """The model and training for a job on data described by ``meta`` (a pure function).

    Raises:
        ValueError: for a kind other than ``"train"`` (pate teachers are named by hand).
    """
    if meta.kind != "train":
        raise ValueError(f"ppml chooses no model for kind {meta.kind!r}")
    kind = _data_kind(meta)
    private = meta.epsilon is not None
    if kind == "image":
        model = ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=3)
        batch, lr, epochs = 256 if private else 64, 0.5 if private else 0.1, _epochs(meta, 30, 30)
    elif kind == "signal":
        model = ModelSpec(arch="cnn1d", channels=[32, 32, 32], kernel_size=5)
        batch, lr, epochs = 1024 if private else 128, 0.4 if private else 0.1, _epochs(meta, 40, 40)
    else:
        model = ModelSpec(arch="logreg")
        lr = 1.0 if meta.standardised else 0.5
        batch, epochs = meta.num_train // 4 if private else 64, _epochs(meta, 30, 30)
        lr = lr if private else 0.1
    if meta.federated:
        # Local training of each client's rows in a round: small batches, one pass.
        batch, lr, epochs = 32, 0.1, 1
    training = TrainingSpec(
        epochs=epochs,
        batch_size=_batch(meta, batch),
        learning_rate=lr,
        optimizer="sgd",
        momentum=_MOMENTUM,
    )
    return Choice(model=model, training=training)


def omitted(spec: JobSpec) -> list[Literal["model", "training"]]:
    """The choosable fields a submitted train job left out (none for other kinds)."""
    if spec.kind != "train":
        return []
    return [name for name in CHOOSABLE if name not in spec.model_fields_set]


def fill(spec: JobSpec, meta: PublicMetadata) -> JobSpec:
    """``spec`` with the fields it left out chosen from ``meta``, listed in
    ``defaults_applied`` (an empty list when the spec named them all)."""
    missing = omitted(spec)
    update: dict[str, object] = {"defaults_applied": missing}
    if missing:
        choice = choose(meta)
        if "model" in missing:
            update["model"] = choice.model
        if "training" in missing:
            update["training"] = choice.training
    filled = spec.model_copy(update=update)
    # model_copy keeps the fields-set of the original: mark the chosen ones as set.
    filled.model_fields_set.update(update)
    return filled
