"""Model artefacts: safetensors weights with the privacy receipt as metadata.

safetensors holds raw tensors and a string-to-string header, so loading an artefact
never executes code (unlike ``torch.load``/pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ppml.training.models import build_model

__all__ = ["ARCHITECTURE_KEY", "architecture_metadata", "load_model", "save_model"]

ARCHITECTURE_KEY = "architecture"
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
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("safetensors metadata keys and values must be strings")
    tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, tmp, metadata=dict(metadata))
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


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
    if ARCHITECTURE_KEY not in metadata:
        raise ValueError("artefact has no architecture metadata")
    try:
        spec = json.loads(metadata[ARCHITECTURE_KEY])
        module = build_model(
            spec["arch"],
            num_features=spec["num_features"],
            num_classes=spec["num_classes"],
            hidden_sizes=spec["hidden_sizes"],
            channels=spec["channels"],
            kernel_size=spec["kernel_size"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError("artefact architecture metadata is malformed") from exc
    module.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return module.eval(), metadata
