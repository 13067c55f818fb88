"""How much more a tenant may queue: its queued and running jobs and their compute, counted
exactly under the tenant's row lock at admission, and early (cached) before any lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ppml.cache import LRUCache
from ppml.config import Settings
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import (
    TooManyRequests,
)

__all__ = ["RETRY_WHEN_FULL_S", "ActiveJobs", "Room", "TenantRooms"]

# What a 429 for a tenant at its active-job or compute limit asks clients to wait.
RETRY_WHEN_FULL_S = 30


@dataclass
class Room:
    """What a tenant may still add, counted under its row lock (``TenantRooms.locked``)."""

    jobs: int  # more queued or running jobs it may have
    compute: int  # summed compute estimate of its queued and running jobs

    def admit(self, compute: int) -> None:
        """Count a job admitted earlier in the same transaction."""
        self.jobs -= 1
        self.compute += compute


class ActiveJobs:
    """Each tenant's count of queued and running jobs, for an early refusal outside any lock.

    A tenant at its limit that keeps submitting is refused here, before it prices a job or
    queues for its tenant's lock; the exact check is the count under that lock (``_admit``,
    ``_decide_together``). A count read from the database is reused for ``ttl`` seconds, plus
    the jobs this process admitted since; a count at or over the limit is always read again
    before a refusal, so a refusal here is one the exact check would also make.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        # tenant → (count, fresh until); the least recently used tenants are forgotten first
        self._counts: LRUCache[str, tuple[int, float]] = LRUCache(10_000)
        self._lock = threading.Lock()  # makes admitted()'s read-modify-write atomic

    def count(self, tenant_id: str, read: Callable[[], int], *, limit: int) -> int:
        cached = self._counts.get(tenant_id)
        now = time.monotonic()
        if cached is not None and cached[1] > now and cached[0] < limit:
            return cached[0]
        fresh = read()
        with self._lock:
            self._counts.put(tenant_id, (fresh, now + self.ttl))
        return fresh

    def admitted(self, tenant_id: str) -> None:
        with self._lock:
            cached = self._counts.get(tenant_id)
            if cached is not None:
                self._counts.put(tenant_id, (cached[0] + 1, cached[1]))


class TenantRooms:
    """The per-tenant limits of admission (``Limits.max_active_jobs_per_tenant`` and
    ``max_tenant_compute``) for one job service."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._active = ActiveJobs()

    def admitted(self, tenant_id: str) -> None:
        """Count a job this process admitted in the early counts."""
        self._active.admitted(tenant_id)

    def early(self, tenant_id: str) -> int:
        """How many more jobs the tenant may have queued or running, for an early refusal
        (see ActiveJobs). Call it outside any transaction: a count it must refresh is read in
        its own session."""
        limit = self.settings.limits.max_active_jobs_per_tenant

        def count() -> int:
            with self.db.read_one() as session:
                return Repositories(session).count_active_jobs(tenant_id, up_to=limit)

        return limit - self._active.count(tenant_id, count, limit=limit)

    def locked(self, repos: Repositories, tenant_ids: Sequence[str]) -> dict[str, Room]:
        """Lock the tenants' rows, in id order, then count their active jobs and sum their
        compute: the exact room.

        Take it before any budget row (lock order: tenant, then budget). Admissions of one
        tenant then take turns, in every API process, so none can count before another's
        commit and overshoot a limit.
        """
        limit = self.settings.limits.max_active_jobs_per_tenant
        for tenant_id in sorted(set(tenant_ids)):
            repos.lock_tenant(tenant_id)
        rooms = {}
        for tenant_id in set(tenant_ids):
            # One scan gives both: the compute sum needs every active job anyway.
            count, compute = repos.active_load(tenant_id)
            rooms[tenant_id] = Room(jobs=limit - count, compute=compute)
        return rooms

    def refuse_if_full(self, room: int) -> None:
        if room <= 0:
            limit = self.settings.limits.max_active_jobs_per_tenant
            raise TooManyRequests(
                f"at most {limit} queued or running jobs per tenant; retry when some finish",
                limit=limit,
                retry_after=RETRY_WHEN_FULL_S,
            )

    def refuse_if_no_room(self, room: Room, compute: int) -> None:
        """429 when the tenant has no room for one more job, or for this job's compute."""
        self.refuse_if_full(room.jobs)
        limit = self.settings.limits.max_tenant_compute
        if room.compute + compute > limit:
            raise TooManyRequests(
                f"this job's estimated compute ({compute:.3g}) and that of the tenant's queued "
                f"and running jobs ({room.compute:.3g}) would pass the tenant's limit of "
                f"{limit:.3g} sample-gradients × parameters; retry when some finish",
                limit=limit,
                compute_in_use=room.compute,
                compute_requested=compute,
                retry_after=RETRY_WHEN_FULL_S,
            )
