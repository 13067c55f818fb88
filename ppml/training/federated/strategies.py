"""Federated strategies: a template (sample → configure → train → aggregate) and its variants.

The simulation loop (``simulation.py``) is the one concrete loop; a strategy only fills
in the hooks. DP is a wrapper strategy around any of them, so every server optimiser
can run on a clipped and noised average (McMahan et al. 2018).
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from ppml.training.federated.aggregate import (
    AdamState,
    PartialSum,
    adam_server_step,
    add_gaussian_noise,
    add_weighted,
    apply_delta,
    clip_rows,
    mean_of,
)

__all__ = [
    "STRATEGIES",
    "ClientConfig",
    "DPFedAvgClientLevel",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "Strategy",
    "build_strategy",
]


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """What one client does in a round.

    Attributes:
        local_epochs: Passes over the client's shard.
        proximal_mu: Weight of the FedProx term ``mu/2 ||w - w_global||²`` (0: none).
    """

    local_epochs: int
    proximal_mu: float = 0.0


class Strategy(ABC):
    """Template for a federated strategy; the loop calls the hooks in this order.

    1. ``sample_clients``: who is asked to train this round.
    2. ``configure_round``: one ``ClientConfig`` per sampled client.
    3. (the loop trains the clients that did not drop out)
    4. ``aggregate``: new global parameters from the clients' deltas; the loop calls
       its two halves, ``accumulate`` per chunk of clients and ``finish`` once, so a
       round never holds every client's delta at once.
    """

    def __init__(
        self, *, clients_per_round: int, local_epochs: int, server_learning_rate: float = 1.0
    ) -> None:
        if clients_per_round < 1 or local_epochs < 1:
            raise ValueError("clients_per_round and local_epochs must be positive")
        if not server_learning_rate > 0:
            raise ValueError("server_learning_rate must be > 0")
        self.clients_per_round = clients_per_round
        self.local_epochs = local_epochs
        self.server_learning_rate = server_learning_rate

    def sample_clients(
        self, round_index: int, num_clients: int, rng: np.random.Generator
    ) -> npt.NDArray[np.int64]:
        """Draws exactly ``clients_per_round`` distinct clients, uniformly; sorted."""
        del round_index
        if self.clients_per_round > num_clients:
            raise ValueError("clients_per_round must not exceed num_clients")
        chosen = rng.choice(num_clients, size=self.clients_per_round, replace=False)
        return np.sort(chosen).astype(np.int64)

    def configure_round(
        self, round_index: int, sampled_clients: npt.NDArray[np.int64]
    ) -> list[ClientConfig]:
        """One config per sampled client (the same for all, here)."""
        del round_index
        config = ClientConfig(local_epochs=self.local_epochs, proximal_mu=self.proximal_mu)
        return [config] * len(sampled_clients)

    @property
    def proximal_mu(self) -> float:
        """Weight of the local proximal term; only FedProx sets one."""
        return 0.0

    def aggregate(
        self, global_params: torch.Tensor, client_updates: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """New global parameters from all the round's deltas at once.

        Args:
            global_params: Flat global parameters ``(P,)``.
            client_updates: Deltas ``w_k - w_global`` of the clients that reported ``(K, P)``.
            weights: Aggregation weight of each reporting client ``(K,)``.

        Returns:
            The new global parameters ``(P,)``.
        """
        return self.finish(global_params, self.accumulate(None, client_updates, weights))

    def accumulate(
        self, partial: PartialSum | None, client_updates: torch.Tensor, weights: torch.Tensor
    ) -> PartialSum:
        """Folds a chunk of deltas ``(k, P)`` with weights ``(k,)`` into the running sum."""
        return add_weighted(partial, client_updates, weights)

    def finish(self, global_params: torch.Tensor, partial: PartialSum | None) -> torch.Tensor:
        """Server step on the weighted mean delta; no client reported: unchanged."""
        if partial is None or partial.count == 0:
            return global_params
        return self.server_update(global_params, mean_of(partial))

    @abstractmethod
    def server_update(self, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        """Applies an averaged delta to the global parameters (the server optimiser)."""

    def server_state(self) -> dict[str, torch.Tensor]:
        """The server optimiser's state, for checkpoints (none for plain averaging)."""
        return {}

    def load_server_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restores what :meth:`server_state` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no server state")


