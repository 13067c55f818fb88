"""How much more a tenant may queue: its queued and running jobs and their compute, counted
exactly under the tenant's row lock at admission, and early (cached) before any lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ppml.cache import LRUCache
from ppml.config import Settings
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import (
    TooManyRequests,
)

if TYPE_CHECKING:
    from ppml.services.admissions import Admission

__all__ = ["RETRY_WHEN_FULL_S", "ActiveJobs", "Room", "TenantRooms", "demands_of"]

# What a 429 for a tenant at its active-job or compute limit asks clients to wait.
RETRY_WHEN_FULL_S = 30
_STRIPES = 64


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
    ``_decide``). A count read from the database is reused for ``ttl`` seconds, plus
    the jobs this process admitted since; a count at or over the limit is always read again
    before a refusal, so a refusal here is one the exact check would also make.
    """

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        # tenant → (count, fresh until); the least recently used tenants are forgotten first
        self._counts: LRUCache[str, tuple[int, float]] = LRUCache(10_000)
        self._lock = threading.Lock()  # makes admitted()'s read-modify-write atomic
        # One read at a time per stripe of tenants: when a busy tenant's count expires, the
        # requests that find it stale wait for one read (a scan of its active jobs) and
        # take its answer, instead of each scanning
        self._reading = [threading.Lock() for _ in range(_STRIPES)]

    def count(self, tenant_id: str, read: Callable[[], int], *, limit: int) -> int:
        found = self._fresh(tenant_id, limit)
        if found is not None:
            return found
        with self._reading[hash(tenant_id) % _STRIPES]:
            found = self._fresh(tenant_id, limit)  # read meanwhile by another request
            if found is not None:
                return found
            now = time.monotonic()
            fresh = read()
            with self._lock:
                self._counts.put(tenant_id, (fresh, now + self.ttl))
        return fresh

    def _fresh(self, tenant_id: str, limit: int) -> int | None:
        """The cached count while it is fresh and under ``limit`` (a count at the limit is
        always read again before a refusal), else None."""
        cached = self._counts.get(tenant_id)
        if cached is not None and cached[1] > time.monotonic() and cached[0] < limit:
            return cached[0]
        return None

    def admitted(self, tenant_id: str) -> None:
        with self._lock:
            cached = self._counts.get(tenant_id)
            if cached is not None:
                self._counts.put(tenant_id, (cached[0] + 1, cached[1]))


class CountedRooms:
    """Each tenant's last exact count (as a :class:`Room`) with its admission counters at
    the time, for :meth:`TenantRooms.locked` to bound the room from above without a scan.

    Jobs become active only by admission, which adds to the counters first, so the count
    plus the counters' growth bounds the active jobs from above. A counter that went back
    (an older copy of the database restored) voids the entry; entries also expire after
    ``ttl`` seconds, which keeps the bound close and limits what such a restore can hide.
    """

    def __init__(self, ttl: float = 5.0) -> None:
        self._rooms: LRUCache[str, tuple[tuple[int, int], Room]] = LRUCache(10_000, ttl=ttl)

    def put(self, tenant_id: str, counters: tuple[int, int] | None, room: Room) -> None:
        if counters is not None:
            self._rooms.put(tenant_id, (counters, Room(room.jobs, room.compute)))

    def bound(self, tenant_id: str, counters: tuple[int, int] | None) -> Room | None:
        """The room at most left now, given the counters before this transaction's demand
        (None: not usable)."""
        found = self._rooms.get(tenant_id) if counters is not None else None
        if found is None or counters is None:
            return None
        (jobs_then, compute_then), room = found
        more_jobs, more_compute = counters[0] - jobs_then, counters[1] - compute_then
        if more_jobs < 0 or more_compute < 0:
            return None
        return Room(jobs=room.jobs - more_jobs, compute=room.compute + more_compute)


class TenantRooms:
    """The per-tenant limits of admission (``Limits.max_active_jobs_per_tenant`` and
    ``max_tenant_compute``) for one job service."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self._active = ActiveJobs()
        self._counted = CountedRooms()

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

    def locked(
        self, repos: Repositories, demands: Mapping[str, tuple[int, int]]
    ) -> dict[str, Room]:
        """Lock the tenants' rows, in id order, then count their active jobs and sum their
        compute: the exact room. ``demands``: per tenant, how many jobs (and how much
        compute) the transaction may admit at most.

        Take it before any budget row (lock order: tenant, then budget). Admissions of one
        tenant then take turns, in every API process, so none can count before another's
        commit and overshoot a limit.

        The count scans every queued and running job of the tenant, so it is skipped when
        it cannot change a decision: the lock adds the demand to the tenant's admission
        counters, and the last count plus what was admitted since (by the counters) bounds
        the active jobs and their compute from above. When that bound leaves room for the
        whole demand, every job of the transaction would pass the exact check too; the
        room returned then holds the bound. Otherwise the jobs are counted, as always.
        """
        limit = self.settings.limits.max_active_jobs_per_tenant
        before = {
            tenant_id: repos.lock_tenant_admitting(tenant_id, *demands[tenant_id])
            for tenant_id in sorted(demands)
        }
        rooms = {}
        for tenant_id, (jobs, compute) in demands.items():
            room = self._counted.bound(tenant_id, before[tenant_id])
            if room is None or not self._fits(room, jobs, compute):
                # One scan gives both: the compute sum needs every active job anyway.
                count, used = repos.active_load(tenant_id)
                room = Room(jobs=limit - count, compute=used)
                self._counted.put(tenant_id, before[tenant_id], room)
            rooms[tenant_id] = room
        return rooms

    def _fits(self, room: Room, jobs: int, compute: int) -> bool:
        """Whether ``jobs`` more jobs of ``compute`` in all all pass :meth:`refuse_if_no_room`."""
        return (
            jobs <= room.jobs and room.compute + compute <= self.settings.limits.max_tenant_compute
        )

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


def demands_of(admissions: Iterable[Admission]) -> dict[str, tuple[int, int]]:
    """Per tenant, the jobs and compute that admissions may add at most."""
    demands: dict[str, tuple[int, int]] = {}
    for admission in admissions:
        jobs, compute = demands.get(admission.tenant_id, (0, 0))
        demands[admission.tenant_id] = (jobs + 1, compute + admission.pricing.compute)
    return demands
