"""ppml.db.base.Typed.from_json: values of typed JSON columns read from the database's text."""

from __future__ import annotations

from pydantic import BaseModel

from ppml.db.base import Typed
from ppml.jobs.records import Progress


class _Mutable(BaseModel):
    steps: int


def test_a_frozen_record_is_validated_once_per_text_and_each_text_gives_its_own_value() -> None:
    # arrange
    column = Typed(Progress)
    first = '{"fraction": 0.5, "epoch": 1, "steps": 10}'
    later = '{"fraction": 1.0, "epoch": 2, "steps": 20}'
    # act
    a, again, b = column.from_json(first), column.from_json(first.encode()), column.from_json(later)
    # assert
    assert a == Progress(fraction=0.5, epoch=1, steps=10)
    assert column.from_json(first) is a  # the same text: the value it validated before
    assert again == a  # bytes or str, the same record
    assert b == Progress(fraction=1.0, epoch=2, steps=20)


def test_a_mutable_shape_gets_a_fresh_value_at_every_read() -> None:
    column = Typed(_Mutable)
    first = column.from_json('{"steps": 1}')
    first.steps = 2  # a reader's change must not reach the next reader
    second = column.from_json('{"steps": 1}')
    assert second.steps == 1 and second is not first


def test_json_null_is_none_for_every_shape() -> None:
    assert Typed(Progress).from_json("null") is None
    assert Typed(_Mutable).from_json(b"null") is None
