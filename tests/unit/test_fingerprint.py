"""Content fingerprints: the same rows in any order and any split match; anything else not."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from ppml.config import Settings
from ppml.datasets import DatasetArrays
from ppml.datasets.fingerprint import content_fingerprint
from ppml.services.fingerprints import fingerprint_key
from ppml.trust.sealing import new_data_key

KEY = bytes(range(32))


def _arrays(
    x: np.ndarray, labels: list[str], classes: tuple[str, ...], test: int = 0
) -> DatasetArrays:
    y = np.asarray([classes.index(label) for label in labels], dtype=np.int64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    cut = len(y) - test
    return DatasetArrays(
        x_train=np.ascontiguousarray(x[:cut]),
        y_train=y[:cut],
        x_test=np.ascontiguousarray(x[cut:]),
        y_test=y[cut:],
        classes=classes,
        feature_names=tuple(f"f{j}" for j in range(x.shape[1])),
    )


ROWS = np.arange(24, dtype=np.float32).reshape(8, 3) / 7
LABELS = ["a", "b"] * 4


def _fingerprint(arrays: DatasetArrays, *, key: bytes = KEY, tenant: str = "ten_a") -> str:
    return content_fingerprint(arrays, key=key, tenant_id=tenant)


def test_the_same_rows_match_whatever_their_order_split_and_class_order() -> None:
    # arrange
    original = _arrays(ROWS, LABELS, ("a", "b"))
    order = np.random.default_rng(0).permutation(len(LABELS))
    shuffled = _arrays(ROWS[order], [LABELS[i] for i in order], ("b", "a"), test=3)
    negative_zero = ROWS.copy()
    negative_zero[0, 0] = -0.0  # it was 0.0
    # act / assert
    assert len(_fingerprint(original)) == 64
    assert _fingerprint(shuffled) == _fingerprint(original)
    assert _fingerprint(_arrays(negative_zero, LABELS, ("a", "b"))) == _fingerprint(original)


def test_a_changed_value_label_row_key_or_tenant_changes_the_fingerprint() -> None:
    # arrange
    original = _fingerprint(_arrays(ROWS, LABELS, ("a", "b")))
    changed = ROWS.copy()
    changed[3, 1] += 1e-3
    relabelled = ["b", *LABELS[1:]]
    # act
    others = [
        _fingerprint(_arrays(changed, LABELS, ("a", "b"))),
        _fingerprint(_arrays(ROWS, relabelled, ("a", "b"))),
        _fingerprint(_arrays(ROWS[1:], LABELS[1:], ("a", "b"))),
        _fingerprint(_arrays(np.vstack([ROWS, ROWS[:1]]), [*LABELS, "a"], ("a", "b"))),
        _fingerprint(_arrays(ROWS, LABELS, ("a", "b")), key=bytes(32)),
        _fingerprint(_arrays(ROWS, LABELS, ("a", "b")), tenant="ten_b"),
    ]
    # assert
    assert original not in others and len(set(others)) == len(others)


def test_the_key_is_derived_from_the_data_key_and_outlives_its_rotation(tmp_path: Path) -> None:
    # arrange
    settings = Settings(data_dir=tmp_path / "data", broker_url="memory://", encryption_key=None)
    # act
    key = fingerprint_key(settings)
    again = fingerprint_key(Settings(data_dir=tmp_path / "data", encryption_key=None))
    old = settings.ensure_encryption_key()
    rotated = Settings(
        data_dir=tmp_path / "data", encryption_key=new_data_key(), encryption_old_keys=old
    )
    other = Settings(data_dir=tmp_path / "other", encryption_key=new_data_key())
    # assert
    assert len(key) == 32 and again == key == fingerprint_key(rotated)
    assert fingerprint_key(other) != key
    assert base64.b64decode(old) != key  # derived, not the data key itself
    assert not (tmp_path / "data" / "fingerprint.key").exists()  # stored nowhere
