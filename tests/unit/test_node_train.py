"""A node's local round: the update's names and shapes, client-level clipping, DP noise added
at the node, and the safetensors round trip of weights and updates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from ppml.errors import InvalidInput
from ppml.node.tasks import Task
from ppml.node.train import expected_shapes, local_update, model_of, prepare_torch
from ppml.node.updates import decode_weights, encode_update, sha256_hex
from tests.unit.node_helpers import local_data

SAMPLE = {
    "sample_rate": 0.1,
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "steps": 7,
    "delta": 1e-3,
    "rounds": 3,
}


def _task(mode: str, privacy: dict[str, Any] | None, **model: Any) -> Task:
    return Task.model_validate(
        {
            "id": "tsk_1",
            "job_id": "job_1",
            "round": 0,
            "rounds": 3,
            "mode": mode,
            "model": model or {"arch": "mlp", "hidden_sizes": [8]},
            "num_features": 4,
            "num_classes": 2,
            "input_shape": None,
            "training": {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.5},
            "privacy": privacy,
            "weights_sha256": None,
        }
    )


def _norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values())))


@pytest.mark.parametrize(
    ("mode", "privacy"),
    [("sample", SAMPLE), ("client", {"clip_norm": 0.05}), ("none", None)],
)
def test_an_update_has_the_models_names_shapes_and_dtype(
    tmp_path: Path, mode: str, privacy: dict[str, Any] | None
) -> None:
    # arrange
    task = _task(mode, privacy)
    global_weights = model_of(task).state_dict()
    # act
    update = local_update(task, local_data(tmp_path), global_weights)
    # assert
    assert {k: v.shape for k, v in update.items()} == expected_shapes(task)
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in update.values())
    assert _norm(update) > 0


def test_client_mode_clips_the_update_to_c(tmp_path: Path) -> None:
    task = _task("client", {"clip_norm": 0.05})
    update = local_update(task, local_data(tmp_path), model_of(task).state_dict())
    assert _norm(update) <= 0.05


def test_the_update_is_local_minus_global(tmp_path: Path) -> None:
    # A non-private round from the same global weights moves far less than the weights are
    # large: the update is a difference, not the local weights.
    task = _task("none", None, arch="logreg")
    global_weights = {k: v + 10.0 for k, v in model_of(task).state_dict().items()}
    update = local_update(task, local_data(tmp_path), global_weights)
    assert _norm(update) < 5.0


def test_sample_mode_adds_noise_at_the_node(tmp_path: Path) -> None:
    # Two runs from the same weights differ: the masks and the noise are drawn from a secret
    # seed at every run (an all-zero learning signal would still move by the noise).
    task = _task("sample", {**SAMPLE, "noise_multiplier": 5.0}, arch="logreg")
    data, weights = local_data(tmp_path), model_of(task).state_dict()
    a, b = local_update(task, data, weights), local_update(task, data, weights)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_task_for_another_model_shape_is_an_error(tmp_path: Path) -> None:
    task = _task("none", None).model_copy(update={"num_features": 5})
    with pytest.raises(ValueError, match="does not fit"):
        local_update(task, local_data(tmp_path), model_of(task).state_dict())


def test_the_update_round_trips_with_its_metadata() -> None:
    # arrange
    task = _task("sample", SAMPLE)
    update = {k: torch.randn(v) for k, v in expected_shapes(task).items()}
    metadata = {"epsilon": "0.52", "epsilon_total": "1.04"}
    # act
    body = encode_update(update, metadata)
    # assert: the metadata is in the header, the tensors come back bit for bit
    back = decode_weights(body, expected=expected_shapes(task))
    assert all(torch.equal(back[k], update[k]) for k in update)
    header = _header(body)
    assert header["__metadata__"] == metadata
    assert {k: v["dtype"] for k, v in header.items() if k != "__metadata__"} == dict.fromkeys(
        update, "F32"
    )


def _header(body: bytes) -> dict[str, Any]:
    """The safetensors header: 8 bytes little-endian length, then JSON."""
    size = int.from_bytes(body[:8], "little")
    header: dict[str, Any] = json.loads(body[8 : 8 + size])
    return header


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda w: {**w, "extra": torch.zeros(1)}, "names differ"),
        (lambda w: {k: v.double() for k, v in w.items()}, "wrong dtype or shape"),
        (lambda w: {k: v * float("nan") for k, v in w.items()}, "non-finite"),
    ],
)
def test_global_weights_that_do_not_fit_the_task_are_refused(tamper: Any, message: str) -> None:
    task = _task("none", None)
    body = save(tamper({k: v.contiguous() for k, v in model_of(task).state_dict().items()}))
    with pytest.raises(InvalidInput, match=message):
        decode_weights(body, expected=expected_shapes(task))


def test_global_weights_must_match_the_tasks_digest() -> None:
    task = _task("none", None)
    body = save({k: v.contiguous() for k, v in model_of(task).state_dict().items()})
    assert decode_weights(body, expected=expected_shapes(task), sha256=sha256_hex(body))
    with pytest.raises(InvalidInput, match="weights_sha256"):
        decode_weights(body, expected=expected_shapes(task), sha256="0" * 64)


def test_a_sample_task_needs_its_mechanism() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        _task("sample", {k: v for k, v in SAMPLE.items() if k != "noise_multiplier"})


def test_prepare_torch_sets_the_nodes_threads() -> None:
    # arrange
    before = torch.get_num_threads()
    try:
        # act
        prepare_torch(1)
        # assert
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
