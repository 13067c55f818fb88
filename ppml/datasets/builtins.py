"""Built-in datasets: digits and breast_cancer from scikit-learn, mnist1d generated and cached."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np

from ppml.datasets.arrays import DatasetArrays, load_arrays, save_arrays
from ppml.datasets.keys import new_secret
from ppml.datasets.split import check_seed, split
from ppml.errors import InvalidInput, MalformedFile
from ppml.storage import ArtifactStore

BUILTINS: tuple[str, ...] = ("digits", "breast_cancer", "mnist1d")

# The fixed label sets the built-ins declare (class index = position, as in scikit-learn).
BUILTIN_CLASSES: dict[str, tuple[str, ...]] = {
    "digits": tuple(str(i) for i in range(10)),
    "breast_cancer": ("malignant", "benign"),
    "mnist1d": tuple(str(i) for i in range(10)),
}

# The input shapes the built-ins declare: digits are 8x8 grey images, mnist1d rows are
# signals of length 40 on one channel (public metadata, fixed by each generator's
# description of the data, not read from it; ppml.defaults chooses models by them).
BUILTIN_INPUT_SHAPES: dict[str, tuple[int, ...]] = {"digits": (1, 8, 8), "mnist1d": (1, 40)}

_BUILTIN_TEST_FRACTION = 0.2
_MNIST1D_SAMPLES = 10_000
_MNIST1D_CACHE = "cache/mnist1d-v1-seed{seed}.npz"


def load_builtin(
    name: str,
    *,
    seed: int = 0,
    cache: ArtifactStore | None = None,
    secret: str | None = None,
    unit: str = "record",
) -> DatasetArrays:
    """Load a built-in dataset, split into train and test.

    ``digits`` and ``breast_cancer`` come bundled with scikit-learn; ``mnist1d`` is
    generated locally (10,000 samples, pooled) from ``seed``. Every one is split by the
    keyed hash of each record (see ``split``): about 20% held out, each record by itself.
    Only fixed, data-independent transforms are applied: digits are divided by 16 (their
    known pixel range), breast-cancer features go through ``log1p`` (all are
    non-negative), mnist1d is used as generated. The classes are the fixed declared sets
    of :data:`BUILTIN_CLASSES`.

    Args:
        name: one of :data:`BUILTINS`.
        seed: seed of the mnist1d generator, in ``0..2**32-1``.
        cache: the store that caches generated mnist1d arrays (under ``cache/``); None
            disables the cache.
        secret: the dataset's split secret (hex); None draws a fresh one, so the split
            cannot be reproduced (the service always passes the stored secret).
        unit: the privacy unit (built-ins have no clients: every unit is a record).

    Returns:
        The split dataset.

    Raises:
        InvalidInput: unknown name (``field="source.builtin"``) or bad seed.
    """
    if name not in BUILTINS:
        raise InvalidInput(
            f"unknown built-in dataset; choose one of {', '.join(BUILTINS)}",
            field="source.builtin",
        )
    check_seed(seed)
    if name == "mnist1d":
        generated = _load_mnist1d(seed, cache)
        x = np.concatenate([generated.x_train, generated.x_test])
        y = np.concatenate([generated.y_train, generated.y_test])
        names = generated.feature_names
    else:
        x, y, names = _load_sklearn(name)
    return split(
        x,
        y,
        None,
        BUILTIN_CLASSES[name],
        names,
        secret=secret if secret is not None else new_secret(),
        test_fraction=_BUILTIN_TEST_FRACTION,
        unit=unit,
    )


def _load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn import datasets as skd

    if name == "digits":
        bunch = skd.load_digits()
        x = bunch.data / 16.0
    else:
        bunch = skd.load_breast_cancer()
        x = np.log1p(bunch.data)
    if tuple(str(c) for c in bunch.target_names) != BUILTIN_CLASSES[name]:
        raise RuntimeError(f"scikit-learn's {name} classes differ from the declared ones")
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y, tuple(str(f) for f in bunch.feature_names)


def _load_mnist1d(seed: int, cache: ArtifactStore | None) -> DatasetArrays:
    key = _MNIST1D_CACHE.format(seed=seed)
    if cache is not None and cache.exists(key):
        # A damaged cache is regenerated.
        with contextlib.suppress(MalformedFile), cache.open_plain(key) as path:
            return load_arrays(path)
    arrays = _generate_mnist1d(seed)
    if cache is not None:
        cache.write(key, lambda path: save_arrays(arrays, path))
    return arrays


def _generate_mnist1d(seed: int) -> DatasetArrays:
    # Imported here: it pulls matplotlib and costs seconds at import.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = _MNIST1D_SAMPLES
    args.seed = seed
    with _global_rng_preserved():  # make_dataset reseeds the global generators
        data = make_dataset(args)
    x_train = np.ascontiguousarray(data["x"], dtype=np.float32)
    return DatasetArrays(
        x_train=x_train,
        y_train=np.asarray(data["y"], dtype=np.int64),
        x_test=np.ascontiguousarray(data["x_test"], dtype=np.float32),
        y_test=np.asarray(data["y_test"], dtype=np.int64),
        classes=tuple(str(i) for i in range(10)),
        feature_names=tuple(f"x{j}" for j in range(x_train.shape[1])),
    )


@contextlib.contextmanager
def _global_rng_preserved() -> Iterator[None]:
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
