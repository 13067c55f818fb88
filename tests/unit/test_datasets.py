"""Tests of ppml.datasets: built-ins, upload parsing and its refusals, the .npz store."""

from __future__ import annotations

import io
import pickle
import random
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ppml import datasets
from ppml.datasets import (
    DatasetArrays,
    DatasetSchema,
    UploadLimits,
    detect_format,
    load_arrays,
    load_builtin,
    parse_upload,
    save_arrays,
)
from ppml.datasets.inspect import inspect_upload
from ppml.datasets.split import held_out
from ppml.errors import InvalidInput, MalformedFile, PayloadTooLarge, PPMLError
from ppml.storage import LocalStore

SECRET = "8675309.25"  # planted in files; must never appear in an error
SECRET_WORD = "hunter2-secret"
KEY = "5e" * 32  # a fixed split secret, so that small splits are reproducible here


def within_binomial(n_test: int, n: int, fraction: float = 0.2) -> bool:
    """A keyed split holds each unit out by a coin flip: n_test ~ Binomial(n, fraction)."""
    return abs(n_test - fraction * n) <= 6 * (n * fraction * (1 - fraction)) ** 0.5


# ----------------------------------------------------------------------------- helpers


def write_csv(path: Path, header: list[str], rows: Sequence[Sequence[object]]) -> Path:
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def numeric_rows(
    n: int, *, label: object = None, secret_row: int | None = None
) -> list[list[object]]:
    rng = np.random.default_rng(0)
    rows: list[list[object]] = []
    for i in range(n):
        a, b = (round(float(v), 3) for v in rng.random(2))
        rows.append([a, SECRET if i == secret_row else b, label if label is not None else i % 2])
    return rows


def assert_private(err: PPMLError, *secrets: str) -> None:
    text = f"{err} {err.detail} {err.extra!r}"
    for secret in (SECRET, SECRET_WORD, *secrets):
        assert secret not in text
    assert err.__cause__ is None  # reader messages (which may quote data) are not chained


def write_npz(path: Path, **arrays: Any) -> Path:
    with path.open("wb") as f:
        np.savez(f, **arrays)
    return path


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    ("name", "n_total", "num_features", "classes"),
    [
        ("digits", 1797, 64, tuple(str(i) for i in range(10))),
        ("breast_cancer", 569, 30, ("malignant", "benign")),
    ],
)
def test_sklearn_builtins_have_expected_shapes(
    name: str, n_total: int, num_features: int, classes: tuple[str, ...]
) -> None:
    # act
    data = load_builtin(name, seed=0, secret=KEY)

    # assert: sizes vary with the secret (each record is held out by itself)
    assert data.n_train + data.n_test == n_total
    assert within_binomial(data.n_test, n_total)
    assert data.num_features == num_features == len(data.feature_names)
    assert data.classes == classes and data.num_classes == len(classes)  # the declared sets
    assert data.x_train.dtype == np.float32 and data.x_train.flags.c_contiguous
    assert data.y_train.dtype == np.int64
    assert set(np.unique(data.y_test)) <= set(range(len(classes)))
    assert data.num_clients is None and data.clients_test is None


def test_digits_use_fixed_scaling_to_unit_range() -> None:
    # act
    data = load_builtin("digits")

    # assert
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_sklearn_builtins_split_is_deterministic_per_secret(name: str) -> None:
    # act
    first, again, other = (load_builtin(name, secret=s) for s in (KEY, KEY, "a1" * 32))

    # assert
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    assert not np.array_equal(first.y_train, other.y_train)


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DatasetArrays]:
    cache_dir = tmp_path_factory.mktemp("mnist1d")
    data = load_builtin("mnist1d", seed=1, cache=LocalStore(cache_dir), secret=KEY)
    return cache_dir, data


def test_mnist1d_has_expected_shapes(mnist1d_cache: tuple[Path, DatasetArrays]) -> None:
    # arrange
    _, data = mnist1d_cache

    # assert
    assert data.n_train + data.n_test == 10_000  # generated train and test, pooled
    assert within_binomial(data.n_test, 10_000)
    assert data.num_features == 40 and data.num_classes == 10
    assert data.x_train.dtype == np.float32


def test_mnist1d_is_cached_and_deterministic(
    mnist1d_cache: tuple[Path, DatasetArrays],
) -> None:
    # arrange
    cache_dir, first = mnist1d_cache
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)

    # act
    start = time.perf_counter()
    cached = load_builtin("mnist1d", seed=1, cache=LocalStore(cache_dir), secret=KEY)
    cached_seconds = time.perf_counter() - start
    regenerated = load_builtin("mnist1d", seed=1, secret=KEY)

    # assert
    assert (cache_dir / "cache" / "mnist1d-v1-seed1.npz").is_file()
    assert cached_seconds < 1.0
    for other in (cached, regenerated):
        np.testing.assert_array_equal(first.x_train, other.x_train)
        np.testing.assert_array_equal(first.y_test, other.y_test)
    assert (np.random.random(), random.random()) == expected  # global RNGs untouched


