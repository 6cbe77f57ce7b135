"""A database-backed job queue with leases and retries.

Claiming takes the oldest due job with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so
replicas never wait on each other; on SQLite every transaction is ``BEGIN IMMEDIATE``
(see ``engine.py``), which serialises claims. A claim sets a random lease token; the
handler then runs **in the same transaction that marks the job done**, conditioned on
that token. A worker that lost its lease (it stalled past the lease and another worker
took the job) cannot commit, so a job's database effects happen exactly once. Effects
outside the database (object writes) must be idempotent, as they may be repeated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from phivault.clock import Clock
from phivault.db.engine import Database
from phivault.db.models import Job, JobRun
from phivault.ids import new_id, new_token

log = logging.getLogger(__name__)

MAX_BACKOFF = timedelta(minutes=30)
_ERROR_TEXT_LIMIT = 500


class JobError(Exception):
    """A handler's expected failure; its message is safe to store (ids only, no PHI)."""


class LeaseLost(Exception):
    """Another worker took the job over; this worker's results were discarded."""


@dataclass(frozen=True, slots=True)
class JobContext:
    """What a handler gets: the job, and the session of the transaction that completes it."""

    job_id: str
    kind: str
    payload: Mapping[str, Any]
    attempt: int
    session: Session
    now: datetime


JobHandler = Callable[[JobContext], None]


