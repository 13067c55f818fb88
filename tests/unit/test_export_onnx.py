"""ONNX export (worker side, torch) and onnxruntime serving (API side, no torch)."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ppml.architectures import ModelShape
from ppml.inference import IntegrityError, ModelCache, load_model, softmax
from ppml.specs import ModelSpec
from ppml.storage import Artifact, LocalStore
from ppml.training.export import export_onnx
from ppml.training.models import build_model

CASES: list[tuple[str, int, dict[str, Any]]] = [
    ("logreg", 64, {}),
    ("mlp", 64, {"hidden_sizes": [32, 16]}),
    ("mlp", 30, {"hidden_sizes": [8]}),
    ("cnn1d", 64, {"channels": [8, 16], "kernel_size": 5}),
    ("cnn1d", 9, {"channels": [4, 8], "kernel_size": 4}),  # odd length, even kernel
    # images: input_shape [C, H, W], rows flattened in C order
    ("cnn2d", 64, {"channels": [8, 16], "kernel_size": 3, "input_shape": (1, 8, 8)}),
    ("cnn2d", 105, {"channels": [4, 6], "kernel_size": 4, "input_shape": (3, 5, 7)}),
]


def _model(arch: str, num_features: int, kwargs: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    input_shape = kwargs.pop("input_shape", None)
    spec = ModelSpec(arch=arch, **kwargs)
    module = build_model(
        spec, num_features=num_features, num_classes=5, input_shape=input_shape
    ).eval()
    with torch.no_grad():  # non-trivial weights everywhere, GroupNorm affine included
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    shape = ModelShape(
        model=spec, num_features=num_features, num_classes=5, input_shape=input_shape
    )
    metadata = {
        "architecture": shape.to_metadata(),
        "classes": json.dumps(["a", "b", "c", "d", "e"]),
        "epsilon": "2.5",
        "job_id": "job_x",
    }
    return module, metadata


def _publish(store: LocalStore, name: str, module: Any, metadata: dict[str, str]) -> Artifact:
    """Exports through the store, as the worker does."""
    weights = module.state_dict()
    return store.write(
        f"models/{name}.onnx", lambda path: export_onnx(path, weights, metadata=metadata)
    )


@pytest.mark.parametrize(("arch", "num_features", "kwargs"), CASES)
def test_onnx_matches_pytorch_for_batches_of_1_and_17(
    tmp_path: Path, arch: str, num_features: int, kwargs: dict[str, Any]
) -> None:
    # arrange
    module, metadata = _model(arch, num_features, kwargs)
    store = LocalStore(tmp_path)
    # act
    artifact = _publish(store, "model", module, metadata)
    path = store.path(artifact.key)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # assert
    assert artifact.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert artifact.size == path.stat().st_size
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    batch_dim, width = session.get_inputs()[0].shape
    assert isinstance(batch_dim, str) and width == num_features  # dynamic batch axis
    assert session.get_inputs()[0].type == "tensor(float)"
    rng = np.random.default_rng(1)
    for batch in (1, 17):
        x = rng.normal(size=(batch, num_features)).astype(np.float32)
        (logits,) = session.run(["logits"], {"input": x})
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        assert logits.shape == (batch, 5)
        assert np.abs(logits - expected).max() <= 1e-4
    assert list((tmp_path / "tmp").iterdir()) == []  # no staged file left behind


def test_receipt_sits_in_metadata_props(tmp_path: Path) -> None:
    module, metadata = _model("logreg", 4, {})
    store = LocalStore(tmp_path)

    artifact = _publish(store, "m", module, metadata)
    loaded = load_model(store.path(artifact.key), sha256=artifact.sha256)

    assert loaded.metadata == metadata
    assert (loaded.num_features, loaded.num_classes) == (4, 5)
    assert loaded.classes == ["a", "b", "c", "d", "e"]


def test_export_refuses_bad_metadata(tmp_path: Path) -> None:
    module, _ = _model("logreg", 4, {})

    with pytest.raises(ValueError, match="strings"):
        export_onnx(tmp_path / "a.onnx", module.state_dict(), metadata={"epsilon": 1.0})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="architecture"):
        export_onnx(tmp_path / "b.onnx", module.state_dict(), metadata={"epsilon": "1"})
    assert list(tmp_path.iterdir()) == []


def test_loaded_model_predicts_labels_and_probabilities(tmp_path: Path) -> None:
    # arrange
    module, metadata = _model("mlp", 6, {"hidden_sizes": [8]})
    store = LocalStore(tmp_path)
    artifact = _publish(store, "m", module, metadata)
    loaded = load_model(store.path(artifact.key), sha256=artifact.sha256)
    x = np.random.default_rng(2).normal(size=(9, 6)).astype(np.float32)
    # act
    result = loaded.predict(x)
    # assert
    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(result.indices, expected.argmax(axis=1))


def test_load_refuses_a_file_that_does_not_match_its_digest(tmp_path: Path) -> None:
    module, metadata = _model("logreg", 4, {})
    path = tmp_path / "m.onnx"
    export_onnx(path, module.state_dict(), metadata=metadata)

    with pytest.raises(IntegrityError):
        load_model(path, sha256="0" * 64)


def test_softmax_is_stable_for_large_logits() -> None:
    probabilities = softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]], dtype=np.float32))

    np.testing.assert_allclose(probabilities, [[1.0, 0.0], [0.5, 0.5]])


def test_model_cache_is_an_lru_keyed_by_job_and_digest(tmp_path: Path) -> None:
    # arrange: three artefacts, a cache of two
    store, paths, digests = LocalStore(tmp_path), [], []
    for index in range(3):
        module, metadata = _model("logreg", 4, {})
        artifact = _publish(store, f"m{index}", module, metadata)
        digests.append(artifact.sha256)
        paths.append(store.path(artifact.key))
    cache = ModelCache(capacity=2)
    # act
    first = cache.get("j0", digests[0], paths[0])
    assert cache.get("j0", digests[0], paths[0]) is first  # hit
    cache.get("j1", digests[1], paths[1])
    cache.get("j0", digests[0], paths[0])  # j0 is now the most recent
    cache.get("j2", digests[2], paths[2])  # evicts j1
    # assert
    assert len(cache) == 2
    assert cache.get("j0", digests[0], paths[0]) is first
    paths[1].unlink()
    with pytest.raises(FileNotFoundError):  # j1 was evicted: it must be loaded again
        cache.get("j1", digests[1], paths[1])


def test_model_cache_is_safe_under_concurrent_use(tmp_path: Path) -> None:
    module, metadata = _model("logreg", 4, {})
    store = LocalStore(tmp_path)
    artifact = _publish(store, "m", module, metadata)
    path, digest = store.path(artifact.key), artifact.sha256
    cache = ModelCache(capacity=1)
    seen: list[object] = []
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                model = cache.get("j", digest, path)
                model.predict(np.zeros((3, 4), dtype=np.float32))
                seen.append(model)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not failures
    assert len(cache) == 1
    assert all(model is seen[-1] for model in seen[-10:])