def test_unknown_builtin_is_refused_with_valid_names() -> None:
    # act
    with pytest.raises(InvalidInput) as exc:
        load_builtin("imagenet")

    # assert
    assert exc.value.field == "source.builtin"
    assert all(name in exc.value.detail for name in datasets.BUILTINS)


def test_module_does_not_import_torch() -> None:
    # arrange: a fresh interpreter, since other tests may have imported torch
    code = "import sys, ppml.datasets; sys.exit('torch' in sys.modules)"

    # act
    result = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)

    # assert: the API process imports this module and must stay torch-free
    assert result.returncode == 0


# ----------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(
    ("filename", "head", "expected"),
    [
        ("data.csv", b"a,b,c\n1,2", "csv"),
        ("DATA.CSV", b"a,b", "csv"),
        ("data.parquet", b"PAR1\x15\x04", "parquet"),
        ("blob.bin", b"PAR1\x15\x04", "parquet"),
        ("arrays.npz", b"PK\x03\x04\x14", "npz"),
        ("noext", b"PK\x03\x04\x14", "npz"),
        ("../../etc/x.csv", b"a,b", "csv"),
    ],
)
def test_detect_format_uses_magic_then_extension(filename: str, head: bytes, expected: str) -> None:
    # act / assert
    assert detect_format(filename, head) == expected


@pytest.mark.parametrize(
    ("filename", "head"),
    [
        ("data.csv", b"PK\x03\x04"),  # a zip pretending to be CSV
        ("data.parquet", b"PK\x03\x04"),
        ("data.npz", pickle.dumps({"x": 1})[:8]),  # pickle renamed .npz
        ("data.parquet", b"a,b\n"),
        ("data.xlsx", b"a,b\n"),
        ("noext", b"a,b\n"),
    ],
)
def test_detect_format_refuses_mismatch_or_unknown(filename: str, head: bytes) -> None:
    # act / assert
    with pytest.raises(MalformedFile):
        detect_format(filename, head)


# ----------------------------------------------------------------------------- CSV


def test_csv_with_numeric_labels(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(50))

    # act
    data = parse_upload(path, file_format="csv", target="label", secret=KEY)

    # assert
    assert data.feature_names == ("a", "b")
    assert data.classes == ("0", "1")
    assert data.n_train + data.n_test == 50 and data.n_test > 0
    assert data.x_train.dtype == np.float32 and data.x_train.flags.c_contiguous
    assert data.clients_train is None and data.num_clients is None


def test_csv_labels_sort_numerically_and_keep_originals(tmp_path: Path) -> None:
    # arrange
    rows = [[i, [10, 2, 7][i % 3]] for i in range(30)]
    path = write_csv(tmp_path / "d.csv", ["f", "y"], rows)

    # act
    data = parse_upload(path, file_format="csv", target="y", secret=KEY)

    # assert
    assert data.classes == ("2", "7", "10")


def test_csv_with_string_labels_and_client_column(tmp_path: Path) -> None:
    # arrange: label column first, client ids are strings
    rows = [
        [["cat", "dog", "emu"][i % 3], f"client-{i % 4}", i / 10, (i % 7) / 7] for i in range(60)
    ]
    path = write_csv(tmp_path / "d.csv", ["species", "site", "f1", "f2"], rows)

    # act
    data = parse_upload(path, file_format="csv", target="species", client_column="site", secret=KEY)

    # assert
    assert data.classes == ("cat", "dog", "emu")
    assert data.feature_names == ("f1", "f2")
    assert data.clients_train is not None and data.clients_train.dtype == np.int64
    assert data.num_clients == 4
    assert set(data.clients_train.tolist()) == {0, 1, 2, 3}
    assert len(data.clients_train) == data.n_train


def test_csv_split_is_deterministic_per_secret_and_keyed_per_row(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(100))

    # act
    first, again = (parse_upload(path, file_format="csv", target="label", secret=KEY) for _ in "12")
    other = parse_upload(path, file_format="csv", target="label", secret="a1" * 32)

    # assert: each row's side is the keyed hash of its own features and label
    np.testing.assert_array_equal(first.x_train, again.x_train)
    assert not np.array_equal(first.x_test, other.x_test)
    x = np.concatenate([first.x_train, first.x_test])
    labels = np.asarray(first.classes)[np.concatenate([first.y_train, first.y_test])]
    held = held_out(x, labels, secret=KEY, test_fraction=0.2)
    assert held.tolist() == [False] * first.n_train + [True] * first.n_test


