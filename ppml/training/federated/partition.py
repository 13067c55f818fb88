"""Partitioners: split the training rows into federated clients (pure numpy, seeded).

Every partitioner returns one sorted int64 index array per client; together they are
disjoint and cover every row exactly once, and no client is empty.
"""

from __future__ import annotations

import heapq

import numpy as np
import numpy.typing as npt

__all__ = ["PARTITIONERS", "column", "dirichlet", "iid", "partition"]

PARTITIONERS = ("iid", "dirichlet", "column")

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


def iid(n: int, num_clients: int, seed: int) -> IndexArrays:
    """Shuffles the rows and deals them out; client sizes differ by at most one.

    Args:
        n: Number of training rows.
        num_clients: Number of clients, ``1..n``.
        seed: Seeds the shuffle.

    Returns:
        One sorted index array per client.
    """
    _check_counts(n, num_clients)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def _class_proportions(rng: np.random.Generator, num_clients: int, alpha: float) -> np.ndarray:
    p = rng.dirichlet(np.full(num_clients, alpha))
    if not np.isfinite(p).all() or p.sum() <= 0:
        # Tiny alphas can underflow to all zeros: the limit is "one client takes all".
        p = np.zeros(num_clients)
        p[rng.integers(num_clients)] = 1.0
    return p


def _fill_empty(owner: npt.NDArray[np.int64], num_clients: int, rng: np.random.Generator) -> None:
    """Gives every empty client one row, taken from the currently largest client."""
    counts = np.bincount(owner, minlength=num_clients)
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return
    # Rows grouped by owner, in random order within each group, so a donor gives away
    # random rows by popping from the end of its group.
    perm = rng.permutation(len(owner))
    order = perm[np.argsort(owner[perm], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    heap = [(-int(c), int(j)) for j, c in enumerate(counts) if c > 1]
    heapq.heapify(heap)
    for receiver in empty:
        neg_count, donor = heapq.heappop(heap)
        count = -neg_count
        owner[order[starts[donor] + count - 1]] = receiver
        if count - 1 > 1:
            heapq.heappush(heap, (-(count - 1), donor))


def dirichlet(labels: npt.ArrayLike, num_clients: int, alpha: float, seed: int) -> IndexArrays:
    """Label skew: each class is split over the clients in proportions ~ Dir(alpha).

    Small ``alpha`` (0.1) gives clients that see few classes; large ``alpha`` (100)
    approaches an iid split. A client left without rows then takes one row from the
    currently largest client, which is the smallest change that makes every client
    non-empty.

    Args:
        labels: Class index of each training row, shape ``(n,)``.
        num_clients: Number of clients, ``1..n``.
        alpha: Dirichlet concentration, > 0.
        seed: Seeds the proportions and the shuffles.

    Returns:
        One sorted, non-empty index array per client.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError("labels must be one-dimensional")
    _check_counts(len(y), num_clients)
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError("alpha must be a positive number")
    rng = np.random.default_rng(seed)
    owner = np.empty(len(y), dtype=np.int64)
    for cls in np.unique(y):
        rows = np.flatnonzero(y == cls)
        rng.shuffle(rows)
        cuts = np.round(np.cumsum(_class_proportions(rng, num_clients, alpha)) * len(rows))
        cuts = np.minimum(cuts[:-1].astype(np.int64), len(rows))
        for client, part in enumerate(np.split(rows, cuts)):
            owner[part] = client
    _fill_empty(owner, num_clients, rng)
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
) -> IndexArrays:
    """Dispatches to a partitioner by name.

    Args:
        scheme: ``"iid"``, ``"dirichlet"`` or ``"column"``.
        labels: Class index of each training row.
        num_clients: Number of clients; for ``"column"`` it must equal the number of ids.
        alpha: Dirichlet concentration (``"dirichlet"`` only).
        seed: Seeds the split (``"iid"`` and ``"dirichlet"``).
        clients_train: Client id per training row (``"column"`` only).

    Returns:
        One sorted, non-empty index array per client.
    """
    if scheme == "iid":
        return iid(len(np.asarray(labels)), num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
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
