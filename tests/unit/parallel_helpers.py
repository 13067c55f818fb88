"""What the spawned replicas of tests/unit/test_data_parallel.py run (spawn imports it)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ppml.training.parallel import DistributedDPEngine

SIGMA, CLIP = 1.5, 0.1
ROWS, FEATURES, CLASSES, HIDDEN = 32, 64, 10, 512


def model() -> nn.Module:
    """The same initial weights in every process."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, FEATURES, generator=generator)
    return x, torch.randint(0, CLASSES, (ROWS,), generator=generator)


def replica_gradient(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, seed: int
) -> torch.Tensor:
    """One data-parallel step's summed gradient (flat), as every replica ends up with it."""
    engine = DistributedDPEngine(
        module,
        noise_multiplier=sigma,
        max_grad_norm=CLIP,
        expected_batch_size=ROWS,
        generator=torch.Generator().manual_seed(seed),
    )
    engine.backward(F.cross_entropy(module(x), y, reduction="sum"))
    engine.close()
    return engine.flat_grad.clone()


def replica(rank: int, world_size: int, address: str, out: str) -> None:
    """Rank ``rank`` takes rows ``rank::world_size`` of the batch, once without noise and
    once with σ = SIGMA, and saves both summed gradients."""
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)
    try:
        x, y = batch()
        mine = x[rank::world_size], y[rank::world_size]
        clean = replica_gradient(model(), *mine, sigma=0.0, seed=rank)
        noisy = replica_gradient(model(), *mine, sigma=SIGMA, seed=100 + rank)
        torch.save({"clean": clean, "noisy": noisy}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