def test_tiny_class_is_split_like_any_other_row(tmp_path: Path) -> None:
    # arrange: class 2 has a single row (a stratified split had to special-case it)
    rows = numeric_rows(30)
    rows[0][2] = 2
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows)

    # act
    data = parse_upload(path, file_format="csv", target="label", secret=KEY)

    # assert
    assert data.num_classes == 3
    assert data.n_train + data.n_test == 30 and data.n_test > 0


@pytest.mark.parametrize(
    ("make_rows", "column"),
    [
        (lambda rows: rows[3].__setitem__(1, SECRET_WORD), "'b'"),  # string in numeric column
        (lambda rows: rows[3].__setitem__(1, ""), "'b'"),  # empty cell
        (lambda rows: rows[3].__setitem__(1, "nan"), "'b'"),
        (lambda rows: rows[3].__setitem__(1, "inf"), "'b'"),
        (lambda rows: rows[3].__setitem__(1, "-1e400"), "'b'"),  # beyond float range
        (lambda rows: rows[3].__setitem__(0, "1e39"), "'a'"),  # beyond float32 range
    ],
    ids=["string", "empty", "nan", "inf", "overflow", "float32-overflow"],
)
def test_csv_bad_feature_values_are_refused_naming_the_column(
    tmp_path: Path, make_rows: Callable[[list[list[object]]], None], column: str
) -> None:
    # arrange
    rows = numeric_rows(20, secret_row=5)
    make_rows(rows)
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows)

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="csv", target="label")

    # assert
    assert exc.value.field == "file"
    assert column in exc.value.detail
    assert_private(exc.value)


def test_numeric_looking_column_name_is_shown_by_position_only(tmp_path: Path) -> None:
    # arrange: a file without a header row; its first data row became the header
    rows = numeric_rows(20)
    rows[4][1] = SECRET_WORD
    path = write_csv(tmp_path / "d.csv", ["0.5", SECRET, "label"], rows)

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="csv", target="label")

    # assert
    assert "column 2" in exc.value.detail
    assert_private(exc.value)


def test_csv_missing_target_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(20, secret_row=1))

    # act
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="csv", target="species")

    # assert
    assert exc.value.field == "target"
    assert_private(exc.value)


def test_target_is_required_for_tables(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(20))

    # act / assert
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="csv", target=None)
    assert exc.value.field == "target"


def test_csv_missing_client_column_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(20))

    # act
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="csv", target="label", client_column="site")

    # assert
    assert exc.value.field == "client_column"


def test_csv_single_class_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(20, label=SECRET_WORD))

    # act
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="csv", target="label")

    # assert
    assert exc.value.field == "target"
    assert_private(exc.value)


def test_csv_missing_label_is_refused(tmp_path: Path) -> None:
    # arrange
    rows = numeric_rows(20, secret_row=2)
    rows[7][2] = ""
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows)

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="csv", target="label")

    # assert
    assert exc.value.field == "target"
    assert_private(exc.value)


def test_too_many_classes_is_refused(tmp_path: Path) -> None:
    # arrange
    rows = [[i, i % 5] for i in range(40)]
    path = write_csv(tmp_path / "d.csv", ["f", "y"], rows)

    # act
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="csv", target="y", limits=UploadLimits(max_classes=4))

    # assert
    assert exc.value.field == "target"


def test_csv_duplicate_column_names_are_refused(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "a", "label"], numeric_rows(20))

    # act / assert
    with pytest.raises(MalformedFile, match="duplicate"):
        parse_upload(path, file_format="csv", target="label")


def test_csv_with_a_million_columns_is_refused_fast_without_parsing_the_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # arrange
    path = tmp_path / "wide.csv"
    header = ",".join(f"c{i}" for i in range(1_000_000))
    path.write_text(header + "\n" + ",".join(["1"] * 1_000_000) + "\n")

    def no_body_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the body must not be parsed")

    monkeypatch.setattr(pd, "read_csv", no_body_parse)

    # act
    start = time.perf_counter()
    with pytest.raises(PayloadTooLarge) as exc:
        parse_upload(path, file_format="csv", target="c0")
    seconds = time.perf_counter() - start

    # assert
    assert "columns" in exc.value.detail
    assert seconds < 2.0