class FedAvg(Strategy):
    """McMahan et al. 2017: ``w ← w + η · Σ n_k Δ_k / Σ n_k``."""

    def server_update(self, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        return apply_delta(global_params, mean_delta, self.server_learning_rate)


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg whose clients add ``mu/2 ||w - w_global||²`` to their loss."""

    def __init__(
        self,
        *,
        clients_per_round: int,
        local_epochs: int,
        mu: float,
        server_learning_rate: float = 1.0,
    ) -> None:
        super().__init__(
            clients_per_round=clients_per_round,
            local_epochs=local_epochs,
            server_learning_rate=server_learning_rate,
        )
        if not mu >= 0 or not math.isfinite(mu):
            raise ValueError("mu must be a finite number >= 0")
        self.mu = mu

    @property
    def proximal_mu(self) -> float:
        return self.mu


class FedAdam(Strategy):
    """Reddi et al. 2021: server-side Adam on the averaged delta."""

    def __init__(
        self,
        *,
        clients_per_round: int,
        local_epochs: int,
        server_learning_rate: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(
            clients_per_round=clients_per_round,
            local_epochs=local_epochs,
            server_learning_rate=server_learning_rate,
        )
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("need beta1, beta2 in [0, 1) and tau > 0")
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self._state: AdamState | None = None

    def server_update(self, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        state = self._state or AdamState.zeros_like(global_params)
        new_params, self._state = adam_server_step(
            global_params,
            mean_delta,
            state,
            learning_rate=self.server_learning_rate,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        return new_params

    def server_state(self) -> dict[str, torch.Tensor]:
        return {} if self._state is None else {"m": self._state.m, "v": self._state.v}

    def load_server_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = AdamState(state["m"], state["v"]) if state else None


class DPFedAvgClientLevel(Strategy):
    """Client-level DP around any strategy (DP-FedAvg, McMahan et al. 2018).

    Each round: Poisson-sample clients with ``q = expected_clients / num_clients``, clip
    every client's delta to L2 norm ``clip_norm``, sum, add ``N(0, (σ·C)²)`` per
    coordinate and divide by ``expected_clients`` (a fixed denominator, so one client's
    presence changes only the sum). The noised average goes to the inner strategy's
    server step. Aggregation weights are ignored: every client counts once. The noise
    is added every round, also when no client reported.

    Args:
        inner: The strategy whose ``configure_round`` and ``server_update`` are used.
        clip_norm: ``C > 0``.
        noise_multiplier: ``σ ≥ 0`` (0 only makes sense in tests).
        expected_clients: Expected clients per round, ``q · num_clients``.
        generator: Noise source; None draws a secret seed from the OS.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: float,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(inner, Strategy) or isinstance(inner, DPFedAvgClientLevel):
            raise TypeError("inner must be a non-private Strategy")
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError("clip_norm must be a finite number > 0")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError("noise_multiplier must be a finite number >= 0")
        if not (math.isfinite(expected_clients) and expected_clients > 0):
            raise ValueError("expected_clients must be a finite number > 0")
        super().__init__(
            clients_per_round=max(1, math.ceil(expected_clients)),
            local_epochs=inner.local_epochs,
            server_learning_rate=inner.server_learning_rate,
        )
        self.inner = inner
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_clients = expected_clients
        self.generator = generator or torch.Generator().manual_seed(secrets.randbits(63))

    def sample_rate(self, num_clients: int) -> float:
        """The Poisson rate ``q`` the accountant must be charged with."""
        q = self.expected_clients / num_clients
        if q > 1:
            raise ValueError("expected_clients must not exceed num_clients")
        return q

    def sample_clients(
        self, round_index: int, num_clients: int, rng: np.random.Generator
    ) -> npt.NDArray[np.int64]:
        """Poisson sampling: each client joins independently with probability ``q``."""
        del round_index
        q = self.sample_rate(num_clients)
        return np.flatnonzero(rng.random(num_clients) < q).astype(np.int64)

    def configure_round(
        self, round_index: int, sampled_clients: npt.NDArray[np.int64]
    ) -> list[ClientConfig]:
        return self.inner.configure_round(round_index, sampled_clients)

    def accumulate(
        self, partial: PartialSum | None, client_updates: torch.Tensor, weights: torch.Tensor
    ) -> PartialSum:
        # Every client counts once, whatever its weight: the sensitivity of the sum is C.
        ones = torch.ones_like(weights)
        return add_weighted(partial, clip_rows(client_updates, self.clip_norm), ones)

    def finish(self, global_params: torch.Tensor, partial: PartialSum | None) -> torch.Tensor:
        # The mechanism runs every round, also when no client reported.
        total = torch.zeros_like(global_params) if partial is None else partial.total
        std = self.noise_multiplier * self.clip_norm
        noised = add_gaussian_noise(total, std, self.generator) / self.expected_clients
        return self.inner.server_update(global_params, noised)

    def server_update(self, global_params: torch.Tensor, mean_delta: torch.Tensor) -> torch.Tensor:
        return self.inner.server_update(global_params, mean_delta)

    def server_state(self) -> dict[str, torch.Tensor]:
        # Not the noise generator: a resumed run draws fresh secret noise.
        return self.inner.server_state()

    def load_server_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_server_state(state)


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}


def build_strategy(
    name: str,
    *,
    clients_per_round: int,
    local_epochs: int,
    mu: float = 0.0,
    server_learning_rate: float = 1.0,
) -> Strategy:
    """Builds a non-private strategy from the registry.

    Args:
        name: ``"fedavg"``, ``"fedprox"`` or ``"fedadam"``.
        clients_per_round: Clients sampled per round (non-private sampling).
        local_epochs: Local passes per round.
        mu: FedProx proximal weight (ignored by the others).
        server_learning_rate: Server step size.

    Returns:
        A fresh strategy (FedAdam keeps its moments on it).
    """
    if name == "fedprox":
        return FedProx(
            clients_per_round=clients_per_round,
            local_epochs=local_epochs,
            mu=mu,
            server_learning_rate=server_learning_rate,
        )
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](
        clients_per_round=clients_per_round,
        local_epochs=local_epochs,
        server_learning_rate=server_learning_rate,
    )
