"""The Gaussian noisy argmax (GNMax) of PATE's teacher votes, and its data-independent cost.

Each of k teachers, trained on its own partition of the records, votes for one class; the
answer is ``argmax_c (n_c + N(0, sigma²))`` over the vote counts ``n_c``. Adding or removing
one record changes one partition, so at most one teacher's vote: the count vector moves by
at most √2 in L2 norm (−1 on one class, +1 on another). The Gaussian mechanism on it is then
``(α, α·2/(2·sigma²)) = (α, α/sigma²)``-RDP at every order α (Mironov 2017, Prop. 7;
Papernot et al. 2018, Prop. 8), i.e. rho-zCDP with ``rho = 1/sigma²``, and the argmax is
post-processing. n answers compose to ``rho = n/sigma²`` (docs/privacy.md, "PATE"). The
proof is on the ledger's add/remove neighbours; the teachers' training randomness is
independent of the data.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import numpy.typing as npt

from ppml.privacy import accounting as acc
from ppml.privacy.zcdp import calibrate_zcdp

__all__ = [
    "MECHANISM",
    "gnmax_event",
    "gnmax_rho",
    "noisy_argmax",
    "sigma_for",
    "vote_counts",
]

MECHANISM = "gnmax"


def gnmax_rho(queries: int, sigma: float) -> float:
    """zCDP rho of ``queries`` GNMax answers at ``sigma``: ``queries / sigma²``, rounded up
    (never below the exact value: the ledger rounds charges up)."""
    if queries < 0 or not sigma > 0:
        raise ValueError("queries must be non-negative and sigma positive")
    if queries == 0:
        return 0.0
    return math.nextafter(queries / (sigma * sigma), math.inf)


def gnmax_event(queries: int, sigma: float) -> acc.MechanismEvent:
    """The ledger's mechanism event of ``queries`` answers (a zCDP mechanism, no steps)."""
    return acc.MechanismEvent(
        sample_rate=1.0,
        noise_multiplier=sigma,
        steps=0,
        zcdp_rho=gnmax_rho(queries, sigma),
        mechanism=MECHANISM,
    )


def sigma_for(*, query_epsilon: float, delta: float) -> float:
    """The smallest sigma whose one-answer curve (rounded as the ledger charges it) converts
    to at most ``query_epsilon`` at ``delta``.

    Raises:
        ValueError: when no sigma reaches the target.
    """
    rho = calibrate_zcdp(target_epsilon=query_epsilon, delta=delta)
    sigma = 1 / math.sqrt(rho)
    # 1/sqrt(rho) may round so that 1/sigma² exceeds rho by an ulp: nudge sigma up.
    while gnmax_rho(1, sigma) > rho:
        sigma = math.nextafter(sigma, math.inf)
    return sigma


def vote_counts(logits: npt.NDArray[np.floating], num_classes: int) -> npt.NDArray[np.int64]:
    """Each query's vote counts ``(n, K)`` from the teachers' logits ``(n, k, K)``: a teacher
    votes for its argmax (the lowest class on ties), exactly one vote each."""
    if logits.ndim != 3 or logits.shape[2] != num_classes:
        raise ValueError("logits must be (queries, teachers, classes)")
    votes = logits.argmax(axis=2)
    counts = np.zeros((logits.shape[0], num_classes), dtype=np.int64)
    for c in range(num_classes):
        counts[:, c] = (votes == c).sum(axis=1)
    return counts


def noisy_argmax(
    counts: npt.NDArray[np.int64], sigma: float, rng: np.random.Generator | None = None
) -> npt.NDArray[np.int64]:
    """GNMax: ``argmax_c (counts_c + N(0, sigma²))`` of each row.

    ``rng`` is for tests only: by default the noise comes from a generator seeded by the
    operating system, since anyone who knows the seed can remove the noise.
    """
    generator = rng or np.random.default_rng(secrets.randbits(128))
    noisy = counts.astype(np.float64) + generator.normal(0.0, sigma, size=counts.shape)
    answer: npt.NDArray[np.int64] = noisy.argmax(axis=1).astype(np.int64)
    return answer
