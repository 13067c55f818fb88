"""The webhook outbox on a real database: staged with a job's end, sent by the worker's
sender with backoff, failed for good after its attempts; and the request id rides with the
job's task message."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from ppml import telemetry
from ppml.config import Settings, Webhooks
from ppml.db.models import WebhookDelivery
from ppml.db.session import Database
from ppml.jobs.webhooks import WebhookSender
from tests.integration.stack import free_port
from tests.unit.worlds import ServiceWorld, job_spec, make_service_world


@pytest.fixture
def world(database: Database, settings: Settings) -> Iterator[ServiceWorld]:
    world = make_service_world(database, settings)
    yield world
    world.sent()  # leave nothing in the process-wide memory broker


def _deliveries(world: ServiceWorld) -> list[WebhookDelivery]:
    with world.db.session() as session:
        return list(session.scalars(select(WebhookDelivery)).all())


def _cancelled_job_with_hook(world: ServiceWorld, url: str) -> str:
    dataset = world.digits()
    spec = job_spec(dataset.id).model_copy(update={"webhook_url": url})
    token = telemetry.request_id.set("rid-outbox-1")
    try:
        job, _created = world.service.submit(world.tenant_id, spec)
    finally:
        telemetry.request_id.reset(token)
    world.service.cancel(world.tenant_id, job.id)  # queued → cancelled, through finish()
    return job.id


def test_the_end_stages_one_delivery_and_a_dead_receiver_is_retried_then_failed(
    world: ServiceWorld,
) -> None:
    # arrange: nothing listens on the port
    url = f"http://127.0.0.1:{free_port()}/hook"
    job_id = _cancelled_job_with_hook(world, url)
    hooks = Webhooks(allow_private_addresses=True, backoff_s=0.2, max_attempts=2, timeout_s=1)
    sender = WebhookSender(world.db, world.settings.model_copy(update={"webhooks": hooks}))
    # act
    first = sender.run_once()
    not_yet = sender.run_once()  # the backoff has not passed
    time.sleep(0.4)
    second = sender.run_once()
    after = sender.run_once()
    # assert
    [delivery] = _deliveries(world)
    assert delivery.job_id == job_id and delivery.url == url
    assert '"type":"job.cancelled"' in delivery.body
    assert first == [delivery.id] and not_yet == [] and second == [delivery.id] and after == []
    assert delivery.status == "failed" and delivery.attempts == 2
    assert delivery.last_error is not None and "Connect" in delivery.last_error


def test_a_private_destination_fails_at_once_without_the_setting(world: ServiceWorld) -> None:
    _cancelled_job_with_hook(world, "http://127.0.0.1:9/hook")
    sender = WebhookSender(world.db, world.settings)  # allow_private_addresses: False

    sender.run_once()

    [delivery] = _deliveries(world)
    assert delivery.status == "failed" and delivery.attempts == 1
    assert "public address" in (delivery.last_error or "")


def test_a_job_without_a_url_stages_nothing_and_the_task_carries_the_request_id(
    world: ServiceWorld,
) -> None:
    dataset = world.digits()
    token = telemetry.request_id.set("rid-outbox-2")
    try:
        job, _created = world.service.submit(world.tenant_id, job_spec(dataset.id))
    finally:
        telemetry.request_id.reset(token)
    world.service.cancel(world.tenant_id, job.id)

    with world.service.celery.connection_for_read() as conn:
        queue = conn.SimpleQueue(world.settings.worker.queue, no_ack=True)
        message = queue.get(block=False)
        queue.close()
    assert _deliveries(world) == []
    assert message.headers["ppml_request_id"] == "rid-outbox-2"
    assert message.payload[0] == [job.id]
