"""The budget-filter migration: charged budgets keep uniform-v1, fresh ones are anchored.

On SQLite, whose foreign keys are not enforced by a plain engine, so only the two tables the
migration reads need rows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ppml.db.migrate import upgrade
from ppml.privacy import filters

BEFORE = "e1f2a3b4c5d6"


def _filler(column: sa.Column[Any]) -> Any:
    """A value for a required column the test does not care about."""
    kind = column.type
    if isinstance(kind, sa.JSON):
        return {}
    if isinstance(kind, sa.DateTime):
        return datetime.now(UTC)
    if isinstance(kind, sa.Integer | sa.Float | sa.Numeric):
        return 0
    if isinstance(kind, sa.Boolean):
        return False
    return "x"


def _insert(engine: sa.Engine, table: str, values: dict[str, Any]) -> None:
    meta = sa.MetaData()
    found = sa.Table(table, meta, autoload_with=engine)
    row = {
        c.name: _filler(c)
        for c in found.columns
        if not c.nullable and c.server_default is None and c.name not in values
    }
    with engine.begin() as conn:
        conn.execute(found.insert().values({**row, **values}))


def test_charged_budgets_keep_their_filter_and_fresh_ones_are_anchored(tmp_path: Path) -> None:
    # arrange: two budgets before the migration, one of them with a ledger entry
    url = f"sqlite:///{tmp_path / 'filters.db'}"
    upgrade(url, BEFORE)
    engine = sa.create_engine(url)
    for dataset_id in ("charged", "fresh"):
        _insert(
            engine,
            "dataset_budgets",
            {"dataset_id": dataset_id, "epsilon_total": 8.0, "delta_total": 1e-5},
        )
    _insert(engine, "ledger_entries", {"id": "e1", "dataset_id": "charged", "seq": 1})
    # act
    upgrade(url)
    # assert
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT dataset_id, admission_filter, filter_anchor FROM dataset_budgets")
        ).all()
    rows = {dataset_id: (version, anchor) for dataset_id, version, anchor in found}
    engine.dispose()
    assert rows["charged"] == (filters.UNIFORM, None)
    assert rows["fresh"] == (filters.ANCHORED, filters.anchor_order(8.0, 1e-5))
