"""A federated job's history and checkpoints stay bounded however many rounds it runs.

Issue #15, finding 4: the round loop writes a checkpoint every round (parameters, server
optimiser state, history) and a job may run 100 000 rounds, so nothing in that state may
grow with the round count. The history holds one entry per scored round, and pricing
refuses a job that would score more than ``MAX_METRIC_RELEASES`` times.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest

from ppml.db.models import Dataset
from ppml.errors import InvalidInput
from ppml.jobs.schedule import evaluation_plan
from ppml.privacy.evaluation import MAX_METRIC_RELEASES, metric_releases, scoring_interval
from ppml.specs import JobSpec

torch = pytest.importorskip("torch")

from ppml.training.federated import FederatedDP, FederatedPlan, FederatedResult  # noqa: E402
from tests.unit.federated_world import client_dp, fit, make_fed, make_plan, sample_dp  # noqa: E402

SMALL, LARGE = 20, 200
# torch.save writes a zip whose records are 64-byte aligned: a pickled int one byte longer
# (steps 38 → 398) may move a record by one alignment. One history entry is ~100 bytes.
SIZE_TOLERANCE = 64

# (strategy, privacy level): every server optimiser, FedAdam (the one with server state)
# under both DP levels, plain averaging under both.
CASES = [
    ("fedavg", None),
    ("fedprox", None),
    ("fedadam", None),
    ("fedavg", "client"),
    ("fedadam", "client"),
    ("fedavg", "sample"),
    ("fedadam", "sample"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # On a shared 2-core machine OpenMP threads spin against each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def serialized_size(state: dict[str, Any]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def federated(strategy: str, rounds: int, evaluate_every: int | None) -> FederatedPlan:
    """A plan whose scoring interval is derived as the worker derives it."""
    return make_fed(
        strategy=strategy,
        rounds=rounds,
        local_epochs=1,
        mu=0.1 if strategy == "fedprox" else 0.0,
        server_learning_rate=0.1 if strategy == "fedadam" else 1.0,
        eval_every=scoring_interval(rounds, evaluate_every),
    )


def privacy(level: str | None, fed: FederatedPlan) -> FederatedDP | None:
    if level is None:
        return None
    return client_dp(fed) if level == "client" else sample_dp(q=0.5)


def run(
    strategy: str, level: str | None, rounds: int, evaluate_every: int | None = None
) -> tuple[FederatedResult, list[dict[str, Any]], list[int]]:
    """Train; returns the result, the checkpoint states and their serialized sizes."""
    fed = federated(strategy, rounds, evaluate_every)
    states: list[dict[str, Any]] = []
    result = fit(plan=make_plan(), fed=fed, dp=privacy(level, fed), checkpoint=states.append)
    return result, states, [serialized_size(state) for state in states]


def scored_rounds(rounds: int, evaluate_every: int | None) -> list[float]:
    every = scoring_interval(rounds, evaluate_every)
    return [float(r) for r in range(1, rounds + 1) if r % every == 0 or r == rounds]


@pytest.mark.parametrize(("strategy", "level"), CASES)
def test_checkpoint_size_does_not_grow_with_the_round_count(
    strategy: str, level: str | None
) -> None:
    # arrange / act: ten times the rounds, the same number of scores (default interval)
    small, small_states, small_sizes = run(strategy, level, SMALL)
    large, large_states, large_sizes = run(strategy, level, LARGE)
    # assert: the last checkpoint, and every one before it, is as small as the short run's
    assert len(small_states) == SMALL - 1 and len(large_states) == LARGE - 1
    assert len(small.history) == len(large.history) == metric_releases(LARGE, None)
    assert len(large_states[-1]["history"]) == len(small_states[-1]["history"])
    assert large_sizes[-1] <= small_sizes[-1] + SIZE_TOLERANCE
    assert max(large_sizes) <= max(small_sizes) + SIZE_TOLERANCE


@pytest.mark.parametrize(("strategy", "level"), CASES)
def test_server_state_is_at_most_two_vectors_of_the_model_size(
    strategy: str, level: str | None
) -> None:
    # Nothing per client (control variates) or per round: FedAdam's m and v, or nothing.
    _, states, _ = run(strategy, level, SMALL)
    server, params = states[-1]["server"], states[-1]["params"]
    assert set(server) == ({"m", "v"} if strategy == "fedadam" else set())
    assert all(tensor.shape == params.shape for tensor in server.values())
    assert set(states[-1]) == {"kind", "rounds", "steps", "params", "server", "history"}


@pytest.mark.parametrize(("strategy", "level"), CASES)
@pytest.mark.parametrize(("rounds", "evaluate_every"), [(LARGE, 20), (SMALL, 2)])
def test_history_holds_one_entry_per_scored_round(
    strategy: str, level: str | None, rounds: int, evaluate_every: int | None
) -> None:
    # act
    result, states, _ = run(strategy, level, rounds, evaluate_every)
    # assert: exactly the rounds pricing charged a release for, and never more than the cap
    expected = scored_rounds(rounds, evaluate_every)
    assert [entry["round"] for entry in result.history] == expected
    assert len(result.history) == metric_releases(rounds, evaluate_every)
    assert len(result.history) <= MAX_METRIC_RELEASES
    assert [entry["round"] for entry in states[-1]["history"]] == expected[:-1]


@pytest.mark.parametrize("level", [None, "sample"])
def test_a_resumed_run_between_scores_keeps_the_history_bounded(level: str | None) -> None:
    # arrange: a checkpoint taken between two scores (every 10 rounds)
    whole, states, _ = run("fedadam", level, LARGE)
    middle = next(state for state in states if state["rounds"] == 105)
    fed = federated("fedadam", LARGE, None)
    # act
    resumed = fit(plan=make_plan(), fed=fed, dp=privacy(level, fed), resume=middle)
    # assert: no round scored twice, none lost
    assert [entry["round"] for entry in middle["history"]] == scored_rounds(LARGE, None)[:10]
    assert [entry["round"] for entry in resumed.history] == scored_rounds(LARGE, None)
    assert len(resumed.history) == len(whole.history)


# --- pricing refuses a job that would score more than MAX_METRIC_RELEASES times -----------


def dataset(*, budget: bool) -> Dataset:
    return Dataset(
        id="ds_1",
        tenant_id="ten_1",
        name="rows",
        source={"upload": {"format": "csv"}},
        task="classification",
        num_features=4,
        num_classes=2,
        num_train=800,
        num_test=200,
        num_clients=None,
        classes={"labels": ["a", "b"]},
        privacy_unit="record",
        epsilon_total=8.0 if budget else None,
        delta_total=1e-4 if budget else None,
        storage_key="datasets/ds_1.npz",
    )


def job_spec(*, privacy: dict[str, Any] | None, rounds: int, evaluate_every: int | None) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "job",
            "dataset_id": "ds_1",
            "model": {"arch": "logreg"},
            "training": {"epochs": 1, "batch_size": 5, "learning_rate": 0.1},
            "privacy": privacy,
            "federated": {
                "num_clients": 10,
                "clients_per_round": 5,
                "rounds": rounds,
                "evaluate_every": evaluate_every,
            },
        }
    )


PRICED = {
    "public": (None, False),
    "dp": ({"target_epsilon": 1.0, "level": "sample"}, True),
    "dp-withheld": ({"target_epsilon": 1.0, "evaluation": {"epsilon_share": 0.0}}, True),
}


@pytest.mark.parametrize("job", sorted(PRICED))
def test_more_than_max_metric_releases_scores_are_refused(job: str) -> None:
    privacy_spec, budget = PRICED[job]
    too_many = job_spec(privacy=privacy_spec, rounds=MAX_METRIC_RELEASES + 1, evaluate_every=1)
    at_cap = job_spec(privacy=privacy_spec, rounds=2 * MAX_METRIC_RELEASES, evaluate_every=2)
    # act / assert
    with pytest.raises(InvalidInput) as refused:
        evaluation_plan(too_many, dataset(budget=budget))
    assert refused.value.field == "federated.evaluate_every"
    plan = evaluation_plan(at_cap, dataset(budget=budget))
    assert plan.releases == (0 if job == "dp-withheld" else MAX_METRIC_RELEASES)


def test_the_default_interval_scores_at_most_twenty_times_for_any_round_count() -> None:
    # every round count a spec admits (FederatedSpec.rounds <= 100 000)
    assert max(metric_releases(rounds, None) for rounds in range(1, 100_001)) == 20
    longest = job_spec(privacy=None, rounds=100_000, evaluate_every=None)
    assert evaluation_plan(longest, dataset(budget=False)).releases == 20
