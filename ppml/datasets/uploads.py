"""User uploads: format detection, then validation and the train/test split."""

from __future__ import annotations

from pathlib import Path

from ppml.datasets.arrays import DatasetArrays, UploadLimits
from ppml.datasets.inspect import inspect_upload
from ppml.datasets.keys import new_secret
from ppml.datasets.labels import encode_clients, encode_labels
from ppml.datasets.npz import read_npz
from ppml.datasets.schema import DatasetSchema
from ppml.datasets.split import split
from ppml.datasets.tables import read_table
from ppml.errors import InvalidInput, MalformedFile, PayloadTooLarge, PPMLError

FORMATS: tuple[str, ...] = ("csv", "parquet", "npz")

_EXTENSIONS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
_MAGIC = ((b"PAR1", "parquet"), (b"PK\x03\x04", "npz"), (b"PK\x05\x06", "npz"))


def detect_format(filename: str, head: bytes) -> str:
    """Tell an upload's format from its first bytes, falling back to the file name's extension.

    Parquet (``PAR1``) and NPZ (a zip, ``PK\\x03\\x04``) are recognised by their magic bytes;
    a file without either is CSV only when its name ends in ``.csv``. The name is used only
    for its extension, never as a path.

    Args:
        filename: the client-supplied file name.
        head: the first bytes of the file (at least 4).

    Returns:
        ``"csv"``, ``"parquet"`` or ``"npz"``.

    Raises:
        MalformedFile: the content contradicts the extension, or neither is recognised.
    """
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    ext = "." + base.rsplit(".", 1)[-1] if "." in base else ""
    by_ext = _EXTENSIONS.get(ext)
    by_magic = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
    if by_magic is not None:
        if by_ext is not None and by_ext != by_magic:
            raise MalformedFile(
                f"the file's content does not match its {ext} extension", field="file"
            )
        return by_magic
    if by_ext == "csv":
        return "csv"
    if by_ext is not None:
        raise MalformedFile(f"the file is not a valid {by_ext} file", field="file")
    raise MalformedFile(
        "unrecognised file format; upload CSV (.csv), Parquet (.parquet) or NPZ (.npz)",
        field="file",
    )


def parse_upload(
    path: Path,
    *,
    file_format: str,
    target: str | None,
    client_column: str | None = None,
    limits: UploadLimits = UploadLimits(),
    test_fraction: float = 0.2,
    secret: str | None = None,
    unit: str = "record",
    schema: DatasetSchema | None = None,
) -> DatasetArrays:
    """Validate an uploaded file and split it into train and held-out test arrays.

    Features are used exactly as given: no scaling is fitted on the data, because such
    statistics would leak outside the DP guarantee. Owners should pre-scale features to a
    small range (for example [0, 1]) before uploading.

    CSV: comma-separated UTF-8 with a header row; every column but the target and the
    client column must be numeric, finite and present in every row. Parquet: the same
    rules. NPZ: arrays ``x`` (2-D numeric) and ``y`` (1-D labels); ``target`` is ignored,
    and ``client_column`` names a 1-D array of client ids (conventionally ``clients``).
    Labels may be any numbers or strings. With a ``schema``, class ``i`` is the ``i``-th
    declared class (numbers match their usual spelling: 1.0 matches ``"1"``) and a label
    outside the declared set is refused; without one (public data), the classes are the
    distinct labels in sorted order. Each privacy unit (a record, or with ``unit="client"``
    a whole client) is held out by itself, by a keyed hash under ``secret``.

    Args:
        path: the stored upload (a server-side path).
        file_format: ``"csv"``, ``"parquet"`` or ``"npz"`` (see :func:`detect_format`).
        target: the label column (CSV and Parquet).
        client_column: the column (NPZ: array) holding each row's federated client.
        limits: size limits checked before the file is read in full.
        test_fraction: probability that a unit is held out for testing, in (0, 1).
        secret: the dataset's split secret (hex); None draws a fresh one, so the split
            cannot be reproduced (the service always passes the stored secret).
        unit: the privacy unit, ``"record"`` or ``"client"``.
        schema: the declared schema; its classes name the labels.

    Returns:
        The split dataset; ``clients_train`` is set when ``client_column`` was given.

    Raises:
        MalformedFile: the file cannot be parsed, or holds missing, non-finite or
            non-numeric values.
        InvalidInput: bad arguments, a missing target or client column, a label outside
            the declared classes (``field="schema.classes"``), fewer than 2 or more than
            ``limits.max_classes`` classes, or too few rows to split.
        PayloadTooLarge: the file exceeds ``limits``, its decoded size included (checked
            from its headers before decoding: :func:`ppml.datasets.inspect.inspect_upload`).
    """
    if file_format not in FORMATS:
        raise InvalidInput(f"file format must be one of {', '.join(FORMATS)}", field="file")
    if not 0.0 < test_fraction < 1.0:
        raise InvalidInput("test_fraction must be between 0 and 1", field="test_fraction")
    if client_column is not None and client_column == target:
        raise InvalidInput("client_column must differ from target", field="client_column")
    try:
        # The decoded-size bound again, before decoding: limits may have changed since the
        # upload was accepted, and callers other than the service must be guarded too.
        inspect_upload(
            path, file_format=file_format, target=target, client_column=client_column, limits=limits
        )
        if file_format == "npz":
            x, y_raw, c_raw, names = read_npz(path, client_column, limits)
        else:
            x, y_raw, c_raw, names = read_table(path, file_format, target, client_column, limits)
    except PPMLError:
        raise
    except MemoryError:
        raise PayloadTooLarge("the file is too large to load", field="file") from None
    except Exception:  # reader messages may quote data: never chain or echo them
        raise MalformedFile(f"the file could not be read as {file_format}", field="file") from None
    y, classes = encode_labels(y_raw, limits, tuple(schema.classes) if schema else None)
    clients, client_ids = encode_clients(c_raw) if c_raw is not None else (None, None)
    return split(
        x,
        y,
        clients,
        classes,
        names,
        secret=secret if secret is not None else new_secret(),
        test_fraction=test_fraction,
        unit=unit,
        client_ids=client_ids,
    )