def test_csv_header_line_longer_than_the_cap_is_refused(tmp_path: Path) -> None:
    # arrange: one line without any newline, far beyond the per-column cap
    path = tmp_path / "line.csv"
    path.write_bytes(b"a" * 20_000)

    # act / assert
    with pytest.raises(PayloadTooLarge):
        parse_upload(path, file_format="csv", target="a", limits=UploadLimits(max_columns=10))


def test_csv_too_many_rows_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(30))

    # act
    with pytest.raises(PayloadTooLarge) as exc:
        parse_upload(path, file_format="csv", target="label", limits=UploadLimits(max_rows=25))

    # assert
    assert "rows" in exc.value.detail


def test_ragged_csv_is_refused_without_leaking(tmp_path: Path) -> None:
    # arrange
    rows = numeric_rows(20)
    rows[6].append(SECRET)
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows)

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="csv", target="label")

    # assert
    assert exc.value.field == "file"
    assert_private(exc.value)


@pytest.mark.parametrize(
    "content", [b"", b"\n\n", b"a,b,label\n"], ids=["empty", "blank", "header"]
)
def test_empty_csv_is_refused(tmp_path: Path, content: bytes) -> None:
    # arrange
    path = tmp_path / "d.csv"
    path.write_bytes(content)

    # act / assert
    with pytest.raises(InvalidInput):  # MalformedFile is a subclass
        parse_upload(path, file_format="csv", target="label")


def test_csv_bad_encoding_is_refused(tmp_path: Path) -> None:
    # arrange
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,b,label\n" + b"1,2,\xff\xfe\n" * 20)

    # act / assert
    with pytest.raises(MalformedFile):
        parse_upload(path, file_format="csv", target="label")


def test_fewer_than_ten_rows_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(9))

    # act / assert
    with pytest.raises(InvalidInput):
        parse_upload(path, file_format="csv", target="label")


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1 - 1e-9])  # the last empties train
def test_bad_test_fraction_is_refused(tmp_path: Path, fraction: float) -> None:
    # arrange
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], numeric_rows(20))

    # act
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="csv", target="label", test_fraction=fraction, secret=KEY)

    # assert
    assert exc.value.field == "test_fraction"


def test_unknown_file_format_is_refused(tmp_path: Path) -> None:
    # act / assert
    with pytest.raises(InvalidInput):
        parse_upload(tmp_path / "d.xlsx", file_format="xlsx", target="label")


# ----------------------------------------------------------------------------- Parquet


def write_parquet(path: Path, columns: dict[str, list[object]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_with_string_labels_and_client_column(tmp_path: Path) -> None:
    # arrange
    n = 40
    path = write_parquet(
        tmp_path / "d.parquet",
        {
            "x1": [float(i) for i in range(n)],
            "x2": list(range(n)),
            "label": [["no", "yes"][i % 2] for i in range(n)],
            "hospital": [i % 3 for i in range(n)],
        },
    )

    # act
    data = parse_upload(
        path, file_format="parquet", target="label", client_column="hospital", secret=KEY
    )

    # assert
    assert data.classes == ("no", "yes")
    assert data.feature_names == ("x1", "x2")
    assert data.num_clients == 3
    assert data.n_train + data.n_test == n


def test_parquet_non_numeric_feature_is_refused(tmp_path: Path) -> None:
    # arrange
    n = 20
    path = write_parquet(
        tmp_path / "d.parquet",
        {"name": [SECRET_WORD] * n, "x": [1.0] * n, "label": [i % 2 for i in range(n)]},
    )

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="parquet", target="label")

    # assert
    assert "'name'" in exc.value.detail and "numeric" in exc.value.detail
    assert_private(exc.value)


def test_parquet_null_feature_is_refused(tmp_path: Path) -> None:
    # arrange
    n = 20
    path = write_parquet(
        tmp_path / "d.parquet",
        {"x": [None, *[float(SECRET)] * (n - 1)], "label": [i % 2 for i in range(n)]},
    )

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="parquet", target="label")

    # assert
    assert "'x'" in exc.value.detail
    assert_private(exc.value)


@pytest.mark.parametrize(
    "limits", [UploadLimits(max_rows=10), UploadLimits(max_columns=2)], ids=["rows", "columns"]
)
def test_parquet_over_limits_is_refused_from_metadata(tmp_path: Path, limits: UploadLimits) -> None:
    # arrange
    n = 20
    path = write_parquet(
        tmp_path / "d.parquet",
        {"a": [1.0] * n, "b": [2.0] * n, "label": [i % 2 for i in range(n)]},
    )

    # act / assert
    with pytest.raises(PayloadTooLarge):
        parse_upload(path, file_format="parquet", target="label", limits=limits)


