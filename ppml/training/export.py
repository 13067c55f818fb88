"""Model artefacts: safetensors weights and an ONNX graph, both carrying the privacy receipt.

safetensors holds raw tensors and a string-to-string header, so loading an artefact
never executes code (unlike ``torch.load``/pickle). The ONNX graph is what the API serves
predictions from with onnxruntime (no torch in the API process); the same metadata sits in
its ``metadata_props``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import onnx
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ppml.training.models import build_model

__all__ = [
    "ARCHITECTURE_KEY",
    "ONNX_INPUT",
    "ONNX_OPSET",
    "ONNX_OUTPUT",
    "architecture_metadata",
    "build_from_metadata",
    "export_onnx",
    "load_model",
    "save_model",
]

ARCHITECTURE_KEY = "architecture"
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
ONNX_OPSET = 17
_HASH_CHUNK = 1 << 20


def architecture_metadata(
    *,
    arch: str,
    num_features: int,
    num_classes: int,
    hidden_sizes: Sequence[int],
    channels: Sequence[int],
    kernel_size: int,
) -> str:
    """Serialises what ``load_model`` needs to rebuild the module.

    Args:
        arch: Registry name.
        num_features: Input width ``d``.
        num_classes: Number of output logits ``K``.
        hidden_sizes: Hidden widths (``mlp``).
        channels: Convolution channels (``cnn1d``).
        kernel_size: Convolution kernel width (``cnn1d``).

    Returns:
        A JSON object string with sorted keys, stored under ``metadata["architecture"]``.
    """
    spec = {
        "arch": arch,
        "num_features": int(num_features),
        "num_classes": int(num_classes),
        "hidden_sizes": [int(h) for h in hidden_sizes],
        "channels": [int(c) for c in channels],
        "kernel_size": int(kernel_size),
    }
    return json.dumps(spec, sort_keys=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[Path], object]) -> str:
    """Runs ``write`` on a temporary sibling, fsyncs it and renames it onto ``path``.

    Returns:
        The sha256 hex digest of the written file.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _check_metadata(metadata: Mapping[str, str]) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("model metadata keys and values must be strings")


def save_model(
    path: Path, state_dict: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str]
) -> str:
    """Writes weights and metadata atomically (temporary file, fsync, ``os.replace``).

    Args:
        path: Destination ``.safetensors`` file; its directory must exist.
        state_dict: Weights to store (copied to contiguous CPU tensors).
        metadata: String-valued header, e.g. the architecture and privacy receipt.

    Returns:
        The sha256 hex digest of the written file.

    Raises:
        ValueError: If a metadata key or value is not a string.
    """
    _check_metadata(metadata)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    return _write_atomically(
        Path(path), lambda tmp: save_file(tensors, tmp, metadata=dict(metadata))
    )


def build_from_metadata(metadata: Mapping[str, str]) -> nn.Module:
    """A freshly initialised module of the architecture in ``metadata["architecture"]``.

    Raises:
        ValueError: If the architecture metadata is missing or malformed.
    """
    if ARCHITECTURE_KEY not in metadata:
        raise ValueError("artefact has no architecture metadata")
    try:
        spec = json.loads(metadata[ARCHITECTURE_KEY])
        return build_model(
            spec["arch"],
            num_features=spec["num_features"],
            num_classes=spec["num_classes"],
            hidden_sizes=spec["hidden_sizes"],
            channels=spec["channels"],
            kernel_size=spec["kernel_size"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError("artefact architecture metadata is malformed") from exc


def _onnx_bytes(module: nn.Module, num_features: int) -> bytes:
    example = torch.zeros(2, num_features)
    with tempfile.TemporaryDirectory(prefix="ppml-onnx-") as folder, warnings.catch_warnings():
        raw = Path(folder) / "model.onnx"
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; it still exports these plain layers exactly. The tracer warns about
        # GroupNorm's batch-size check, which is data-independent here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (example,),
            raw,
            dynamo=False,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
        return raw.read_bytes()


def export_onnx(
    path: Path, state_dict: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str]
) -> str:
    """Exports the plain module (never an Opacus wrapper) to ONNX, atomically.

    The graph takes ``input`` (float32, ``[batch, num_features]``, dynamic batch) and returns
    ``logits`` (``[batch, num_classes]``); ``metadata`` (receipt, architecture, classes) goes
    into the model's ``metadata_props``.

    Args:
        path: Destination ``.onnx`` file; its directory must exist.
        state_dict: Weights of the plain module, as in ``TrainResult.state_dict``.
        metadata: String-valued metadata; must hold ``"architecture"``.

    Returns:
        The sha256 hex digest of the written file.

    Raises:
        ValueError: If the metadata is not string-valued or lacks a valid architecture.
    """
    _check_metadata(metadata)
    module = build_from_metadata(metadata)
    weights = {name: t.detach().cpu() for name, t in state_dict.items()}
    module.load_state_dict(weights, strict=True)
    module.eval()
    num_features = int(json.loads(metadata[ARCHITECTURE_KEY])["num_features"])
    with torch.no_grad():
        model = onnx.load_from_string(_onnx_bytes(module, num_features))
    model.producer_name = "ppml"
    model.doc_string = "ppml model; metadata_props hold its privacy receipt."
    onnx.helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    serialized = model.SerializeToString()
    return _write_atomically(Path(path), lambda tmp: tmp.write_bytes(serialized))


def load_model(path: Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuilds the module described by the artefact and loads its weights.

    Args:
        path: A file written by ``save_model`` with ``metadata["architecture"]`` set.

    Returns:
        The module (in eval mode, on CPU) and the file's metadata.

    Raises:
        ValueError: If the architecture metadata is missing or malformed.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, str] = dict(handle.metadata() or {})
    module = build_from_metadata(metadata)
    module.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return module.eval(), metadata
