"""Datasets as validated numpy arrays: built-ins, user uploads, train/test split, ``.npz`` store.

Pure numpy/pandas/pyarrow; this package must never import torch, because the API process
imports it to validate uploads.

Where things live:

* ``arrays``: :class:`DatasetArrays`, :class:`UploadLimits`, and the ``.npz`` store
  (:func:`save_arrays`, :func:`load_arrays`).
* ``builtins``: :func:`load_builtin` (digits, breast_cancer, mnist1d and its cache).
* ``uploads``: :func:`detect_format` and :func:`parse_upload`, which reads with ``tables``
  (CSV and Parquet) or ``npz``; ``inspect``: what an upload would decode to, bounded from
  its headers before anything decodes it (the decompression-bomb guard).
* ``labels``: label and client-id encoding; ``split``: the keyed train/test split and the
  row and seed checks; ``keys``: the keyed hashes behind the split and the partitions;
  ``schema``: :class:`DatasetSchema`, the owner's declared label set and input shape.

Privacy notes:

* No data-dependent preprocessing happens here. Statistics such as feature means computed
  on private rows would leak outside the DP guarantee, so only fixed transforms are used
  (digits / 16, ``log1p`` for breast cancer) and uploads are used exactly as given.
* Error messages name the problem and the column or request field, never a value from the
  file, and reader exceptions (whose messages may quote data) are never chained.
"""

from __future__ import annotations

from ppml.datasets.arrays import DatasetArrays, UploadLimits, load_arrays, save_arrays
from ppml.datasets.builtins import BUILTIN_CLASSES, BUILTIN_INPUT_SHAPES, BUILTINS, load_builtin
from ppml.datasets.keys import new_secret, open_secret, partition_keys, record_keys, seal_secret
from ppml.datasets.schema import DatasetSchema, check_input_shape, parse_schema
from ppml.datasets.uploads import FORMATS, detect_format, parse_upload

__all__ = [
    "BUILTINS",
    "BUILTIN_CLASSES",
    "BUILTIN_INPUT_SHAPES",
    "FORMATS",
    "DatasetArrays",
    "DatasetSchema",
    "UploadLimits",
    "check_input_shape",
    "detect_format",
    "load_arrays",
    "load_builtin",
    "new_secret",
    "open_secret",
    "parse_schema",
    "parse_upload",
    "partition_keys",
    "record_keys",
    "save_arrays",
    "seal_secret",
]