def test_parquet_missing_target_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_parquet(tmp_path / "d.parquet", {"a": [1.0] * 20, "label": [0, 1] * 10})

    # act / assert
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="parquet", target="y")
    assert exc.value.field == "target"


def test_garbage_parquet_is_refused(tmp_path: Path) -> None:
    # arrange
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1" + SECRET.encode() * 10)

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="parquet", target="label")

    # assert
    assert_private(exc.value)


# ----------------------------------------------------------------------------- NPZ


def test_npz_with_string_labels_and_clients(tmp_path: Path) -> None:
    # arrange
    n = 50
    rng = np.random.default_rng(0)
    path = write_npz(
        tmp_path / "d.npz",
        x=rng.random((n, 3)),
        y=np.array(["a", "b"] * (n // 2)),
        clients=np.arange(n) % 5,
    )

    # act
    data = parse_upload(path, file_format="npz", target=None, client_column="clients", secret=KEY)

    # assert
    assert data.feature_names == ("x0", "x1", "x2")
    assert data.classes == ("a", "b")
    assert data.num_clients == 5
    assert data.x_train.dtype == np.float32


def test_npz_without_client_column_ignores_clients_and_target(tmp_path: Path) -> None:
    # arrange
    n = 20
    path = write_npz(
        tmp_path / "d.npz",
        x=np.arange(2.0 * n).reshape(n, 2),  # distinct rows: equal rows share a side
        y=np.arange(n) % 2,
        clients=np.arange(n),
    )

    # act
    data = parse_upload(path, file_format="npz", target="whatever", secret=KEY)

    # assert
    assert data.clients_train is None
    assert data.num_features == 2


@pytest.mark.parametrize(
    ("image", "row_shape"), [((2, 3, 4), (2, 3, 4)), ((3, 4), (1, 3, 4))], ids=["nchw", "nhw"]
)
def test_npz_images_become_flat_rows_in_c_order_and_declare_their_shape(
    tmp_path: Path, image: tuple[int, ...], row_shape: tuple[int, ...]
) -> None:
    # arrange: each image numbered so that its flat row can be checked
    n, size = 30, int(np.prod(image))
    x = (np.arange(n * size, dtype=np.float32) / 1000).reshape(n, *image)
    path = write_npz(tmp_path / "d.npz", x=x, y=np.arange(n) % 2)

    # act
    shape = inspect_upload(
        path, file_format="npz", target=None, client_column=None, limits=UploadLimits()
    )
    data = parse_upload(path, file_format="npz", target=None, secret=KEY)

    # assert
    assert (shape.features, shape.row_shape) == (size, row_shape)
    assert data.num_features == size and data.feature_names[-1] == f"x{size - 1}"
    rows = np.concatenate([data.x_train, data.x_test])
    flat = {tuple(row) for row in x.reshape(n, -1)}
    assert {tuple(row) for row in rows} == flat


def test_npz_images_count_their_pixels_against_the_column_limit(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", x=np.zeros((20, 3, 8, 8)), y=np.arange(20) % 2)

    with pytest.raises(PayloadTooLarge, match="more than 100 columns"):
        parse_upload(path, file_format="npz", target=None, limits=UploadLimits(max_columns=100))


@pytest.mark.parametrize(
    "schema",
    [
        '{"classes": ["a", "b"], "input_shape": []}',
        '{"classes": ["a", "b"], "input_shape": [1, 1, 8, 8]}',
        '{"classes": ["a", "b"], "input_shape": [0, 8]}',
        '{"classes": ["a", "b"], "input_shape": [8.5]}',
        '{"classes": ["a", "b"], "input_shape": "8x8"}',
    ],
)
def test_a_malformed_input_shape_is_refused_naming_it(schema: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        datasets.parse_schema(schema, max_classes=10)

    assert exc.value.field == "schema.input_shape"


def test_an_input_shape_must_hold_exactly_the_features() -> None:
    datasets.check_input_shape([1, 8, 8], 64)
    datasets.check_input_shape(None, 5)
    with pytest.raises(InvalidInput, match=r"holds 64 values per row; the data has 63") as exc:
        datasets.check_input_shape([1, 8, 8], 63)
    assert exc.value.field == "schema.input_shape"


def test_digits_declare_their_8x8_images_and_mnist1d_its_signals() -> None:
    assert datasets.BUILTIN_INPUT_SHAPES == {"digits": (1, 8, 8), "mnist1d": (1, 40)}


def test_npz_missing_client_array_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_npz(tmp_path / "d.npz", x=np.ones((20, 2)), y=np.arange(20) % 2)

    # act / assert
    with pytest.raises(InvalidInput) as exc:
        parse_upload(path, file_format="npz", target=None, client_column="clients")
    assert exc.value.field == "client_column"


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.ones(20), "y": np.arange(20) % 2},  # x not 2-D
        {"x": np.ones((20, 1, 2, 2, 2)), "y": np.arange(20) % 2},  # x past (n, C, H, W)
        {"x": np.ones((20, 2)), "y": np.arange(19) % 2},  # length mismatch
        {"x": np.full((20, 2), "a"), "y": np.arange(20) % 2},  # non-numeric x
        {"x": np.ones((20, 2))},  # no y
    ],
    ids=["x-1d", "x-5d", "length", "x-strings", "no-y"],
)
def test_npz_bad_arrays_are_refused(tmp_path: Path, arrays: dict[str, np.ndarray]) -> None:
    # arrange
    path = write_npz(tmp_path / "d.npz", **arrays)

    # act / assert
    with pytest.raises(MalformedFile):
        parse_upload(path, file_format="npz", target=None)


def test_npz_non_finite_features_are_refused(tmp_path: Path) -> None:
    # arrange
    x = np.full((20, 3), float(SECRET))
    x[4, 2] = np.inf
    path = write_npz(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="npz", target=None)

    # assert
    assert "x2" in exc.value.detail
    assert_private(exc.value)


def test_npz_object_array_is_refused(tmp_path: Path) -> None:
    # arrange: np.savez pickles object arrays
    y = np.array([SECRET_WORD, 1] * 10, dtype=object)
    path = write_npz(tmp_path / "d.npz", x=np.ones((20, 2)), y=y)

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="npz", target=None)

    # assert
    assert_private(exc.value)


