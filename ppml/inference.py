"""Predictions from trained models with onnxruntime, inside the API process.

No torch here (the API never imports it): the worker exports each model to ONNX with its
receipt, architecture and class labels in ``metadata_props``, and this module serves it.
Sessions are cached per ``(job id, sha256)``, so a republished artefact is never served
from a stale session.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ppml.architectures import ModelShape
from ppml.storage import IntegrityError

__all__ = ["IntegrityError", "LoadedModel", "ModelCache", "Prediction", "load_model", "softmax"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class Prediction:
    """Class indices ``(n,)`` and probabilities ``(n, K)`` of a batch."""

    indices: np.ndarray
    probabilities: np.ndarray


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 and stable for large logits."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return probabilities


class LoadedModel:
    """An onnxruntime session with what the metadata says about its inputs and outputs."""

    def __init__(self, session: ort.InferenceSession, metadata: dict[str, str]) -> None:
        self.session = session
        self.metadata = metadata
        shape = ModelShape.from_metadata(metadata["architecture"])
        self.num_features, self.num_classes = shape.num_features, shape.num_classes
        labels = json.loads(metadata.get("classes", "[]"))
        if len(labels) != self.num_classes:
            labels = list(range(self.num_classes))
        self.classes = [str(label) for label in labels]

    def predict(self, inputs: np.ndarray) -> Prediction:
        """Runs the graph on a float32 ``(n, num_features)`` batch (thread-safe)."""
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
        probabilities = softmax(np.asarray(logits))
        return Prediction(indices=probabilities.argmax(axis=1), probabilities=probabilities)


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    # Models are small and requests concurrent: one thread per run avoids oversubscribing the
    # API's cores (onnxruntime otherwise spins a pool per session).
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def load_model(path: Path, *, sha256: str) -> LoadedModel:
    """Reads an ONNX artefact once, checks its digest, and opens a CPU session on it.

    Raises:
        IntegrityError: If the file's sha256 differs from ``sha256``.
    """
    data = Path(path).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"artefact {Path(path).name} does not match its recorded sha256")
    session = ort.InferenceSession(
        data, sess_options=_session_options(), providers=["CPUExecutionProvider"]
    )
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return LoadedModel(session, metadata)


class ModelCache:
    """A thread-safe LRU of loaded models keyed by ``(job id, sha256)``."""

    def __init__(self, capacity: int = 32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(
        self,
        job_id: str,
        sha256: str,
        source: Path | Callable[[], AbstractContextManager[Path]],
    ) -> LoadedModel:
        """The cached model, or one loaded from ``source`` (and cached): a path, or what
        yields one on a miss only (a local copy fetched from the artefact store)."""
        key = (job_id, sha256)
        with self._lock:
            model = self._items.get(key)
            if model is not None:
                self._items.move_to_end(key)
                return model
        # Load outside the lock: a slow load must not block hits on other models. Two
        # concurrent misses may both load; the first one stored wins.
        if isinstance(source, Path):
            loaded = load_model(source, sha256=sha256)
        else:
            with source() as path:
                loaded = load_model(path, sha256=sha256)
        with self._lock:
            model = self._items.setdefault(key, loaded)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return model
