"""A node's own ledger: ppml's schema on a SQLite file, charged with the service's code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ppml.db.repositories import Repositories
from ppml.errors import InvalidInput
from ppml.node.ledger import Charge, LocalLedger, Refusal
from ppml.privacy import accounting as acc
from ppml.privacy.budgets import curve_of
from ppml.privacy.ledger import Ledger
from tests.unit.node_helpers import local_data, open_ledger

ROUND = acc.MechanismEvent(sample_rate=0.08, noise_multiplier=1.1, steps=12)
DELTA = 1e-3


def _charge(ledger: LocalLedger, job: str, task: str, rounds: int, r: int = 0) -> object:
    return ledger.charge_round(
        job_id=job, task_id=task, round_index=r, rounds=rounds, event=ROUND, delta=DELTA
    )


def _entries(ledger: LocalLedger) -> list[tuple[str, str]]:
    with ledger.db.session() as session:
        rows = Repositories(session).ledger_entries(ledger.dataset_id)
        return [(e.kind, e.idempotency_key) for e in rows]


def test_rounds_are_charged_and_the_totals_are_the_accountants(tmp_path: Path) -> None:
    # arrange
    ledger = open_ledger(tmp_path, local_data(tmp_path))
    per_round = acc.rdp_curve(ROUND)
    # act
    charges = [_charge(ledger, "job_a", f"tsk_{r}", rounds=3, r=r) for r in range(3)]
    # assert: each round's ε and the job's running total come from the accountant
    assert all(isinstance(c, Charge) for c in charges)
    for r, charge in enumerate(charges, start=1):
        assert isinstance(charge, Charge)
        assert charge.epsilon == acc.epsilon(per_round, DELTA)
        assert charge.epsilon_total == acc.epsilon(acc.add(*[per_round] * r), DELTA)
    # the budget row's committed curve is the sum of the per-round curves, and equals the
    # fold of the entries (a RESERVE and a COMMIT per round)
    assert ledger.job_curve("job_a") == acc.add(*[per_round] * 3)
    with ledger.db.session() as session:
        repos = Repositories(session)
        budget = repos.budget(ledger.dataset_id)
        assert budget is not None
        assert curve_of(budget.committed) == acc.add(*[per_round] * 3)
        assert Ledger(repos).fold(ledger.dataset_id) == (curve_of(budget.committed), acc.zero())
        assert Ledger(repos).verify_chains() == []
    assert [kind for kind, _ in _entries(ledger)] == ["reserve", "commit"] * 3
    ledger.close()


def test_a_task_charged_again_is_not_charged_twice(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path, local_data(tmp_path))
    first = _charge(ledger, "job_a", "tsk_1", rounds=2)
    again = _charge(ledger, "job_a", "tsk_1", rounds=2)
    assert first == again
    assert len(_entries(ledger)) == 2
    ledger.close()


def test_a_job_that_would_overspend_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    # arrange: a budget that holds a few rounds, not 50
    ledger = open_ledger(tmp_path, local_data(tmp_path), epsilon=2.0)
    left = ledger.remaining()
    whole = acc.epsilon(acc.add(*[acc.rdp_curve(ROUND)] * 50), DELTA)
    # act
    outcome = _charge(ledger, "job_big", "tsk_1", rounds=50)
    # assert
    assert isinstance(outcome, Refusal) and outcome.reason == "budget"
    assert outcome.message.startswith(f"would spend ε={whole:.4g} but this node has ε=2 left")
    assert _entries(ledger) == [] and ledger.remaining() == left
    assert ledger.job_curve("job_big") == acc.zero()
    ledger.close()


def test_whether_a_job_fits_is_asked_without_writing_anything(tmp_path: Path) -> None:
    # arrange: a budget that holds two rounds (see below), not 50
    ledger = open_ledger(tmp_path, local_data(tmp_path), epsilon=2.5)
    # act
    small = ledger.fits(job_id="job_a", rounds=2, event=ROUND)
    big = ledger.fits(job_id="job_big", rounds=50, event=ROUND)
    # assert: the refusal charge_round would give, and nothing written either way
    assert small is None
    assert big == _charge(ledger, "job_big", "tsk_1", rounds=50)
    assert _entries(ledger) == [] and ledger.job_events("job_big") == []
    ledger.close()


def test_the_whole_job_is_checked_once_then_each_round_is_charged(tmp_path: Path) -> None:
    # arrange: two rounds fit, three do not
    ledger = open_ledger(tmp_path, local_data(tmp_path), epsilon=2.5)
    two = acc.add(*[acc.rdp_curve(ROUND)] * 2)
    three = acc.add(two, acc.rdp_curve(ROUND))
    with ledger.db.session() as session:
        budget = Repositories(session).budget(ledger.dataset_id)
        assert budget is not None
        assert Ledger(Repositories(session)).admits(budget, two)
        assert not Ledger(Repositories(session)).admits(budget, three)
    # act / assert: a 2-round job passes at its first task, and its rounds are charged
    assert isinstance(_charge(ledger, "job_a", "tsk_1", rounds=2, r=0), Charge)
    assert isinstance(_charge(ledger, "job_a", "tsk_2", rounds=2, r=1), Charge)
    # a third round (a repeated round) no longer fits: refused by the ledger, nothing written
    before = _entries(ledger)
    refused = _charge(ledger, "job_a", "tsk_3", rounds=2, r=1)
    assert isinstance(refused, Refusal) and refused.reason == "budget"
    assert _entries(ledger) == before
    ledger.close()


def test_a_restart_finds_the_same_ledger_and_budget(tmp_path: Path) -> None:
    data = local_data(tmp_path)
    ledger = open_ledger(tmp_path, data)
    _charge(ledger, "job_a", "tsk_1", rounds=2)
    left = ledger.remaining()
    ledger.close()
    # act: reopen without ε, δ (kept from the first start)
    again = open_ledger(tmp_path, data, epsilon=None, delta=None)
    # assert
    assert again.dataset_id == ledger.dataset_id
    assert again.remaining() == left and again.budget() == (4.0, 1e-3)
    again.close()


def test_a_budget_is_fixed_once_opened(tmp_path: Path) -> None:
    data = local_data(tmp_path)
    open_ledger(tmp_path, data).close()
    with pytest.raises(InvalidInput, match="opened with ε=4"):
        open_ledger(tmp_path, data, epsilon=8.0)


def test_other_rows_in_the_same_data_dir_are_refused(tmp_path: Path) -> None:
    open_ledger(tmp_path, local_data(tmp_path)).close()
    other = tmp_path / "other"
    other.mkdir()
    changed = local_data(other, rows=201)
    shutil.copy(tmp_path / "ledger.sqlite", other / "ledger.sqlite")
    with pytest.raises(InvalidInput, match="differs from the one this node's ledger budgets"):
        open_ledger(other, changed)


@pytest.mark.parametrize(
    ("epsilon", "delta", "message"),
    [
        (None, 1e-3, "give --epsilon and --delta"),
        (1.0, 0.01, "must be below 1/n"),  # 200 rows: δ must be < 0.005
        (0.0, 1e-3, "--epsilon must be > 0"),
    ],
)
def test_the_first_start_needs_a_sound_budget(
    tmp_path: Path, epsilon: float | None, delta: float, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        open_ledger(tmp_path, local_data(tmp_path), epsilon=epsilon, delta=delta)


def test_records_and_refusals_are_kept_per_job_and_charge_nothing(tmp_path: Path) -> None:
    ledger = open_ledger(tmp_path, local_data(tmp_path))
    ledger.record(job_id="job_c", task_id="tsk_1", mode="client", round_index=0)
    ledger.refused(job_id="job_c", task_id="tsk_2", refusal=Refusal(reason="budget", message="m"))
    assert [e.action for e in ledger.job_events("job_c")] == ["node.record", "node.refuse"]
    assert _entries(ledger) == [] and ledger.remaining() == 4.0
    ledger.close()