def test_pickle_renamed_npz_is_refused(tmp_path: Path) -> None:
    # arrange
    path = tmp_path / "d.npz"
    path.write_bytes(pickle.dumps({"x": np.ones((20, 2)), "y": SECRET_WORD}))

    # act
    with pytest.raises(MalformedFile) as exc:
        parse_upload(path, file_format="npz", target=None)

    # assert
    assert_private(exc.value)


def test_npz_with_non_npy_member_is_refused(tmp_path: Path) -> None:
    # arrange
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", b"")
        zf.writestr("payload.pkl", pickle.dumps(SECRET_WORD))

    # act / assert
    with pytest.raises(MalformedFile):
        parse_upload(path, file_format="npz", target=None)


def test_npz_zip_bomb_of_zeros_is_refused(tmp_path: Path) -> None:
    # arrange: 4 MiB of zeros compress to a few KiB
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", bytes(4 * 1024**2))
    assert path.stat().st_size < 64 * 1024

    # act / assert
    with pytest.raises(PayloadTooLarge):
        parse_upload(
            path,
            file_format="npz",
            target=None,
            limits=UploadLimits(max_uncompressed_bytes=1024**2),
        )


def test_npz_declaring_a_huge_member_is_refused_with_default_limits(tmp_path: Path) -> None:
    # arrange: a tiny zip whose directory claims a 3 GiB member
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", bytes(1024))
    raw = bytearray(buffer.getvalue())
    central = raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, 3 * 1024**3)  # uncompressed size field
    path = tmp_path / "bomb.npz"
    path.write_bytes(bytes(raw))

    # act / assert
    with pytest.raises(PayloadTooLarge):
        parse_upload(path, file_format="npz", target=None)


def test_npz_header_claiming_more_data_than_stored_is_refused(tmp_path: Path) -> None:
    # arrange: an .npy header for 10^12 floats followed by no data
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    )
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", member.getvalue())
        zf.writestr("y.npy", member.getvalue())

    # act / assert
    with pytest.raises(MalformedFile):
        parse_upload(path, file_format="npz", target=None)


def test_npz_too_many_rows_is_refused(tmp_path: Path) -> None:
    # arrange
    path = write_npz(tmp_path / "d.npz", x=np.ones((30, 2)), y=np.arange(30) % 2)

    # act / assert
    with pytest.raises(PayloadTooLarge):
        parse_upload(path, file_format="npz", target=None, limits=UploadLimits(max_rows=20))


# ----------------------------------------------------------------------------- store


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    # arrange
    rows = [[["cat", "dog"][i % 2], f"c{i % 3}", i / 10, 1.0] for i in range(30)]
    csv_path = write_csv(tmp_path / "d.csv", ["y", "site", "f1", "f2"], rows)
    data = parse_upload(
        csv_path, file_format="csv", target="y", client_column="site", secret=KEY, unit="client"
    )
    path = tmp_path / "store" / "arrays.npz"
    path.parent.mkdir()

    # act
    save_arrays(data, path)
    loaded = load_arrays(path)

    # assert
    for name in ("x_train", "y_train", "x_test", "y_test", "clients_train", "clients_test"):
        np.testing.assert_array_equal(getattr(data, name), getattr(loaded, name))
    assert loaded.classes == data.classes and loaded.feature_names == data.feature_names
    assert loaded.num_clients == data.num_clients
    assert loaded.num_test_clients == data.num_test_clients
    assert [p.name for p in path.parent.iterdir()] == ["arrays.npz"]  # no temp file left


