"""The model and training ppml chooses when a job spec leaves them out.

The choice is a pure function of public metadata (:class:`PublicMetadata`): the number of
training rows, the feature count and declared input shape, the number of classes, the job's
ε and δ, its privacy unit and kind. It never sees a row: looking at the private data to
choose would itself be a release (docs/privacy.md). The service builds the metadata from
the dataset's registered counts and schema and the spec (``ppml.services.defaults``).

The rules come from a study on public proxy data, never on the built-ins the service ships
(``bench/defaults_study.py``; its tables are in docs/defaults.md). Rows are the training rows
n; "signals" are data that declare a 1-D or ``[1, L]`` input shape with L ≥ 16, "images" a
3-D one, anything else is tabular:

=========  ==============================  ==============================  ==============
data       DP, small ε                     DP, large ε                     non-private
=========  ==============================  ==============================  ==============
signal     ε < 3: cnn1d [32,32,32],        ε ≥ 3: the same, 40 epochs      cnn1d, b 64,
           b 512, lr 0.2                                                   lr 0.02
image      ε < 3: logreg, b 256, lr 0.5    ε ≥ 3: cnn2d [16,32] 5 × 5,     cnn2d [16,32]
                                           b 256, EMA 0.95, lr 0.1         3 × 3, b 64,
                                           (ε < 8), lr 0.15 (ε ≥ 8)        lr 0.02
tabular    every ε: logreg, b n/8, lr 0.1, EMA 0.9                         logreg, b 256,
                                                                           lr 0.1
=========  ==============================  ==============================  ==============

always SGD with momentum 0.9, 30 epochs unless stated, batches at most n/4; "EMA 0.95": the
model is the moving average of the weights (``TrainingSpec.ema_decay``, post-processing).
Federated jobs get the same model and local batches of 32 at lr 0.1, no average (not
studied). The
``standardised`` flag of the metadata says the dataset's owner released DP standardisation
statistics (charged once to the dataset, docs/privacy.md, "Dataset statistics"): a private
tabular job that leaves ``preprocessing`` out then standardises its features with them, at no
further cost. On the proxies of ``bench/standardize.py`` (wine, ``make_classification``)
standardising never lost to raw features at the same total ε; the model and steps above are
kept as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ppml.specs import JobSpec, ModelSpec, PreprocessingSpec, TrainingSpec

__all__ = [
    "CHOOSABLE",
    "STATISTICS_SHARE",
    "Choice",
    "PublicMetadata",
    "choose",
    "fill",
    "omitted",
    "statistics_epsilon",
]

#: The spec fields ppml may choose.
CHOOSABLE: tuple[Literal["model", "training"], ...] = ("model", "training")

_MOMENTUM = 0.9
#: Decay of the weights' moving average of a private image job at ε ≥ 3, of a private table.
_IMAGE_EMA, _TABLE_EMA = 0.95, 0.9

_CONV: dict[str, ModelSpec] = {
    "signal": ModelSpec(arch="cnn1d", channels=[32, 32, 32], kernel_size=5),
    "image": ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=3),
}
#: The private image CNN at ε ≥ 3: 5 × 5 kernels beat 3 × 3 on both image proxies at ε = 3,
#: 5 and 8 (bench/defaults_study.py --part kernels); without privacy 3 × 3 was studied.
_PRIVATE_IMAGE_CNN = ModelSpec(arch="cnn2d", channels=[16, 32], kernel_size=5)


#: The share of a dataset's ε that its DP standardisation statistics take when the owner
#: names none (``bench/standardize.py --defaults``; docs/defaults.md, "Standardisation").
STATISTICS_SHARE = 0.3


def statistics_epsilon(epsilon_total: float) -> float:
    """The ε of a dataset's standardisation statistics when its owner names none: a fixed
    share of the dataset's total ε (public: the budget), rounded down to 1e-3."""
    return max(1e-3, int(STATISTICS_SHARE * epsilon_total * 1000) / 1000)


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
        standardised: Whether the dataset's DP standardisation statistics were released
            (once, charged to the dataset); a private tabular job then standardises.
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


def choose(meta: PublicMetadata) -> Choice:
    """The model and training for a job on data described by ``meta`` (a pure function).

    Raises:
        ValueError: for a kind other than ``"train"`` (pate teachers are named by hand).
    """
    if meta.kind != "train":
        raise ValueError(f"ppml chooses no model for kind {meta.kind!r}")
    kind, eps, n = _data_kind(meta), meta.epsilon, meta.num_train
    model: ModelSpec
    ema = 0.0
    if eps is None:  # non-private: the best architecture of the kind, small steps
        if kind == "tabular":
            model, batch, lr = ModelSpec(arch="logreg"), min(256, n // 4), 0.1
        else:
            model, batch, lr = _CONV[kind], 64, 0.02
        epochs = 30
    elif kind == "signal":
        model, batch, lr, epochs = _CONV["signal"], 512, 0.2, 30 if eps < 3 else 40
    elif kind == "image":
        # From ε = 3 the small CNN with the weights' moving average (post-processing, free)
        # at small steps beats a linear model and an MLP on both image proxies; larger
        # steps pay only from ε = 8 (bench/defaults_study.py --part learning-rates), and
        # 5 x 5 kernels beat 3 x 3 at every ε from 3 (--part kernels).
        if eps >= 3:
            lr = 0.15 if eps >= 8 else 0.1
            model, batch, epochs, ema = _PRIVATE_IMAGE_CNN, 256, 30, _IMAGE_EMA
        else:
            model, batch, lr, epochs = ModelSpec(arch="logreg"), 256, 0.5, 30
    else:
        # Small batches and steps with the weights' average won or tied at every ε.
        model, batch, lr, epochs, ema = ModelSpec(arch="logreg"), n // 8, 0.1, 30, _TABLE_EMA
    if meta.federated:
        # Local training of each client's rows in a round: small batches, one pass.
        batch, lr, epochs, ema = 32, 0.1, 1, 0.0
    training = TrainingSpec(
        epochs=epochs,
        batch_size=_batch(meta, batch),
        learning_rate=lr,
        optimizer="sgd",
        momentum=_MOMENTUM,
        ema_decay=ema,
    )
    return Choice(model=model, training=training)


def omitted(spec: JobSpec) -> list[Literal["model", "training"]]:
    """The choosable fields a submitted train job left out (none for other kinds)."""
    if spec.kind != "train":
        return []
    return [name for name in CHOOSABLE if name not in spec.model_fields_set]


def _standardises(spec: JobSpec, meta: PublicMetadata) -> bool:
    """Whether a job that left ``preprocessing`` out standardises by default: a private,
    centralised, tabular train job on a dataset whose statistics were released."""
    return (
        spec.kind == "train"
        and "preprocessing" not in spec.model_fields_set
        and meta.standardised
        and meta.epsilon is not None
        and not meta.federated
        and _data_kind(meta) == "tabular"
    )


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
    if _standardises(spec, meta):
        update["preprocessing"] = PreprocessingSpec(standardize=True)
        update["defaults_applied"] = [*missing, "preprocessing"]
    filled = spec.model_copy(update=update)
    # model_copy keeps the fields-set of the original: mark the chosen ones as set.
    filled.model_fields_set.update(update)
    return filled
