"""A node's data against the federation's schema: pass with its row count, or fail with a
message that names the problem (never a value of the data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ppml.node.data import SchemaMismatch, load_local
from tests.unit.node_helpers import SCHEMA, write_csv


def test_a_matching_file_passes_with_its_row_count(tmp_path: Path) -> None:
    # arrange
    path = write_csv(tmp_path / "data.csv", rows=150)
    # act
    data = load_local(path, target="label", schema=SCHEMA)
    # assert
    assert data.check.ok and data.check.rows == 150 == data.rows
    assert data.check.message == "150 rows, 4 features, labels within the 2 declared classes"
    assert data.x.shape == (150, 4) and data.x.dtype == np.float32
    assert set(data.y.tolist()) <= {0, 1}


def test_every_row_trains_none_is_held_out(tmp_path: Path) -> None:
    data = load_local(write_csv(tmp_path / "d.csv", rows=77), target="label", schema=SCHEMA)
    assert data.rows == 77


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"classes": ["no", "maybe"]}, "label that schema.classes does not declare"),
        ({**SCHEMA, "features": ["a", "b", "x", "d"]}, "feature 3 must be 'x'"),
        ({**SCHEMA, "features": ["a", "b", "c"]}, "declares 3 features; the data has 4"),
        ({"classes": ["no", "yes"], "input_shape": [5]}, "holds 5 values per row"),
        ({"classes": ["no", "yes"], "num_features": 3}, "declares 3 features"),
        ({"classes": ["no", "yes"], "colour": "red"}, "declares colour, which this node"),
        ({"classes": ["no"]}, "schema is invalid: classes"),
    ],
)
def test_a_file_that_does_not_match_fails_with_the_reason(
    tmp_path: Path, schema: dict[str, object], expected: str
) -> None:
    path = write_csv(tmp_path / "data.csv")
    with pytest.raises(SchemaMismatch) as caught:
        load_local(path, target="label", schema=schema)
    assert expected in caught.value.detail


def test_a_missing_target_column_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv")
    with pytest.raises(SchemaMismatch, match="target column 'outcome' is not in the file"):
        load_local(path, target="outcome", schema=SCHEMA)


def test_messages_quote_no_value_of_the_data(tmp_path: Path) -> None:
    # arrange: a label outside the declared set, spelled like a secret
    frame = pd.DataFrame({"a": np.arange(20.0), "label": ["no"] * 19 + ["SECRET-LABEL"]})
    frame.to_csv(tmp_path / "data.csv", index=False)
    # act
    with pytest.raises(SchemaMismatch) as caught:
        load_local(tmp_path / "data.csv", target="label", schema={"classes": ["no", "yes"]})
    # assert
    assert "SECRET" not in caught.value.detail


def test_npz_files_check_the_feature_count_not_names(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(40, 1, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=np.array(["no", "yes"] * 20))
    schema = {"classes": ["no", "yes"], "input_shape": [1, 2, 2], "features": list("abcd")}
    data = load_local(tmp_path / "data.npz", target="ignored", schema=schema)
    assert data.check.ok and data.x.shape == (40, 4)


def test_an_unreadable_file_fails(tmp_path: Path) -> None:
    with pytest.raises(SchemaMismatch, match="cannot be read"):
        load_local(tmp_path / "absent.csv", target="label", schema=SCHEMA)