def test_round_trip_without_clients(tmp_path: Path) -> None:
    # arrange
    data = load_builtin("breast_cancer")
    path = tmp_path / "bc.npz"

    # act
    save_arrays(data, path)
    loaded = load_arrays(path)

    # assert
    assert loaded.clients_train is None and loaded.clients_test is None
    np.testing.assert_array_equal(loaded.x_test, data.x_test)


@pytest.mark.parametrize("content", [b"", b"not a zip", pickle.dumps([1, 2])])
def test_load_damaged_store_is_refused(tmp_path: Path, content: bytes) -> None:
    # arrange
    path = tmp_path / "bad.npz"
    path.write_bytes(content)

    # act / assert
    with pytest.raises(MalformedFile):
        load_arrays(path)


def test_store_without_clients_test_still_loads(tmp_path: Path) -> None:
    # arrange: a file as written before client-unit splits (no clients_test member)
    data = load_builtin("breast_cancer", secret=KEY)
    path = tmp_path / "old.npz"
    save_arrays(data, path)
    with np.load(path) as npz:
        members = {k: npz[k] for k in npz.files if k != "clients_test"}
    write_npz(path, **members, clients_train=np.zeros(data.n_train, dtype=np.int64))

    # act
    loaded = load_arrays(path)

    # assert
    assert loaded.clients_test is None and loaded.num_test_clients is None
    assert loaded.num_clients == 1


# ----------------------------------------------------------------------------- client unit


def client_csv(path: Path, num_clients: int, rows_per_client: int = 5) -> Path:
    rows = [
        [f"site-{c}", c + r / 10, r, ["no", "yes"][(c + r) % 2]]
        for c in range(num_clients)
        for r in range(rows_per_client)
    ]
    return write_csv(path, ["site", "f1", "f2", "label"], rows)


def test_client_unit_split_holds_out_whole_clients(tmp_path: Path) -> None:
    # arrange
    path = client_csv(tmp_path / "d.csv", 40)

    # act
    data = parse_upload(
        path, file_format="csv", target="label", client_column="site", secret=KEY, unit="client"
    )

    # assert: every client lies wholly on one side; the sides count clients apart
    assert data.clients_train is not None and data.clients_test is not None
    assert data.num_clients is not None and data.num_test_clients is not None
    assert data.num_clients + data.num_test_clients == 40
    assert data.n_train == 5 * data.num_clients and data.n_test == 5 * data.num_test_clients
    train_sites = {round(float(f)) for f in data.x_train[:, 0] - data.x_train[:, 1] / 10}
    test_sites = {round(float(f)) for f in data.x_test[:, 0] - data.x_test[:, 1] / 10}
    assert not train_sites & test_sites
    assert within_binomial(data.num_test_clients, 40)


def test_record_unit_split_with_clients_keeps_no_test_clients(tmp_path: Path) -> None:
    # arrange
    path = client_csv(tmp_path / "d.csv", 10)

    # act
    data = parse_upload(path, file_format="csv", target="label", client_column="site", secret=KEY)

    # assert
    assert data.clients_test is None and data.num_test_clients is None


# ----------------------------------------------------------------------------- declared schema


def test_declared_classes_name_the_labels_in_declared_order(tmp_path: Path) -> None:
    # arrange: "unknown" is declared but has no rows, which is fine
    rows = [[i / 40, (i % 7) / 7, ["benign", "malignant"][i % 2]] for i in range(40)]
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows)
    schema = DatasetSchema(classes=["malignant", "unknown", "benign"])

    # act
    data = parse_upload(path, file_format="csv", target="label", secret=KEY, schema=schema)

    # assert: class i is the i-th declared name, whatever the data holds
    assert data.classes == ("malignant", "unknown", "benign")
    x = np.concatenate([data.x_train, data.x_test])
    y = np.concatenate([data.y_train, data.y_test])
    expected = np.where(np.round(x[:, 0] * 40).astype(int) % 2 == 1, 0, 2)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize(
    ("labels", "declared"),
    [
        (np.array([0.0, 1.0] * 10), ["0", "1"]),  # integer-valued floats
        (np.arange(20) % 2, ["0.0", "1"]),  # declared float spellings
        (np.array([True, False] * 10), ["False", "True"]),
        (np.array(["a", "b"] * 10), ["b", "a"]),
    ],
    ids=["float-labels", "float-declared", "bool", "strings"],
)
def test_numeric_labels_match_their_usual_spelling(
    tmp_path: Path, labels: np.ndarray, declared: list[str]
) -> None:
    # arrange
    path = write_npz(tmp_path / "d.npz", x=np.arange(40.0).reshape(20, 2), y=labels)

    # act
    data = parse_upload(
        path, file_format="npz", target=None, secret=KEY, schema=DatasetSchema(classes=declared)
    )

    # assert
    assert data.classes == tuple(declared)
    assert data.n_train + data.n_test == 20


