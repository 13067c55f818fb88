"""Local training of the sampled clients: vectorised (stacked weights) or one by one.

Both trainers yield the clients' deltas ``w_k - w_global`` chunk by chunk as ``(k, P)``
matrices, and both draw every random number of client ``k`` (batch order, Poisson
masks, local noise) from its own generator seeded by ``(seed, round, k)``, in the same
order, so they agree to float rounding whatever the chunking.

* ``VectorizedTrainer`` stacks the parameters of up to ``chunk_size`` clients. Linear/
  ReLU stacks (logreg, mlp) use the hand-written batched maths of ``BatchedMLP``
  (with plain SGD, the update folded into the gradient products, on one contiguous
  stacked tensor per parameter); other architectures and sample-level DP use
  ``vmap(grad(functional_call(...)))``. A chunk's batches are drawn client by client
  but gathered once, as ``(steps, k, B, ...)`` tensors.
  Shards of different sizes are padded and masked, and a client with fewer local
  steps sits out the padded steps (its row is left unchanged).
* ``LoopTrainer`` trains one ``nn.Module`` per client with ``torch.optim``: slower,
  and an independent check of the vectorised path.

Sample-level DP (``LocalDP``): every local step draws a Poisson mask ``rand(n_k) < q``,
clips each sample's gradient to ``C``, sums, adds ``N(0, (σC)²)`` and divides by the
expected batch ``q·n_k``; ``ceil(1/q)`` such steps make a local epoch, for every client.
The FedProx term is data-independent, so its gradient is added after the noise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector

from ppml.training.dp_sgd import OPTIMIZERS
from ppml.training.federated.aggregate import CLIP_EPSILON
from ppml.training.federated.batched_mlp import BatchedMLP
from ppml.training.federated.functional import (
    ParamLayout,
    StackedOptimizer,
    client_generator,
    local_steps_per_epoch,
    plain_schedule,
)
from ppml.training.federated.local_steps import LocalStep, plain_steps, poisson_steps
from ppml.training.federated.strategies import ClientConfig

__all__ = [
    "DEFAULT_CHUNK",
    "Chunks",
    "ClientTask",
    "ClientTrainer",
    "LocalDP",
    "LocalSetup",
    "LoopTrainer",
    "VectorizedTrainer",
]

Params = dict[str, torch.Tensor]

DEFAULT_CHUNK = 100
# Weights per chunk on CPU. Measured on 2 cores (1 MiB L2 each, 32 MiB L3) with the
# 40-256-256-10 MLP: 20-32 clients (6-10 MiB) are fastest; 13 (4 MiB) pays more per-call
# overhead per client, 50 and more spill the weights out of cache.
CPU_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True, kw_only=True)
class LocalDP:
    """Sample-level DP-SGD run by every client (same q, σ, C and steps for all)."""

    noise_multiplier: float
    clip_norm: float
    sample_rate: float

    @property
    def steps_per_epoch(self) -> int:
        return local_steps_per_epoch(self.sample_rate)


@dataclass(frozen=True, kw_only=True)
class LocalSetup:
    """What every client of a job shares: the model, the data and the local optimiser."""

    module: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    dp: LocalDP | None

    @property
    def layout(self) -> ParamLayout:
        return ParamLayout.of(self.module)


@dataclass(frozen=True, kw_only=True)
class ClientTask:
    """One client's work in one round.

    Attributes:
        client_id: The client's index.
        rows: Its training rows (global indices, on the training device).
        config: Local epochs and proximal weight from the strategy.
        seed: Seeds all of this client's randomness in this round.
    """

    client_id: int
    rows: torch.Tensor
    config: ClientConfig
    seed: int


Chunks = Iterator[tuple[Sequence[ClientTask], torch.Tensor]]
Steps = Iterator[LocalStep]


class ClientTrainer(Protocol):
    def train(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> Chunks:
        """Trains ``tasks`` from ``global_params`` ``(P,)``, yielding chunks of them with
        their deltas ``(k, P)``; a yielded matrix is valid until the next is requested."""
        ...


def _clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    return (clip_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)


def _loss_fns(
    module: nn.Module,
) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(masked mean batch loss, single-sample loss) as functions of the parameters."""

    def batch_loss(
        params: Params, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
    ) -> torch.Tensor:
        per_row = F.cross_entropy(functional_call(module, params, (x,)), y, reduction="none")
        return (per_row * m).sum() / m.sum().clamp(min=1.0)

    def sample_loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, params, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    return batch_loss, sample_loss


