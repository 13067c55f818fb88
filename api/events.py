"""A job's server-sent events: resumable, kept alive, and bounded in time and per tenant.

The stream sends the job's persisted events (``ppml.db.models.JobEvent``: ``status`` and
``progress``) in order, each with ``id: <seq>``, so a client that reconnects with
``Last-Event-ID`` receives exactly what it missed. A new follower (no ``Last-Event-ID``) first
gets the job as it stands, its ``progress`` and ``status`` with the seq they reflect. A job's
final report (its last ``progress``, with ε of the whole run) precedes its terminal
``status``. Once the job has ended and every event has been sent, ``end`` carries the job
resource and the stream closes. The first block also says ``retry: <ms>``, the reconnection delay.

A follower holds no thread: the stream polls the job's status and newest seq on the event loop
(``ppml.db.reads``; threads on SQLite only), every ``poll_s`` while there is news and less
often while the job is quiet (up to ``idle_poll_s``), and reads events only when there are new
ones. It ends with the job, when the client leaves (at once under uvicorn, else within a
poll), or after ``max_duration_s`` (the client resumes). While nothing is sent, a
``: keep-alive`` comment goes out every ``keepalive_s``. Each tenant may hold
``max_per_tenant`` open streams per API process.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.schemas import Job as JobResource
from ppml.config import EventStreams
from ppml.db.models import Job, JobEventKind, JobStatus
from ppml.db.reads import AsyncReads

__all__ = ["EventStream", "StreamSlots", "follow"]

KEEPALIVE = ": keep-alive\n\n"


class StreamSlots:
    """The open event streams of this API process, at most ``per_tenant`` per tenant.

    Touched on the event loop only; ``total`` is read by the metrics route.
    """

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self.total = 0
        self._open: dict[str, int] = {}

    def take(self, tenant_id: str) -> bool:
        """A slot for one more of the tenant's streams, or False when it holds them all."""
        count = self._open.get(tenant_id, 0)
        if count >= self.per_tenant:
            return False
        self._open[tenant_id] = count + 1
        self.total += 1
        return True

    def give_back(self, tenant_id: str) -> None:
        count = self._open.pop(tenant_id, 0) - 1
        if count > 0:
            self._open[tenant_id] = count
        self.total -= 1


class EventStream(StreamingResponse):
    """``text/event-stream`` that calls ``on_close`` once it is over, however it ended: the
    job ended, the client left, the server stopped, or the stream never started."""

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies: no buffer
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


@dataclass
class _Cursor:
    """Where a follower stands: the seq of the last event it was sent (None: nothing yet)."""

    seq: int | None
    ended: bool = False
    more: bool = False  # events are waiting beyond the batch just read


async def follow(
    request: Request,
    reads: AsyncReads,
    tenant_id: str,
    job_id: str,
    *,
    after: int | None,
    config: EventStreams,
    owner: bool = False,
) -> AsyncIterator[str]:
    """The stream's blocks, from the events after seq ``after`` (None: a new follower).

    ``scores`` events (exact held-out figures) go to ``owner`` keys only; analysts' streams
    skip their ids."""
    start = time.monotonic()
    stop_at = start + config.max_duration_s
    prefix = f"retry: {config.retry_ms}\n"  # rides on the first block
    cursor, sent_at, interval = _Cursor(after), start, config.poll_s
    while True:
        blocks = await _next_blocks(reads, tenant_id, job_id, cursor, owner=owner)
        now = time.monotonic()
        # A quiet job is polled less and less often, up to idle_poll_s; news resets the pace.
        interval = config.poll_s if blocks else min(2 * interval, config.idle_poll_s)
        if not blocks and (prefix or now - sent_at >= config.keepalive_s):
            blocks = [KEEPALIVE]
        for block in blocks:
            yield prefix + block
            prefix, sent_at = "", now
        if cursor.ended or now >= stop_at:
            return
        if not cursor.more:  # wake for the next poll, keep-alive or the end, whichever is first
            # The jitter keeps streams opened together from polling together.
            poll = interval * random.uniform(0.75, 1.25)
            await asyncio.sleep(min(poll, sent_at + config.keepalive_s - now, stop_at - now))
        if await request.is_disconnected():
            return


async def _next_blocks(
    reads: AsyncReads, tenant_id: str, job_id: str, cursor: _Cursor, *, owner: bool
) -> list[str]:
    """What the follower has not been sent yet (one batch of events at most)."""
    head = await reads.event_head(tenant_id, job_id)
    if head is None:  # the job is gone
        cursor.ended = True
        return []
    blocks: list[str] = []
    job = None
    if cursor.seq is None or cursor.seq > head.last_event_seq:  # a new follower
        job = await reads.job(tenant_id, job_id)
        if job is None:
            cursor.ended = True
            return []
        blocks, cursor.seq = _snapshot(job), job.last_event_seq
        head = head._replace(status=job.status, last_event_seq=job.last_event_seq)
    if cursor.seq < head.last_event_seq:
        events = await reads.job_events(job_id, after=cursor.seq)
        shown = [e for e in events if owner or e.kind != JobEventKind.SCORES]
        blocks += [_block(e.kind, e.data, e.seq) for e in shown]
        cursor.seq = events[-1].seq if events else head.last_event_seq
    cursor.more = cursor.seq < head.last_event_seq
    if JobStatus(head.status).terminal and not cursor.more:
        job = job or await reads.job(tenant_id, job_id)
        if job is not None:
            blocks.append(_end(job, cursor.seq))
        cursor.ended = True
    return blocks


def _snapshot(job: Job) -> list[str]:
    """A new follower's start: the job's progress and status, at the seq they reflect (the
    progress first, as the sequence records a job's final report before its end)."""
    return [
        _block("progress", job.progress.model_dump(mode="json"), job.last_event_seq),
        _block("status", {"status": job.status}, job.last_event_seq),
    ]


def _end(job: Job, seq: int) -> str:
    """The job resource as the API shows it (released metrics only, never exact figures)."""
    resource = JobResource.model_validate(job, from_attributes=True)
    return f"id: {seq}\nevent: end\ndata: {resource.model_dump_json()}\n\n"


def _block(event: str, data: dict[str, Any], seq: int) -> str:
    return f"id: {seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n"
