"""A node's local round, with the trainer of ppml's federated simulation (``LoopTrainer``):
the node is one client of it, holding all of its own rows.

* sample mode: DP-SGD with the task's q, σ, C for exactly the task's ``steps`` (what the
  ledger was charged for), the noise added here, from a generator seeded by the OS CSPRNG
  (a known seed would let the server subtract the noise);
* client mode: plain local SGD, then the update is clipped to the task's ``clip_norm`` (the
  server adds the noise to the sum);
* none mode: plain local SGD.

The update is ``local − global`` per parameter, float32, keyed by ``state_dict`` names.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ppml.node.data import LocalData
from ppml.node.tasks import Task
from ppml.training.federated.aggregate import clip_rows
from ppml.training.federated.clients import ClientTask, LocalDP, LocalSetup, LoopTrainer
from ppml.training.federated.functional import ParamLayout
from ppml.training.federated.strategies import ClientConfig
from ppml.training.models import build_model

__all__ = ["expected_shapes", "local_update", "model_of", "prepare_torch"]


def prepare_torch(threads: int) -> None:
    """Set this process's torch threads and import now what the first round would.

    Several nodes may share a machine (and a tiny model gains nothing from more threads):
    with 3 nodes of 2 threads each on 2 cores, spinning OpenMP threads made a 7-step
    DP-SGD round of the 40-256-256-10 MLP take 2.3-4.3 s instead of about 0.1 s. The first
    ``torch.optim`` optimiser imports ``torch._dynamo`` (about 1.3 s); building one here,
    on no data, moves that out of the first round.
    """
    torch.set_num_threads(threads)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


@dataclass(frozen=True, kw_only=True)
class _RoundDP(LocalDP):
    """DP-SGD for a fixed number of steps per round (the task's, which the ledger charged),
    rather than ``local_epochs · ceil(1/q)``."""

    steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.steps


def model_of(task: Task) -> nn.Module:
    """A module of the task's architecture (its initial weights are overwritten)."""
    shape = tuple(task.input_shape) if task.input_shape is not None else None
    return build_model(
        task.model,
        num_features=task.num_features,
        num_classes=task.num_classes,
        input_shape=shape,
    )


def expected_shapes(task: Task) -> dict[str, torch.Size]:
    """The names and shapes the task's global weights and the update must have."""
    return {name: t.shape for name, t in model_of(task).state_dict().items()}


def local_update(
    task: Task, data: LocalData, global_weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Train one round from ``global_weights`` on the node's rows; return ``local − global``.

    Raises:
        ValueError: the data does not fit the task's model (features or classes).
    """
    if data.num_features != task.num_features or len(data.classes) != task.num_classes:
        raise ValueError("the task's model does not fit this node's data")
    module = model_of(task)
    module.load_state_dict(dict(global_weights))
    layout = ParamLayout.of(module)
    params = dict(module.named_parameters())
    if set(params) != set(module.state_dict()):
        raise ValueError("models with buffers are not supported by nodes")
    flat_global = layout.flatten({k: v.detach() for k, v in params.items()}).clone()
    dp: LocalDP | None = None
    epochs = task.training.local_epochs
    if task.mode == "sample":
        sample = task.sample
        dp = _RoundDP(
            noise_multiplier=sample.noise_multiplier,
            clip_norm=sample.max_grad_norm,
            sample_rate=sample.sample_rate,
            steps=sample.steps,
        )
        epochs = 1  # × steps per "epoch" = the task's steps
    setup = LocalSetup(
        module=module,
        x=torch.from_numpy(data.x),
        y=torch.from_numpy(data.y),
        batch_size=task.training.batch_size,
        learning_rate=task.training.learning_rate,
        optimizer="sgd",
        momentum=task.training.momentum,
        dp=dp,
    )
    client = ClientTask(
        client_id=0,
        rows=torch.arange(data.rows),
        config=ClientConfig(local_epochs=epochs, proximal_mu=task.training.proximal_mu),
        seed=secrets.randbits(63),  # batches, Poisson masks and noise: secret
    )
    ((_, delta),) = list(LoopTrainer(setup).train(flat_global, [client]))
    if task.mode == "client":
        delta = clip_rows(delta, task.client.clip_norm)
    return {k: v.clone() for k, v in layout.unflatten(delta[0]).items()}