class VectorizedTrainer:
    """Trains clients ``chunk_size`` at a time with stacked parameters."""

    def __init__(self, setup: LocalSetup, *, chunk_size: int | None = None) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.setup, self.layout = setup, setup.layout
        batch_loss, sample_loss = _loss_fns(setup.module)
        self._batch_grad = vmap(grad(batch_loss))
        self._per_sample_grad = vmap(vmap(grad(sample_loss), in_dims=(None, 0, 0)))
        # Linear/ReLU stacks skip torch.func for hand-written batched maths (faster on CPU).
        self._mlp = BatchedMLP.of(setup.module) if setup.dp is None else None
        self.chunk_size = chunk_size or self._default_chunk_size()
        self._buffer: torch.Tensor | None = None
        self._stack: list[torch.Tensor] = []

    def _default_chunk_size(self) -> int:
        """``DEFAULT_CHUNK`` clients, or on CPU, for the hand-written MLP, as many as keep
        a chunk's weights within ``CPU_CHUNK_BYTES``: streaming stacked weights from
        memory at every local step then costs more than the maths (measured 2x)."""
        if self.setup.x.device.type != "cpu" or self._mlp is None:
            return DEFAULT_CHUNK
        per_client = self.layout.size * self.setup.x.element_size()
        return max(1, min(DEFAULT_CHUNK, CPU_CHUNK_BYTES // per_client))

    def train(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> Chunks:
        # One (chunk, P) buffer serves every chunk and round: fresh large allocations
        # (page faults) cost more than the arithmetic on CPU.
        size = (min(self.chunk_size, len(tasks)), self.layout.size)
        if self._buffer is None or self._buffer.shape[0] < size[0]:
            self._buffer = global_params.new_empty(size)
        for start in range(0, len(tasks), self.chunk_size):
            chunk = tasks[start : start + self.chunk_size]
            deltas = self._buffer[: len(chunk)]
            self._chunk(deltas, global_params, chunk)
            yield chunk, deltas

    def _chunk(
        self, deltas: torch.Tensor, global_params: torch.Tensor, tasks: Sequence[ClientTask]
    ) -> None:
        """Trains ``tasks`` from ``global_params``; writes ``w_k - w_global`` to ``deltas``."""
        s = self.setup
        gens = [client_generator(t.seed, global_params.device) for t in tasks]
        mu = torch.tensor([t.config.proximal_mu for t in tasks], dtype=deltas.dtype)
        plain_sgd = s.optimizer == "sgd" and s.momentum == 0 and not bool((mu > 0).any())
        if self._mlp is not None and plain_sgd:
            self._chunk_fused(self._mlp, deltas, global_params, tasks, gens)
            return
        deltas.copy_(global_params.expand_as(deltas))
        params = list(self.layout.unflatten(deltas).values())  # views, updated in place
        self._chunk_with_optimizer(params, global_params, tasks, gens, mu)
        deltas.sub_(global_params)

    def _chunk_fused(
        self,
        mlp: BatchedMLP,
        deltas: torch.Tensor,
        global_params: torch.Tensor,
        tasks: Sequence[ClientTask],
        gens: list[torch.Generator],
    ) -> None:
        """Plain SGD folded into the hand-written MLP's gradient products.

        The weights live in one contiguous ``(k, ...)`` tensor per parameter, not in
        views of the ``(k, P)`` rows: an in-place batched product on a contiguous
        tensor is one batched gemm, on a strided view one gemm call per client.
        """
        s, k = self.setup, len(tasks)
        anchor = list(self.layout.unflatten(global_params).values())
        params = self._stacked(k, global_params)
        for p, a in zip(params, anchor, strict=True):
            p.copy_(a.expand_as(p))
        # an inactive client has an all-zero mask, hence a zero step
        for step in self._steps(tasks, gens):
            assert step.targets is not None
            mlp.sgd_step_with_(params, step.x, step.targets, s.learning_rate)
        for d, p, a in zip(self.layout.unflatten(deltas).values(), params, anchor, strict=True):
            torch.sub(p, a, out=d)

    def _stacked(self, k: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Contiguous ``(k, *shape)`` tensors per parameter, reused across chunks."""
        if not self._stack or self._stack[0].shape[0] < k:
            self._stack = [like.new_empty(k, *shape) for shape in self.layout.shapes]
        return [t[:k] for t in self._stack]

    def _chunk_with_optimizer(
        self,
        params: list[torch.Tensor],
        global_params: torch.Tensor,
        tasks: Sequence[ClientTask],
        gens: list[torch.Generator],
        mu: torch.Tensor,
    ) -> None:
        """Gradients (hand-written, ``torch.func`` or private), then a ``StackedOptimizer``."""
        s, mlp = self.setup, self._mlp
        views = dict(zip(self.layout.names, params, strict=True))
        anchor = list(self.layout.unflatten(global_params).values())
        optimizer = StackedOptimizer(
            s.optimizer, learning_rate=s.learning_rate, momentum=s.momentum
        )
        prox = mu.to(global_params.device) if bool((mu > 0).any()) else None
        for step in self._steps(tasks, gens):
            if mlp is not None and step.targets is not None:
                grads = mlp.grads_with(params, step.x, step.targets)
            elif s.dp is None:
                grads = list(self._batch_grad(views, step.x, step.y, step.mask).values())
            else:
                grads = self._private_grad(views, step, tasks, gens)
            if prox is not None:
                grads = [
                    g + _rows(prox, g) * (p - a)
                    for g, p, a in zip(grads, params, anchor, strict=True)
                ]
            optimizer.step(params, grads, step.active)

    def _steps(self, tasks: Sequence[ClientTask], gens: list[torch.Generator]) -> Steps:
        s, shards = self.setup, [t.rows for t in tasks]
        if s.dp is None:
            epochs = [t.config.local_epochs for t in tasks]
            targets = self._mlp.targets if self._mlp is not None else None
            return plain_steps(
                s.x, s.y, shards, epochs, gens, batch_size=s.batch_size, targets=targets
            )
        steps = [t.config.local_epochs * s.dp.steps_per_epoch for t in tasks]
        return poisson_steps(s.x, s.y, shards, steps, gens, sample_rate=s.dp.sample_rate)

    def _private_grad(
        self,
        params: Params,
        step: LocalStep,
        tasks: Sequence[ClientTask],
        gens: list[torch.Generator],
    ) -> list[torch.Tensor]:
        """Clipped, summed, noised and normalised per-sample gradients, per parameter."""
        s = self.setup
        assert s.dp is not None
        dp, mask = s.dp, step.mask
        per_sample = list(self._per_sample_grad(params, step.x, step.y).values())
        sq_norms = sum(g.flatten(start_dim=2).pow(2).sum(dim=2) for g in per_sample)
        factors = _clip_factors(torch.as_tensor(sq_norms).sqrt(), dp.clip_norm) * mask
        noise = torch.zeros(len(tasks), self.layout.size, dtype=s.x.dtype, device=s.x.device)
        for i, on in enumerate(step.active.tolist()):
            if on:  # drawn after this step's mask, as the loop trainer does
                noise[i] = torch.randn(
                    self.layout.size, generator=gens[i], device=s.x.device, dtype=s.x.dtype
                )
        sizes = torch.tensor([len(t.rows) for t in tasks], dtype=s.x.dtype, device=s.x.device)
        expected_batch = dp.sample_rate * sizes
        std = dp.noise_multiplier * dp.clip_norm
        return [
            (torch.einsum("kb,kb...->k...", factors, g) + std * z) / _rows(expected_batch, z)
            for g, z in zip(per_sample, self.layout.unflatten(noise).values(), strict=True)
        ]


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(k,)`` per-client values shaped to broadcast against ``(k, ...)``."""
    return values.view(-1, *[1] * (like.dim() - 1))


class LoopTrainer:
    """Trains clients one after another on a plain module with ``torch.optim``."""

    def __init__(self, setup: LocalSetup) -> None:
        self.setup, self.layout = setup, setup.layout
        self._module = copy.deepcopy(setup.module)
        self._module.train()
        self._params = list(self._module.parameters())
        _, sample_loss = _loss_fns(self._module)
        self._per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def train(self, global_params: torch.Tensor, tasks: Sequence[ClientTask]) -> Chunks:
        for task in tasks:
            yield [task], (self._train_one(global_params, task) - global_params)[None]

    def _train_one(self, global_params: torch.Tensor, task: ClientTask) -> torch.Tensor:
        s = self.setup
        self.layout.load(self._module, global_params)
        optimizer = OPTIMIZERS[s.optimizer](self._params, s.learning_rate, s.momentum)
        generator = client_generator(task.seed, global_params.device)
        anchor = [p.detach().clone() for p in self._params]
        if s.dp is None:
            self._plain(task, optimizer, generator, anchor)
        else:
            self._private(task, optimizer, generator, anchor, s.dp)
        return parameters_to_vector(self._params).detach()

    def _proximal(self, mu: float, anchor: list[torch.Tensor]) -> torch.Tensor:
        sq = sum(((p - a) ** 2).sum() for p, a in zip(self._params, anchor, strict=True))
        return 0.5 * mu * torch.as_tensor(sq)

    def _plain(
        self,
        task: ClientTask,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        anchor: list[torch.Tensor],
    ) -> None:
        s, mu = self.setup, task.config.proximal_mu
        schedule = plain_schedule(len(task.rows), s.batch_size, task.config.local_epochs, generator)
        for batch in schedule:
            rows = task.rows[batch[batch >= 0]]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self._module(s.x[rows]), s.y[rows])
            if mu > 0:
                loss = loss + self._proximal(mu, anchor)
            loss.backward()
            optimizer.step()

    def _private(
        self,
        task: ClientTask,
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        anchor: list[torch.Tensor],
        dp: LocalDP,
    ) -> None:
        s, mu, n = self.setup, task.config.proximal_mu, len(task.rows)
        device = s.x.device
        for _ in range(task.config.local_epochs * dp.steps_per_epoch):
            rows = task.rows[torch.rand(n, generator=generator, device=device) < dp.sample_rate]
            summed = torch.zeros(self.layout.size, dtype=s.x.dtype, device=device)
            if len(rows):
                params = {name: p.detach() for name, p in self._module.named_parameters()}
                per_sample = self.layout.flatten(
                    self._per_sample_grad(params, s.x[rows], s.y[rows]), lead=1
                )
                norms = torch.linalg.vector_norm(per_sample, dim=1)
                summed = _clip_factors(norms, dp.clip_norm) @ per_sample
            noise = torch.randn(
                self.layout.size, generator=generator, device=device, dtype=s.x.dtype
            )
            noisy = (summed + dp.noise_multiplier * dp.clip_norm * noise) / (dp.sample_rate * n)
            grads = self.layout.unflatten(noisy)
            for (name, p), a in zip(self._module.named_parameters(), anchor, strict=True):
                p.grad = grads[name] + mu * (p.detach() - a)
            optimizer.step()
