"""The sweeper: removes what a crash between the pipeline's writes left unreferenced.

The pipeline writes an instance's object and its PHI rows before the transaction that
makes it visible (ingest.py). A crash in between leaves

* an object no ``instances``/``quarantined_instances`` row names,
* ``phi_instances``/``phi_studies`` rows whose main-database row never committed,
* a ``phi_patients`` row with nothing left (its key is crypto-shredded too).

Each is removed once it is older than the grace period (``PHIVAULT_INGEST_ORPHAN_GRACE_SECONDS``),
so an ingest still in flight on another replica is never touched. The object store has no
reliable write time on every backend, so an unreferenced key is first noted in
``orphan_candidates`` and deleted by a later sweep once the grace period has passed since;
with a grace period of 0 (an operator after a crash, tests) it goes at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import islice
from typing import Final

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import Actor, SystemSubject, record
from phivault.clock import Clock
from phivault.crypto.models import PurgeReason
from phivault.crypto.service import KeyHierarchy
from phivault.db.engine import Database
from phivault.db.jobs import JobContext, JobHandler, enqueue
from phivault.db.models import Job
from phivault.exams.ingest import INSTANCE_KIND, QUARANTINE_KIND
from phivault.exams.models import Instance, OrphanCandidate, QuarantinedInstance, QuarantineStatus, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiStudy
from phivault.storage.base import ObjectStore
from phivault.storage.errors import ObjectNotFound

SWEEP_JOB: Final = "exams.sweep"
_BATCH: Final = 500
_SWEEPER = SystemSubject(Actor.system("sweeper"))


@dataclass(frozen=True, slots=True)
class SweepReport:
    objects_deleted: int = 0
    objects_noted: int = 0
    phi_instances_deleted: int = 0
    phi_studies_deleted: int = 0
    phi_patients_deleted: int = 0


def _batches(items: Iterable[str], size: int = _BATCH) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class Sweeper:
    def __init__(  # the runtime's parts this service composes
        self,
        db: Database,
        phi_db: Database,
        store: ObjectStore,
        keys: KeyHierarchy,
        clock: Clock,
        grace: timedelta,
    ) -> None:
        self._db = db
        self._phi_db = phi_db
        self._store = store
        self._keys = keys
        self._clock = clock
        self._grace = grace

    def sweep(self, grace: timedelta | None = None) -> SweepReport:
        now = self._clock.now()
        cutoff = now - (self._grace if grace is None else grace)
        deleted, noted = self._sweep_objects(now, cutoff)
        instances = self._sweep_phi_instances(cutoff)
        studies = self._sweep_phi_studies(cutoff)
        patients = self._sweep_phi_patients(now, cutoff)
        report = SweepReport(deleted, noted, instances, studies, patients)
        if deleted or instances or studies or patients:
            with self._db.transaction() as session:
                record(session, AuditAction.PHI_SWEEP, _SWEEPER, None, Outcome.SUCCESS, now=now)
        return report

    # -- objects --------------------------------------------------------------------------

    def _sweep_objects(self, now: datetime, cutoff: datetime) -> tuple[int, int]:
        deleted = noted = 0
        for kind in (INSTANCE_KIND, QUARANTINE_KIND):
            for batch in _batches(self._store.keys(f"{kind}/")):
                doomed, newly_noted = self._classify(batch, now, cutoff)
                noted += newly_noted
                for key in doomed:
                    with contextlib.suppress(ObjectNotFound):
                        self._store.delete(key)
                    deleted += 1
                if doomed:
                    with self._db.transaction() as session:
                        session.execute(delete(OrphanCandidate).where(OrphanCandidate.object_key.in_(doomed)))
        return deleted, noted

    def _classify(self, batch: list[str], now: datetime, cutoff: datetime) -> tuple[list[str], int]:
        """Which keys of ``batch`` to delete now; unreferenced new ones are noted."""
        with self._db.transaction() as session:
            referenced = set(
                session.scalars(select(Instance.object_key).where(Instance.object_key.in_(batch)))
            ) | set(
                session.scalars(
                    select(QuarantinedInstance.object_key).where(QuarantinedInstance.object_key.in_(batch))
                )
            )
            candidates = {
                row.object_key: row.first_seen_at
                for row in session.scalars(
                    select(OrphanCandidate).where(OrphanCandidate.object_key.in_(batch))
                )
            }
            if referenced & candidates.keys():
                session.execute(delete(OrphanCandidate).where(OrphanCandidate.object_key.in_(referenced)))
            doomed: list[str] = []
            noted = 0
            for key in (k for k in batch if k not in referenced):
                first_seen = candidates.get(key)
                if first_seen is None and now > cutoff:
                    session.add(OrphanCandidate(object_key=key, first_seen_at=now))
                    noted += 1
                elif first_seen is None or first_seen <= cutoff:
                    doomed.append(key)
        return doomed, noted

    # -- PHI rows -------------------------------------------------------------------------

    def _sweep_phi_instances(self, cutoff: datetime) -> int:
        with self._phi_db.transaction() as phi:
            ids = list(phi.scalars(select(PhiInstance.id).where(PhiInstance.created_at <= cutoff)))
        removed = 0
        for batch in _batches(ids):
            with self._db.transaction() as session:
                present = set(session.scalars(select(Instance.id).where(Instance.id.in_(batch))))
            orphans = [i for i in batch if i not in present]
            if orphans:
                with self._phi_db.transaction() as phi:
                    # Re-checked by age inside the deleting transaction: a re-send may have
                    # just replaced the row (and reset its time) for a commit in flight.
                    result = phi.execute(
                        delete(PhiInstance).where(
                            PhiInstance.id.in_(orphans), PhiInstance.created_at <= cutoff
                        )
                    )
                    removed += int(getattr(result, "rowcount", 0) or 0)
        return removed

    def _sweep_phi_studies(self, cutoff: datetime) -> int:
        with self._phi_db.transaction() as phi:
            ids = list(
                phi.scalars(
                    select(PhiStudy.id).where(
                        PhiStudy.created_at <= cutoff, ~exists().where(PhiInstance.study_id == PhiStudy.id)
                    )
                )
            )
        removed = 0
        for batch in _batches(ids):
            with self._db.transaction() as session:
                present = set(session.scalars(select(Study.id).where(Study.id.in_(batch))))
            orphans = [i for i in batch if i not in present]
            if orphans:
                with self._phi_db.transaction() as phi:
                    result = phi.execute(
                        delete(PhiStudy).where(
                            PhiStudy.id.in_(orphans), ~exists().where(PhiInstance.study_id == PhiStudy.id)
                        )
                    )
                    removed += int(getattr(result, "rowcount", 0) or 0)
        return removed

    def _sweep_phi_patients(self, now: datetime, cutoff: datetime) -> int:
        with self._phi_db.transaction() as phi:
            rows = phi.execute(
                select(PhiPatient.id, PhiPatient.patient_key_id).where(
                    PhiPatient.created_at <= cutoff,
                    ~exists().where(PhiStudy.patient_id == PhiPatient.id),
                    ~exists().where(PhiInstance.patient_id == PhiPatient.id),
                )
            ).all()
        removed = 0
        for row in rows:
            with self._db.transaction() as session:
                in_use = session.scalar(
                    select(
                        exists().where(Study.patient_ref == row.id)
                        | exists().where(
                            QuarantinedInstance.patient_ref == row.id,
                            QuarantinedInstance.status == QuarantineStatus.PENDING.value,
                        )
                    )
                )
                if in_use:
                    continue
                with self._phi_db.transaction() as phi:
                    result = phi.execute(
                        delete(PhiPatient).where(
                            PhiPatient.id == row.id,
                            ~exists().where(PhiStudy.patient_id == PhiPatient.id),
                            ~exists().where(PhiInstance.patient_id == PhiPatient.id),
                        )
                    )
                    gone = int(getattr(result, "rowcount", 0) or 0)
                if gone:
                    # Nothing of this patient is left anywhere: shred the key as well.
                    self._keys.destroy_patient_key(
                        session,
                        row.patient_key_id,
                        actor=_SWEEPER,
                        reason=PurgeReason.ADMINISTRATIVE,
                        now=now,
                    )
                    removed += 1
        return removed


def sweep_job_handler(sweeper: Sweeper, interval: timedelta) -> JobHandler:
    """The job ``exams.sweep``: sweep, then queue the next run ``interval`` from now."""

    def handle(context: JobContext) -> None:
        sweeper.sweep()
        schedule_next(context.session, context.now + interval, now=context.now)

    return handle


def schedule_next(session: Session, run_at: datetime, *, now: datetime) -> None:
    enqueue(session, SWEEP_JOB, {}, now=now, run_at=run_at, dedupe_key=f"{SWEEP_JOB}:{run_at.isoformat()}")


def ensure_scheduled(db: Database, now: datetime) -> None:
    """Queue a sweep unless one is queued or running (at start: the chain may have broken)."""
    with db.transaction() as session:
        pending = session.scalar(
            select(exists().where(Job.kind == SWEEP_JOB, Job.status.in_(("queued", "running"))))
        )
        if not pending:
            schedule_next(session, now, now=now)
