"""Partitioners: split the training rows into federated clients (pure numpy).

Every partitioner returns one sorted int64 index array per client; together they are
disjoint and cover every row exactly once.

``iid`` and ``dirichlet`` place each record by its own key (a keyed hash of the record
under the dataset's secret, computed by the caller with ``ppml.datasets.keys``), so a
record's client is a function of that record and secret randomness alone: adding,
removing or relabelling one record moves no other (PRIVACY.md, "Every release is a
mechanism"; parallel composition of sample-level DP across clients needs it). The price
is that a simulated client may be empty: nothing refills it from other records.
``column`` uses the data's natural clients, which are never empty.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ppml.datasets.keys import uniform

__all__ = ["KEYED", "PARTITIONERS", "class_proportions", "column", "dirichlet", "iid", "partition"]

PARTITIONERS = ("iid", "dirichlet", "column")
KEYED = frozenset({"iid", "dirichlet"})

IndexArrays = list[npt.NDArray[np.int64]]


def _check_counts(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError("num_clients must be positive")
    if num_clients > n:
        raise ValueError("num_clients must not exceed the number of training rows")


def _groups(owner: npt.NDArray[np.int64], num_clients: int) -> IndexArrays:
    """Index arrays of the rows owned by each client (a stable sort keeps them sorted)."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    counts = np.bincount(owner, minlength=num_clients)
    return list(np.split(order, np.cumsum(counts)[:-1]))


def _uniforms(keys: npt.ArrayLike) -> npt.NDArray[np.float64]:
    k = np.asarray(keys)
    if k.ndim != 1 or k.dtype != np.uint64:
        raise ValueError("keys must be a one-dimensional uint64 array, one per row")
    return uniform(k)


def iid(keys: npt.ArrayLike, num_clients: int) -> IndexArrays:
    """Each record goes to client ``floor(u · num_clients)``, ``u`` uniform from its key.

    Client sizes are Binomial(n, 1/num_clients): balanced in expectation, and a client
    may be empty.

    Args:
        keys: One uint64 key per training row (``record_keys(secret, "iid:<seed>", ...)``).
        num_clients: Number of clients, ``1..n``.

    Returns:
        One sorted index array per client.
    """
    u = _uniforms(keys)
    _check_counts(len(u), num_clients)
    owner = np.minimum((u * num_clients).astype(np.int64), num_clients - 1)
    return _groups(owner, num_clients)


def _class_proportions(rng: np.random.Generator, num_clients: int, alpha: float) -> np.ndarray:
    p = rng.dirichlet(np.full(num_clients, alpha))
    if not np.isfinite(p).all() or p.sum() <= 0:
        # Tiny alphas can underflow to all zeros: the limit is "one client takes all".
        p = np.zeros(num_clients)
        p[rng.integers(num_clients)] = 1.0
    return p


def class_proportions(seed: int, label: int, num_clients: int, alpha: float) -> np.ndarray:
    """Class ``label``'s proportions over the clients, ~ Dir(alpha), from ``(seed, label)``
    alone: neither the data nor the other classes change them."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(label,)))
    return _class_proportions(rng, num_clients, alpha)


def dirichlet(
    labels: npt.ArrayLike, keys: npt.ArrayLike, num_clients: int, alpha: float, seed: int
) -> IndexArrays:
    """Label skew: class ``c`` is spread over the clients in proportions ``p_c ~ Dir(alpha)``.

    A record of class ``c`` goes to the client whose interval of ``cumsum(p_c)`` holds
    ``u``, the uniform from its own key, so client ``j`` receives each record of class
    ``c`` with probability ``p_c[j]``. Small ``alpha`` (0.1) gives clients that see few
    classes; large ``alpha`` (100) approaches iid. Clients may be empty.

    Args:
        labels: Class index of each training row, shape ``(n,)``.
        keys: One uint64 key per training row (``record_keys(secret, "dirichlet:<seed>",
            ...)``).
        num_clients: Number of clients, ``1..n``.
        alpha: Dirichlet concentration, > 0.
        seed: Seeds the proportions (never the data); the worker derives it from the
            dataset's secret and the job's seed.

    Returns:
        One sorted index array per client.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    u = _uniforms(keys)
    if u.shape != y.shape:
        raise ValueError("labels and keys must have one entry per row")
    _check_counts(len(y), num_clients)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError("alpha must be a positive number")
    owner = np.empty(len(y), dtype=np.int64)
    for cls in np.unique(y).tolist():
        rows = np.flatnonzero(y == cls)
        edges = np.cumsum(class_proportions(seed, int(cls), num_clients, alpha))
        picked = np.searchsorted(edges, u[rows], side="right")
        owner[rows] = np.minimum(picked, num_clients - 1)  # rounding: cumsum may end below 1
    return _groups(owner, num_clients)


def column(clients_train: npt.ArrayLike) -> IndexArrays:
    """Natural clients from a client column: one client per distinct id, in id order.

    Args:
        clients_train: Client id of each training row, non-negative integers.

    Returns:
        One sorted index array per distinct id.
    """
    ids = np.asarray(clients_train)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError("clients_train must be a non-empty one-dimensional integer array")
    if ids.min() < 0:
        raise ValueError("clients_train holds a negative client index")
    distinct, owner = np.unique(ids, return_inverse=True)
    return _groups(owner.astype(np.int64).reshape(-1), len(distinct))


def partition(
    scheme: str,
    *,
    labels: npt.ArrayLike,
    num_clients: int,
    alpha: float,
    seed: int,
    clients_train: npt.ArrayLike | None = None,
    keys: npt.ArrayLike | None = None,
) -> IndexArrays:
    """Dispatches to a partitioner by name.

    Args:
        scheme: ``"iid"``, ``"dirichlet"`` or ``"column"``.
        labels: Class index of each training row.
        num_clients: Number of clients; for ``"column"`` it must equal the number of ids.
        alpha: Dirichlet concentration (``"dirichlet"`` only).
        seed: Seeds the Dirichlet proportions (``"dirichlet"`` only).
        clients_train: Client id per training row (``"column"`` only).
        keys: One uint64 key per training row (``"iid"`` and ``"dirichlet"``).

    Returns:
        One sorted index array per client (``"column"``: each non-empty).
    """
    if scheme in KEYED and keys is None:
        raise ValueError(f"the {scheme} partition needs one key per training row")
    if scheme == "iid":
        assert keys is not None
        return iid(keys, num_clients)
    if scheme == "dirichlet":
        assert keys is not None
        return dirichlet(labels, keys, num_clients, alpha, seed)
    if scheme == "column":
        if clients_train is None:
            raise ValueError("the column partition needs a dataset with a client column")
        parts = column(clients_train)
        if len(parts) != num_clients:
            raise ValueError(
                f"num_clients is {num_clients} but the client column holds {len(parts)} clients"
            )
        return parts
    raise ValueError(f"unknown partition scheme {scheme!r}; known: {', '.join(PARTITIONERS)}")
