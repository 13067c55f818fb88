"""The task JSON a node receives from ``POST /v1/node/poll`` (docs: fed-design, "Node API").

Built once, when the server loop opens the task, and stored with it: what a node is asked
to do never changes while the task is open.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from ppml.federation.privacy import node_sample_plan
from ppml.federation.schema import FederationSchema
from ppml.specs import JobSpec

__all__ = ["Mode", "task_mode", "task_payload"]

Mode = Literal["sample", "client", "none"]


def task_mode(spec: JobSpec) -> Mode:
    """sample: DP-SGD at each node; client: clipped updates, noise at the server; none."""
    if spec.privacy is None:
        return "none"
    return "client" if spec.privacy.level == "client" else "sample"


def _privacy(spec: JobSpec, rows: int | None) -> dict[str, Any] | None:
    mode = task_mode(spec)
    if mode == "none":
        return None
    assert spec.privacy is not None
    if mode == "client":
        return {"clip_norm": spec.privacy.max_grad_norm}
    return node_sample_plan(spec, rows or 0).to_json()


def task_payload(
    *,
    task_id: str,
    job_id: str,
    spec: JobSpec,
    schema: FederationSchema,
    round_: int,
    deadline: datetime,
    weights_sha256: str,
    rows: int | None,
) -> dict[str, Any]:
    """The task as the node sees it (``rows``: the node's rows, for its sample plan)."""
    fed = spec.federated
    assert fed is not None
    return {
        "id": task_id,
        "job_id": job_id,
        "round": round_,
        "rounds": fed.rounds,
        "deadline": deadline.isoformat(),
        "mode": task_mode(spec),
        "model": spec.model.model_dump(mode="json"),
        "num_features": schema.num_features,
        "num_classes": len(schema.classes),
        "input_shape": None if schema.input_shape is None else list(schema.input_shape),
        "training": {
            "local_epochs": fed.local_epochs,
            "batch_size": spec.training.batch_size,
            "learning_rate": spec.training.learning_rate,
            "momentum": spec.training.momentum,
            "proximal_mu": fed.mu if fed.strategy == "fedprox" else 0.0,
        },
        "privacy": _privacy(spec, rows),
        "weights_sha256": weights_sha256,
    }