class JobRegistry:
    """Maps job kinds to handlers. Each kind has exactly one handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, JobHandler] = {}

    def register(self, kind: str, handler: JobHandler) -> None:
        if kind in self._handlers:
            msg = f"job kind {kind!r} already has a handler"
            raise ValueError(msg)
        self._handlers[kind] = handler

    def handler(self, kind: str) -> JobHandler | None:
        return self._handlers.get(kind)

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(self._handlers)


def enqueue(
    session: Session,
    kind: str,
    payload: Mapping[str, Any],
    *,
    now: datetime,
    run_at: datetime | None = None,
    max_attempts: int = 5,
    dedupe_key: str | None = None,
) -> str:
    """Add a job in the caller's transaction (so it exists iff the caller's change commits).

    With ``dedupe_key``, enqueuing the same key again returns the existing job's id.
    """
    if dedupe_key is not None:
        existing = session.scalar(select(Job.id).where(Job.dedupe_key == dedupe_key))
        if existing is not None:
            return existing
    job = Job(
        id=new_id(),
        kind=kind,
        payload=dict(payload),
        status="queued",
        attempts=0,
        max_attempts=max_attempts,
        run_at=run_at or now,
        created_at=now,
        dedupe_key=dedupe_key,
    )
    session.add(job)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        # A concurrent transaction enqueued the same dedupe key first.
        existing = session.scalar(select(Job.id).where(Job.dedupe_key == dedupe_key))
        if existing is None:
            raise
        return existing
    return job.id


@dataclass(frozen=True, slots=True)
class _Claim:
    job_id: str
    kind: str
    payload: Mapping[str, Any]
    attempt: int
    max_attempts: int
    token: str
    started_at: datetime


def _missing_handler(context: JobContext) -> None:
    # Unreachable through _claim, which only takes registered kinds; kept for safety.
    raise JobError(f"no handler for job kind {context.kind!r}")


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id()[:8]}"


class Worker:
    """Claims due jobs and runs their handlers; ``run_forever`` until told to stop."""

    def __init__(
        self,
        db: Database,
        registry: JobRegistry,
        clock: Clock,
        *,
        name: str | None = None,
        lease: timedelta = timedelta(seconds=60),
        poll_interval: float = 1.0,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.registry = registry
        self.clock = clock
        self.name = name or default_worker_name()
        self.lease = lease
        self.poll_interval = poll_interval
        self.tick = tick

    def run_forever(self, stop: threading.Event) -> None:
        """Run jobs until ``stop`` is set. Database outages are waited out, not fatal."""
        log.info("job worker %s started", self.name)
        while not stop.is_set():
            try:
                ran = self.run_once()
            except OperationalError:
                log.warning("job worker %s: database unavailable, retrying", self.name)
                ran = False
            except Exception as exc:  # noqa: BLE001  # the worker must outlive any one failure
                # No traceback: exception messages may quote data.
                log.error("job worker %s: %s; retrying", self.name, type(exc).__name__)  # noqa: TRY400
                ran = False
            self._run_tick()
            if not ran:
                stop.wait(self.poll_interval)
        log.info("job worker %s stopped", self.name)

    def _run_tick(self) -> None:
        """Housekeeping between jobs (integrating the audit log); failures are logged."""
        if self.tick is None:
            return
        try:
            self.tick()
        except Exception as exc:  # noqa: BLE001  # the worker must outlive any one failure
            log.warning("job worker %s: housekeeping failed: %s", self.name, type(exc).__name__)

    def run_once(self) -> bool:
        """Claim and run one due job; return whether there was one."""
        claim = self._claim()
        if claim is None:
            return False
        handler = self.registry.handler(claim.kind) or _missing_handler
        try:
            self._run_and_complete(claim, handler)
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; result discarded", claim.job_id)
        except Exception as exc:  # noqa: BLE001  # any handler failure is recorded, not fatal
            self._record_failure(claim, exc)
        return True

    def _claim(self) -> _Claim | None:
        if not self.registry.kinds:
            return None
        now = self.clock.now()
        with self.db.transaction() as session:
            due = (Job.status == "queued") & (Job.run_at <= now) | (Job.status == "running") & (
                Job.lease_expires_at < now
            )
            job = session.scalars(
                select(Job)
                .where(due, Job.kind.in_(self.registry.kinds))
                .order_by(Job.run_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            if job.attempts >= job.max_attempts:
                # Its last attempt's worker died mid-run: give up rather than loop forever.
                job.status = "failed"
                job.finished_at = now
                job.last_error = job.last_error or "worker lost during the last attempt"
                job.lease_owner = job.lease_token = job.lease_expires_at = None
                return None
            token = new_token()
            job.status = "running"
            job.attempts += 1
            job.lease_owner = self.name
            job.lease_token = token
            job.lease_expires_at = now + self.lease
            return _Claim(
                job_id=job.id,
                kind=job.kind,
                payload=dict(job.payload),
                attempt=job.attempts,
                max_attempts=job.max_attempts,
                token=job.lease_token,
                started_at=now,
            )

    def _run_and_complete(self, claim: _Claim, handler: JobHandler) -> None:
        with self._lease_kept_alive(claim), self.db.transaction() as session:
            context = JobContext(
                job_id=claim.job_id,
                kind=claim.kind,
                payload=claim.payload,
                attempt=claim.attempt,
                session=session,
                now=claim.started_at,
            )
            handler(context)
            now = self.clock.now()
            done = session.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.lease_token == claim.token)
                .values(
                    status="succeeded",
                    finished_at=now,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    last_error=None,
                )
                .execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise LeaseLost
            session.add(self._run_row(claim, now, "succeeded", None))

    @contextlib.contextmanager
    def _lease_kept_alive(self, claim: _Claim) -> Iterator[None]:
        """Extend the lease every third of its length while the handler runs."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease.total_seconds() / 3):
                try:
                    with self.db.transaction() as session:
                        session.execute(
                            update(Job)
                            .where(Job.id == claim.job_id, Job.lease_token == claim.token)
                            .values(lease_expires_at=self.clock.now() + self.lease)
                            .execution_options(synchronize_session=False)
                        )
                except OperationalError:
                    log.warning("job %s: could not renew lease", claim.job_id)

        thread = threading.Thread(target=renew, name=f"lease-{claim.job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _record_failure(self, claim: _Claim, exc: Exception) -> None:
        # Only JobError messages are stored: other exceptions may quote data.
        error = str(exc)[:_ERROR_TEXT_LIMIT] if isinstance(exc, JobError) else type(exc).__name__
        log.warning("job %s (%s) attempt %d failed: %s", claim.job_id, claim.kind, claim.attempt, error)
        now = self.clock.now()
        final = claim.attempt >= claim.max_attempts
        backoff = min(timedelta(seconds=2**claim.attempt), MAX_BACKOFF)
        with self.db.transaction() as session:
            changed = session.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.lease_token == claim.token)
                .values(
                    status="failed" if final else "queued",
                    run_at=now + backoff,
                    finished_at=now if final else None,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                    last_error=error,
                )
                .execution_options(synchronize_session=False)
            )
            if changed.rowcount == 1:  # type: ignore[attr-defined]
                session.add(self._run_row(claim, now, "failed" if final else "retry", error))

    def _run_row(self, claim: _Claim, now: datetime, outcome: str, error: str | None) -> JobRun:
        return JobRun(
            id=new_id(),
            job_id=claim.job_id,
            worker=self.name,
            attempt=claim.attempt,
            started_at=claim.started_at,
            finished_at=now,
            outcome=outcome,
            error=error,
        )
