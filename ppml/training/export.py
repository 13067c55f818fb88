"""Model artefacts: safetensors weights and an ONNX graph, both carrying the privacy receipt.

safetensors holds raw tensors and a string-to-string header, so loading an artefact
never executes code (unlike ``torch.load``/pickle). The ONNX graph is what the API serves
predictions from with onnxruntime (no torch in the API process); the same metadata sits in
its ``metadata_props``.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ppml.architectures import ModelShape
from ppml.training.models import build_model

__all__ = [
    "ARCHITECTURE_KEY",
    "ONNX_INPUT",
    "ONNX_OPSET",
    "ONNX_OUTPUT",
    "Standardized",
    "build_from_metadata",
    "export_ensemble",
    "export_onnx",
    "load_model",
    "save_model",
]

ARCHITECTURE_KEY = "architecture"
ONNX_INPUT = "input"
ONNX_OUTPUT = "logits"
ONNX_OPSET = 17


def _check_metadata(metadata: Mapping[str, str]) -> None:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("model metadata keys and values must be strings")


def save_model(
    path: Path, state_dict: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str]
) -> None:
    """Writes weights and metadata to ``path`` (a plain write: publish it through the store).

    Args:
        path: Destination ``.safetensors`` file; its directory must exist.
        state_dict: Weights to store (copied to contiguous CPU tensors).
        metadata: String-valued header, e.g. the architecture and privacy receipt.

    Raises:
        ValueError: If a metadata key or value is not a string.
    """
    _check_metadata(metadata)
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    save_file(tensors, path, metadata=dict(metadata))


def _shape(metadata: Mapping[str, str]) -> ModelShape:
    if ARCHITECTURE_KEY not in metadata:
        raise ValueError("artefact has no architecture metadata")
    return ModelShape.from_metadata(metadata[ARCHITECTURE_KEY])


def _build(shape: ModelShape) -> nn.Module:
    return build_model(
        shape.model,
        num_features=shape.num_features,
        num_classes=shape.num_classes,
        input_shape=shape.input_shape,
    )


class Standardized(nn.Module):
    """A trained network behind the standardisation it was trained with: inputs clipped to
    the released bounds, centred by the released means, divided by the released standard
    deviations (``ppml.datasets.statistics.standardize``, op for op in float32)."""

    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, net: nn.Module, scaling: Sequence[tuple[float, float, float, float]]
    ) -> None:
        super().__init__()
        self.net = net
        columns = torch.tensor(scaling, dtype=torch.float32).T.contiguous()
        # Not persistent: the weights file holds the network's tensors only; the scaling
        # travels in the architecture metadata, beside the receipt.
        for name, values in zip(("low", "high", "mean", "std"), columns, strict=True):
            self.register_buffer(name, values.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clipped = torch.minimum(torch.maximum(x, self.low), self.high)
        return self.net((clipped - self.mean) / self.std)  # type: ignore[no-any-return]


def _with_scaling(shape: ModelShape, module: nn.Module) -> nn.Module:
    return module if shape.standardize is None else Standardized(module, shape.standardize)


def build_from_metadata(metadata: Mapping[str, str]) -> nn.Module:
    """A freshly initialised network of the architecture in ``metadata["architecture"]``
    (without its input standardisation: weights load into it; see :func:`load_model`).

    Raises:
        ValueError: If the architecture metadata is missing or malformed.
    """
    return _build(_shape(metadata))


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
) -> None:
    """Exports the plain module (never an Opacus wrapper) to ONNX at ``path`` (a plain write).

    The graph takes ``input`` (float32, ``[batch, num_features]``, dynamic batch) and returns
    ``logits`` (``[batch, num_classes]``); ``metadata`` (receipt, architecture, classes) goes
    into the model's ``metadata_props``.

    Args:
        path: Destination ``.onnx`` file; its directory must exist.
        state_dict: Weights of the plain module, as in ``TrainResult.state_dict``.
        metadata: String-valued metadata; must hold ``"architecture"``.

    Raises:
        ValueError: If the metadata is not string-valued or lacks a valid architecture.
    """
    _check_metadata(metadata)
    shape = _shape(metadata)
    module = _build(shape)
    weights = {name: t.detach().cpu() for name, t in state_dict.items()}
    module.load_state_dict(weights, strict=True)
    module = _with_scaling(shape, module).eval()
    with torch.no_grad():
        model = onnx.load_from_string(_onnx_bytes(module, shape.num_features))
    model.producer_name = "ppml"
    model.doc_string = "ppml model; metadata_props hold its privacy receipt."
    onnx.helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    Path(path).write_bytes(model.SerializeToString())


class _Ensemble(nn.Module):
    """k modules side by side: ``(batch, d)`` → their logits ``(batch, k, K)``."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members], dim=1)


def export_ensemble(
    path: Path, state_dicts: Sequence[Mapping[str, torch.Tensor]], *, metadata: Mapping[str, str]
) -> None:
    """Exports k models of one architecture as one ONNX graph (PATE's teachers).

    The graph takes ``input`` (float32, ``[batch, num_features]``) and returns ``logits``
    (``[batch, k, num_classes]``): every member's logits, which the API turns into votes.

    Raises:
        ValueError: If the metadata is not string-valued or lacks a valid architecture.
    """
    _check_metadata(metadata)
    shape = _shape(metadata)
    members = []
    for state in state_dicts:
        module = _build(shape)
        module.load_state_dict({name: t.detach().cpu() for name, t in state.items()}, strict=True)
        members.append(module)
    ensemble = _Ensemble(members).eval()
    with torch.no_grad():
        model = onnx.load_from_string(_onnx_bytes(ensemble, shape.num_features))
    model.producer_name = "ppml"
    model.doc_string = "ppml PATE teachers: private, never released."
    onnx.helper.set_model_props(model, dict(metadata))
    onnx.checker.check_model(model)
    Path(path).write_bytes(model.SerializeToString())


def load_model(path: Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuilds the module described by the artefact and loads its weights.

    Args:
        path: A file written by ``save_model`` with ``metadata["architecture"]`` set.

    Returns:
        The module (in eval mode, on CPU; behind its input standardisation when the
        architecture records one, as in the ONNX graph) and the file's metadata.

    Raises:
        ValueError: If the architecture metadata is missing or malformed.
    """
    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, str] = dict(handle.metadata() or {})
    module = build_from_metadata(metadata)
    module.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return _with_scaling(_shape(metadata), module).eval(), metadata
