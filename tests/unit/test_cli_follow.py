"""The live bar's figures: ETA from the pace so far, loss and accuracy when reported."""

from __future__ import annotations

import pytest

from ppml.cli.follow import eta_seconds, progress_detail
from ppml.client import Event, parse_events

SPEC = {"training": {"epochs": 10}, "federated": None}


def test_eta_is_the_pace_since_the_first_report_carried_forward() -> None:
    # 0.1 → 0.4 in 30 s: 0.6 left at 0.01/s is 60 s
    assert eta_seconds({"fraction": 0.4}, (100.0, 0.1), 130.0) == pytest.approx(60.0)


def test_eta_prefers_the_servers_estimate_and_is_unknown_without_pace() -> None:
    assert eta_seconds({"fraction": 0.4, "eta_seconds": 12.5}, None, 0.0) == 12.5
    assert eta_seconds({"fraction": 0.1}, (100.0, 0.1), 130.0) is None
    assert eta_seconds({"fraction": 0.5}, None, 130.0) is None


def test_detail_shows_loss_accuracy_epsilon_and_eta_when_known() -> None:
    progress = {"epoch": 3, "fraction": 0.3, "metrics": {"loss": 0.412, "accuracy": 0.87}}

    detail = progress_detail(SPEC, progress, 1.2041, 75.0)
    bare = progress_detail(SPEC, {"epoch": 0}, None, None)

    assert detail == "epoch 3/10  loss 0.412  acc 0.87  ε 1.204  ETA 1:15"
    assert bare == "epoch 0/10  ε -"


def test_an_ended_job_shows_its_released_metrics() -> None:
    released = {"test_loss": 0.3312, "test_accuracy": 0.9123, "release": {}}

    detail = progress_detail(SPEC, {"epoch": 10, "fraction": 1.0}, 2.0, None, released)

    assert detail == "epoch 10/10  loss 0.3312  acc 0.9123  ε 2.000"


def test_detail_of_a_federated_job_counts_rounds() -> None:
    spec = {"federated": {"rounds": 30}}

    assert progress_detail(spec, {"round": 4, "loss": 2.0}, 0.5, 3725.0).startswith(
        "round 4/30  loss 2  ε 0.500  ETA 1:02:05"
    )


def test_server_sent_events_are_parsed_with_their_ids_and_comments_skipped() -> None:
    lines = [
        "retry: 3000",
        "id: 4",
        "event: progress",
        'data: {"fraction": 0.5}',
        "",
        ": keep-alive",
        "",
        "id: 5",
        "event: status",
        'data: {"status": "succeeded"}',
        "",
    ]

    events = list(parse_events(iter(lines)))

    assert events == [
        Event("4", "progress", {"fraction": 0.5}),
        Event("5", "status", {"status": "succeeded"}),
    ]
