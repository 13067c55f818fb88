"""Decompression bombs within the upload limits (issue #15, finding 3), written to disk in
chunks so that building them costs the test process little memory.

* Parquet: 10⁶ rows × 100 constant columns, about 0.5 MB, decoding to 800 MB.
* NPZ: ``x`` of 10⁶ × 62 float64 zeros, deflated to about 0.5 MB, decoding to 496 MB.
* CSV: a 10,000-column header, then one short line per row: each row decodes to a full
  row of missing values.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np


def parquet_bomb(path: Path, *, rows: int = 1_000_000, columns: int = 100) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    step = 100_000
    zeros = pa.array(np.zeros(step))  # one buffer, shared by every column of every batch
    labels = pa.array(np.arange(step) % 2)
    names = [f"c{j}" for j in range(columns)] + ["label"]
    batch = pa.Table.from_arrays([zeros] * columns + [labels], names=names)
    with pq.ParquetWriter(path, batch.schema, compression="zstd") as writer:
        for _ in range(rows // step):
            writer.write_table(batch)
    return path


def npz_bomb(path: Path, *, rows: int = 1_000_000, columns: int = 62) -> Path:
    header = {"descr": "<f8", "fortran_order": False, "shape": (rows, columns)}
    chunk = np.zeros((10_000, columns)).tobytes()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for _ in range(rows // 10_000):
                member.write(chunk)
        archive.writestr("y.npy", _npy(np.arange(rows) % 2))
    return path


def csv_bomb(path: Path, *, rows: int = 500_000, columns: int = 10_000) -> Path:
    with path.open("wb") as out:
        out.write((",".join(f"c{j}" for j in range(columns - 1)) + ",label\n").encode())
        out.write(b"1\n" * rows)
    return path


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