def test_undeclared_label_is_refused_without_echoing_it(tmp_path: Path) -> None:
    # arrange
    rows = numeric_rows(20)
    rows[11][2] = SECRET_WORD
    path = write_csv(tmp_path / "d.csv", ["a", "b", "label"], rows)

    # act
    with pytest.raises(InvalidInput) as exc:
        parse_upload(
            path, file_format="csv", target="label", schema=DatasetSchema(classes=["0", "1"])
        )

    # assert
    assert exc.value.field == "schema.classes"
    assert_private(exc.value)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '["a", "b"]',
        '{"classes": ["a"]}',
        '{"classes": ["a", "a"]}',
        '{"classes": ["1", "1.0"]}',
        '{"classes": ["a", " "]}',
        '{"classes": ["a", "b"], "extra": 1}',
        '{"classes": ["a", 2]}',
        '{"classes": ["a", "b", "c", "d", "e"]}',
    ],
    ids=["json", "list", "one", "dupe", "same-number", "blank", "extra", "non-string", "many"],
)
def test_bad_schema_is_refused_naming_the_field(text: str) -> None:
    # act
    with pytest.raises(InvalidInput) as exc:
        datasets.parse_schema(text, max_classes=4)

    # assert
    assert exc.value.field == "schema"


def test_schema_parses_a_declared_label_set() -> None:
    # act
    schema = datasets.parse_schema('{"classes": ["benign", "malignant"]}', max_classes=4)

    # assert
    assert schema.classes == ["benign", "malignant"]


# --------------------------------------------------------------------- decoded-size bound


def test_csv_bound_counts_lines_not_bytes(tmp_path: Path) -> None:
    # arrange: 100 columns, 1,000 rows of which each is a short line (decodes as full rows)
    from ppml.datasets.inspect import inspect_upload

    path = tmp_path / "short.csv"
    path.write_text(",".join(f"c{j}" for j in range(99)) + ",label\n" + "1\n" * 1000)
    # act
    shape = inspect_upload(
        path, file_format="csv", target="label", client_column=None, limits=UploadLimits()
    )
    # assert: 99 features at 8 + 4 bytes and a text label, per line
    assert (shape.rows, shape.columns) == (1000, 100)
    assert shape.decoded_bytes == 1000 * (99 * 12 + 64)


def test_a_bomb_is_refused_from_its_headers_before_decoding(tmp_path: Path) -> None:
    # arrange: 200,000 × 20 zeros in about 20 KB of Parquet: 32 MB decoded
    zeros = pa.array(np.zeros(200_000))
    table = pa.Table.from_arrays(
        [zeros] * 20 + [pa.array(np.arange(200_000) % 2)],
        names=[f"c{j}" for j in range(20)] + ["label"],
    )
    path = tmp_path / "bomb.parquet"
    pq.write_table(table, path, compression="zstd")
    limits = UploadLimits(max_decoded_bytes=16 * 1024**2)
    # act
    started = time.monotonic()
    with pytest.raises(PayloadTooLarge) as refused:
        parse_upload(path, file_format="parquet", target="label", limits=limits)
    # assert
    assert refused.value.extra["decoded_bytes"] == 200_000 * (20 * 12 + 8)
    assert refused.value.extra["limit"] == 16 * 1024**2
    assert time.monotonic() - started < 0.5 and path.stat().st_size < 200_000


def test_a_text_parquet_feature_is_refused_from_the_schema(tmp_path: Path) -> None:
    from ppml.datasets.inspect import inspect_upload

    frame = pd.DataFrame({"a": [1.0, 2.0], "name": [SECRET_WORD, "x"], "label": [0, 1]})
    path = tmp_path / "text.parquet"
    frame.to_parquet(path)
    with pytest.raises(MalformedFile) as refused:
        inspect_upload(
            path, file_format="parquet", target="label", client_column=None, limits=UploadLimits()
        )
    assert "column 2 ('name') is not numeric" in refused.value.detail
    assert SECRET_WORD not in refused.value.detail
