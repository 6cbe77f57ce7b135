from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import func, select

from phivault.clock import ManualClock
from phivault.db.jobs import JobContext, JobError, JobRegistry, Worker, enqueue
from phivault.db.models import Job, JobRun
from phivault.runtime import Runtime


def _registry(handler: object) -> JobRegistry:
    registry = JobRegistry()
    registry.register("test.kind", handler)  # type: ignore[arg-type]
    return registry


def _enqueue(runtime: Runtime, clock: ManualClock, **kwargs: object) -> str:
    with runtime.db.transaction() as session:
        return enqueue(session, "test.kind", {"n": 1}, now=clock.now(), **kwargs)  # type: ignore[arg-type]


def _job(runtime: Runtime, job_id: str) -> Job:
    with runtime.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_queued_job_runs_once_and_is_recorded(runtime: Runtime, clock: ManualClock) -> None:
    seen: list[dict[str, object]] = []
    worker = Worker(runtime.db, _registry(lambda ctx: seen.append(dict(ctx.payload))), clock, name="w1")
    job_id = _enqueue(runtime, clock)
    assert worker.run_once()
    assert not worker.run_once()
    assert seen == [{"n": 1}]
    job = _job(runtime, job_id)
    assert (job.status, job.attempts, job.lease_owner) == ("succeeded", 1, None)
    with runtime.db.transaction() as session:
        runs = session.scalars(select(JobRun).where(JobRun.job_id == job_id)).all()
    assert [(run.worker, run.outcome) for run in runs] == [("w1", "succeeded")]


def test_handler_database_writes_commit_with_the_job(runtime: Runtime, clock: ManualClock) -> None:
    def handler(ctx: JobContext) -> None:
        enqueue(ctx.session, "test.follow-up", {}, now=ctx.now)

    Worker(runtime.db, _registry(handler), clock).run_once()
    _enqueue(runtime, clock)
    Worker(runtime.db, _registry(handler), clock).run_once()
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).where(Job.kind == "test.follow-up")) == 1


def test_failed_job_is_retried_with_backoff_then_fails(runtime: Runtime, clock: ManualClock) -> None:
    def handler(_ctx: JobContext) -> None:
        raise JobError("peer 7 refused")

    worker = Worker(runtime.db, _registry(handler), clock)
    job_id = _enqueue(runtime, clock, max_attempts=2)
    assert worker.run_once()
    job = _job(runtime, job_id)
    assert (job.status, job.attempts, job.last_error) == ("queued", 1, "peer 7 refused")
    assert not worker.run_once()  # backing off: not due yet
    clock.advance(timedelta(seconds=3))
    assert worker.run_once()
    job = _job(runtime, job_id)
    assert (job.status, job.attempts) == ("failed", 2)
    assert not worker.run_once()


def test_unexpected_exception_messages_are_not_stored(runtime: Runtime, clock: ManualClock) -> None:
    def handler(_ctx: JobContext) -> None:
        raise ValueError("DOE^JANE 1970-01-01")  # may quote data: only its type is kept

    job_id = _enqueue(runtime, clock)
    Worker(runtime.db, _registry(handler), clock).run_once()
    assert _job(runtime, job_id).last_error == "ValueError"


def test_failing_handler_rolls_back_its_writes(runtime: Runtime, clock: ManualClock) -> None:
    def handler(ctx: JobContext) -> None:
        enqueue(ctx.session, "test.side-effect", {}, now=ctx.now)
        raise JobError("boom")

    _enqueue(runtime, clock)
    Worker(runtime.db, _registry(handler), clock).run_once()
    with runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).where(Job.kind == "test.side-effect")) == 0


def test_expired_lease_is_taken_over_and_the_stalled_worker_cannot_commit(
    runtime: Runtime, clock: ManualClock
) -> None:
    """The exactly-once argument: a stalled worker's late completion is discarded."""
    release = threading.Event()
    started = threading.Event()
    calls: list[str] = []

    def slow(ctx: JobContext) -> None:
        calls.append("slow")
        enqueue(ctx.session, "test.effect", {"by": "slow"}, now=ctx.now)
        started.set()
        release.wait(10)

    def fast(ctx: JobContext) -> None:
        calls.append("fast")
        enqueue(ctx.session, "test.effect", {"by": "fast"}, now=ctx.now)

    job_id = _enqueue(runtime, clock)
    lease = timedelta(seconds=30)
    stalled = Worker(runtime.db, _registry(slow), clock, name="stalled", lease=lease)
    if runtime.db.is_sqlite:
        # SQLite serialises writers: the stalled worker's open transaction would block the
        # other. Simulate the stall by claiming and abandoning (a crashed worker) instead.
        claim = stalled._claim()
        assert claim is not None
    else:
        thread = threading.Thread(target=stalled.run_once)
        thread.start()
        assert started.wait(10)
    clock.advance(lease + timedelta(seconds=1))
    rescuer = Worker(runtime.db, _registry(fast), clock, name="rescuer", lease=lease)
    assert rescuer.run_once()
    if not runtime.db.is_sqlite:
        release.set()
        thread.join(10)
    job = _job(runtime, job_id)
    assert (job.status, job.attempts) == ("succeeded", 2)
    with runtime.db.transaction() as session:
        effects = session.scalars(select(Job.payload).where(Job.kind == "test.effect")).all()
        runs = session.scalars(
            select(JobRun.worker).where(JobRun.job_id == job_id, JobRun.outcome == "succeeded")
        ).all()
    assert effects == [{"by": "fast"}]
    assert runs == ["rescuer"]


def test_dedupe_key_enqueues_once(runtime: Runtime, clock: ManualClock) -> None:
    first = _enqueue(runtime, clock, dedupe_key="rotate:inst-1")
    second = _enqueue(runtime, clock, dedupe_key="rotate:inst-1")
    assert first == second


def test_jobs_of_unknown_kinds_are_left_for_workers_that_know_them(
    runtime: Runtime, clock: ManualClock
) -> None:
    with runtime.db.transaction() as session:
        job_id = enqueue(session, "other.kind", {}, now=clock.now())
    assert not Worker(runtime.db, _registry(lambda _ctx: None), clock).run_once()
    assert _job(runtime, job_id).status == "queued"


def test_a_worker_whose_last_attempt_died_marks_the_job_failed(runtime: Runtime, clock: ManualClock) -> None:
    job_id = _enqueue(runtime, clock, max_attempts=1)
    crashed = Worker(runtime.db, _registry(lambda _ctx: None), clock, lease=timedelta(seconds=10))
    assert crashed._claim() is not None  # claimed, then the process died
    clock.advance(timedelta(seconds=11))
    assert not crashed.run_once()
    assert _job(runtime, job_id).status == "failed"
