"""Export to PACS: the institution's own PACS gets its exams back, re-identified.

* **Destinations** (``pacs:manage``, institution admins): AE title, host, port, the calling
  AE title the PACS knows phivault by, optional DICOM TLS with a CA (PEM).
* **Export** (``exam:export``): ``POST /api/v1/exams/{id}/exports`` records one row per
  instance of the exam and queues a job (``db/jobs.py``, kind ``exams.export``). Asking
  again while an export of the exam to the same destination is under way returns that one.
* **The job** opens one association (``dicom/scu.py``) and, for each instance not yet
  confirmed, re-identifies the stored instance (``dicom/reid.py``: the PHI store's values
  and the original UIDs, so the PACS files it under the patient it knows) and sends it
  with C-STORE. Each confirmation is committed at once, so a retry sends only what the
  PACS has not confirmed: nothing is lost, nothing sent twice (but for an instance whose
  confirmation arrived as phivault stopped; the PACS files it again under the same SOP
  Instance UID). An attempt that leaves instances unconfirmed (PACS down, association
  refused, an instance refused) is retried with back-off (2, 4, 8 … s, at most 30 min
  apart) up to ``PHIVAULT_PACS_EXPORT_MAX_ATTEMPTS``; then the export is ``failed`` with
  the reason. ``POST …/exports/{id}/retry`` tries a failed export again (the unconfirmed
  instances only).
* **Audit**: ``export.create`` (the user), ``phi.export`` (the patient, by pseudonym, for
  each attempt that sent PHI), ``export.complete`` or ``export.fail``; destinations'
  changes. Ids and DIMSE statuses only.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from phivault.accounts.errors import Forbidden
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import Actor, RequestContext, SystemSubject, Target, record
from phivault.config.settings import Settings
from phivault.crypto.errors import KeyShredded, ObjectIntegrityError
from phivault.db.jobs import MAX_BACKOFF, JobContext, JobError, JobRegistry, enqueue
from phivault.dicom.aetitle import ae_title_problem, normalise_ae_title
from phivault.dicom.scu import (
    STORED,
    AssociationFailed,
    StoreAssociation,
    StorePeer,
    ca_problem,
    presentation_contexts,
)
from phivault.exams.errors import InvalidRequest, NotFound
from phivault.exams.models import Instance, Series, Study
from phivault.exams.outbound_models import (
    ExamExport,
    ExamExportItem,
    ExportItemStatus,
    ExportStatus,
    PacsDestination,
)
from phivault.exams.reading import ExamReader, InstanceReading, reading_institution
from phivault.ids import new_id
from phivault.storage.errors import ObjectNotFound

EXPORT_JOB: Final = "exams.export"
MAX_NAME: Final = 100
_HOST: Final = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
    r"|^\[?[0-9A-Fa-f:.]{2,45}\]?$"
)
_ACTIVE: Final = (ExportStatus.QUEUED.value, ExportStatus.RUNNING.value, ExportStatus.RETRYING.value)
_SYSTEM: Final = Actor.system("pacs-export")


class DestinationInUse(Exception):
    """An export to the destination is under way (409)."""


class ExportNotRetryable(Exception):
    """Only a failed export is retried (409)."""


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    tls: bool = False
    ca_pem: str | None = None


@dataclass(frozen=True, slots=True)
class DestinationInfo:
    id: str
    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    tls: bool
    ca_pem: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: PacsDestination) -> DestinationInfo:
        return cls(
            row.id,
            row.name,
            row.ae_title,
            row.host,
            row.port,
            row.calling_ae_title,
            row.tls,
            row.ca_pem,
            row.created_at,
            row.updated_at,
        )


@dataclass(frozen=True, slots=True)
class ExportItemInfo:
    number: int
    instance_id: str
    status: ExportItemStatus
    attempts: int
    dimse_status: int | None
    error: str | None
    sent_at: datetime | None


@dataclass(frozen=True, slots=True)
class ExportInfo:
    id: str
    exam_id: str
    destination_id: str
    requested_by: str
    status: ExportStatus
    attempts: int
    max_attempts: int
    reason: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    items: list[ExportItemInfo]

    @property
    def sent(self) -> int:
        return sum(1 for item in self.items if item.status is ExportItemStatus.SENT)


def _export_info(row: ExamExport, items: Sequence[ExamExportItem]) -> ExportInfo:
    return ExportInfo(
        id=row.id,
        exam_id=row.study_id,
        destination_id=row.destination_id,
        requested_by=row.requested_by,
        status=ExportStatus(row.status),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        reason=row.reason,
        next_attempt_at=row.next_attempt_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        items=[
            ExportItemInfo(
                item.number,
                item.instance_id,
                ExportItemStatus(item.status),
                item.attempts,
                item.dimse_status,
                item.error,
                item.sent_at,
            )
            for item in sorted(items, key=lambda item: item.number)
        ],
    )


def _managing_institution(principal: Principal) -> str:
    if not principal.has(Permission.PACS_MANAGE):
        raise Forbidden
    if principal.institution_id is None:
        raise Forbidden
    return principal.institution_id


def _validated(spec: DestinationSpec) -> DestinationSpec:
    name = " ".join(spec.name.split())
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidRequest("pacs_destination_invalid", f"a name has 1 to {MAX_NAME} characters")
    titles = []
    for title in (spec.ae_title, spec.calling_ae_title):
        problem = ae_title_problem(title)
        if problem is not None:
            raise InvalidRequest("invalid_ae_title", problem)
        titles.append(normalise_ae_title(title))
    host = spec.host.strip()
    if not _HOST.match(host):
        raise InvalidRequest("pacs_destination_invalid", "host is a DNS name or an IP address")
    if not 1 <= spec.port <= 65535:  # noqa: PLR2004
        raise InvalidRequest("pacs_destination_invalid", "port is 1 to 65535")
    ca_pem = spec.ca_pem.strip() if spec.ca_pem else None
    if ca_pem is not None:
        if not spec.tls:
            raise InvalidRequest("pacs_destination_invalid", "ca_pem is used with tls only")
        problem = ca_problem(ca_pem)
        if problem is not None:
            raise InvalidRequest("pacs_ca_invalid", problem)
    return DestinationSpec(name, titles[0], host.strip("[]"), spec.port, titles[1], spec.tls, ca_pem)


class PacsDestinations:
    """``runtime.pacs_destinations``: an institution's PACS, configured by its admins."""

    def __init__(self, reader: ExamReader) -> None:
        self.reader = reader

    def all(self, principal: Principal) -> list[DestinationInfo]:
        institution_id = _managing_institution(principal)
        with self.reader.db.transaction() as session:
            rows = session.scalars(
                select(PacsDestination)
                .where(PacsDestination.institution_id == institution_id)
                .order_by(PacsDestination.name)
            )
            return [DestinationInfo.of(row) for row in rows]

    def get(self, principal: Principal, destination_id: str) -> DestinationInfo:
        institution_id = _managing_institution(principal)
        with self.reader.db.transaction() as session:
            return DestinationInfo.of(_destination(session, institution_id, destination_id))

    def create(
        self, principal: Principal, spec: DestinationSpec, *, context: RequestContext
    ) -> DestinationInfo:
        institution_id = _managing_institution(principal)
        spec = _validated(spec)
        now = self.reader.clock.now()
        with self.reader.db.transaction() as session:
            self._name_free(session, institution_id, spec.name, None)
            row = PacsDestination(
                id=new_id(),
                institution_id=institution_id,
                name=spec.name,
                ae_title=spec.ae_title,
                host=spec.host,
                port=spec.port,
                calling_ae_title=spec.calling_ae_title,
                tls=spec.tls,
                ca_pem=spec.ca_pem,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            self._audit(session, principal, AuditAction.PACS_DESTINATION_CREATE, row.id, context)
            return DestinationInfo.of(row)

    def update(
        self, principal: Principal, destination_id: str, spec: DestinationSpec, *, context: RequestContext
    ) -> DestinationInfo:
        institution_id = _managing_institution(principal)
        spec = _validated(spec)
        with self.reader.db.transaction() as session:
            row = _destination(session, institution_id, destination_id, lock=True)
            self._name_free(session, institution_id, spec.name, row.id)
            row.name, row.ae_title, row.host, row.port = spec.name, spec.ae_title, spec.host, spec.port
            row.calling_ae_title, row.tls, row.ca_pem = spec.calling_ae_title, spec.tls, spec.ca_pem
            row.updated_at = self.reader.clock.now()
            self._audit(session, principal, AuditAction.PACS_DESTINATION_UPDATE, row.id, context)
            return DestinationInfo.of(row)

    def delete(self, principal: Principal, destination_id: str, *, context: RequestContext) -> None:
        """Remove a destination and its export history (the audit log keeps the trail);
        refused while an export to it is under way.
        """
        institution_id = _managing_institution(principal)
        with self.reader.db.transaction() as session:
            row = _destination(session, institution_id, destination_id, lock=True)
            busy = session.scalar(
                select(ExamExport.id).where(
                    ExamExport.destination_id == row.id, ExamExport.status.in_(_ACTIVE)
                )
            )
            if busy is not None:
                raise DestinationInUse
            for export in session.scalars(select(ExamExport).where(ExamExport.destination_id == row.id)):
                session.delete(export)
            session.delete(row)
            self._audit(session, principal, AuditAction.PACS_DESTINATION_DELETE, row.id, context)

    @staticmethod
    def _name_free(session: Session, institution_id: str, name: str, own_id: str | None) -> None:
        taken = session.scalar(
            select(PacsDestination.id).where(
                PacsDestination.institution_id == institution_id, PacsDestination.name == name
            )
        )
        if taken is not None and taken != own_id:
            raise InvalidRequest("pacs_destination_name_taken", "another destination has this name")

    def _audit(
        self,
        session: Session,
        principal: Principal,
        action: AuditAction,
        row_id: str,
        context: RequestContext,
    ) -> None:
        record(
            session,
            action,
            principal,
            Target("pacs_destination", row_id),
            Outcome.SUCCESS,
            now=self.reader.clock.now(),
            context=context,
        )


def _destination(
    session: Session, institution_id: str, destination_id: str, *, lock: bool = False
) -> PacsDestination:
    row = session.get(PacsDestination, destination_id, with_for_update=lock)
    if row is None or row.institution_id != institution_id:
        raise NotFound
    return row


class ExportService:
    """``runtime.exports``: see the module docstring."""

    def __init__(self, settings: Settings, reader: ExamReader) -> None:
        self.settings = settings
        self.reader = reader

    def register_jobs(self, registry: JobRegistry) -> None:
        registry.register(EXPORT_JOB, self.run_job)

    # -- requests -------------------------------------------------------------------------

    def create(
        self, principal: Principal, exam_id: str, destination_id: str, *, context: RequestContext
    ) -> ExportInfo:
        if not principal.has(Permission.EXAM_EXPORT):
            raise Forbidden
        reader = self.reader
        now = reader.clock.now()
        with reader.db.transaction() as session:
            study = reader.study_by_id(session, principal, exam_id)
            destination = _destination(session, study.institution_id, destination_id)
            active = session.scalars(
                select(ExamExport).where(
                    ExamExport.study_id == study.id,
                    ExamExport.destination_id == destination.id,
                    ExamExport.status.in_(_ACTIVE),
                )
            ).first()
            if active is not None:
                return self._info(session, active)
            instances = reader.instances(session, study)
            if not instances:
                raise NotFound
            row = ExamExport(
                id=new_id(),
                institution_id=study.institution_id,
                study_id=study.id,
                destination_id=destination.id,
                requested_by=principal.actor.id[:36],
                status=ExportStatus.QUEUED.value,
                attempts=0,
                max_attempts=self.settings.pacs_export_max_attempts,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            session.add_all(
                ExamExportItem(
                    export_id=row.id,
                    instance_id=instance.id,
                    number=number,
                    status=ExportItemStatus.PENDING.value,
                    attempts=0,
                )
                for number, instance in enumerate(instances, start=1)
            )
            row.job_id = self._enqueue(session, row, now)
            record(
                session,
                AuditAction.EXPORT_CREATE,
                principal,
                Target("export", row.id),
                Outcome.SUCCESS,
                now=now,
                context=context,
            )
            session.flush()
            return self._info(session, row)

    def _enqueue(self, session: Session, row: ExamExport, now: datetime) -> str:
        return enqueue(session, EXPORT_JOB, {"export_id": row.id}, now=now, max_attempts=row.max_attempts)

    def get(
        self, principal: Principal, exam_id: str, export_id: str, *, context: RequestContext
    ) -> ExportInfo:
        reader = self.reader
        with reader.db.transaction() as session:
            row = self._scoped(session, principal, exam_id, export_id)
            reader.audit(session, principal, AuditAction.EXAM_VIEW, Target("export", row.id), context)
            return self._info(session, row)

    def exports_of(self, principal: Principal, exam_id: str, *, context: RequestContext) -> list[ExportInfo]:
        reader = self.reader
        with reader.db.transaction() as session:
            study = reader.study_by_id(session, principal, exam_id)
            rows = session.scalars(
                select(ExamExport)
                .where(ExamExport.institution_id == study.institution_id, ExamExport.study_id == study.id)
                .order_by(ExamExport.created_at.desc(), ExamExport.id)
            )
            found = [self._info(session, row) for row in rows]
            reader.audit(session, principal, AuditAction.EXAM_VIEW, Target("study", study.id), context)
            return found

    def retry(
        self, principal: Principal, exam_id: str, export_id: str, *, context: RequestContext
    ) -> ExportInfo:
        """Queue a failed export again: its unconfirmed instances only."""
        if not principal.has(Permission.EXAM_EXPORT):
            raise Forbidden
        now = self.reader.clock.now()
        with self.reader.db.transaction() as session:
            row = self._scoped(session, principal, exam_id, export_id, lock=True)
            if row.status != ExportStatus.FAILED.value:
                raise ExportNotRetryable
            session.execute(
                update(ExamExportItem)
                .where(
                    ExamExportItem.export_id == row.id, ExamExportItem.status == ExportItemStatus.FAILED.value
                )
                .values(status=ExportItemStatus.PENDING.value)
            )
            row.status = ExportStatus.QUEUED.value
            row.reason = None
            row.finished_at = None
            row.next_attempt_at = None
            row.updated_at = now
            row.job_id = self._enqueue(session, row, now)
            record(
                session,
                AuditAction.EXPORT_CREATE,
                principal,
                Target("export", row.id),
                Outcome.SUCCESS,
                now=now,
                context=context,
            )
            session.flush()
            return self._info(session, row)

    def _scoped(
        self, session: Session, principal: Principal, exam_id: str, export_id: str, *, lock: bool = False
    ) -> ExamExport:
        study = self.reader.study_by_id(session, principal, exam_id)
        row = session.get(ExamExport, export_id, with_for_update=lock)
        if row is None or row.study_id != study.id or row.institution_id != reading_institution(principal):
            raise NotFound
        return row

    @staticmethod
    def _info(session: Session, row: ExamExport) -> ExportInfo:
        items = list(session.scalars(select(ExamExportItem).where(ExamExportItem.export_id == row.id)))
        return _export_info(row, items)

    # -- the job --------------------------------------------------------------------------

    def run_job(self, job: JobContext) -> None:
        """Job ``exams.export``: one attempt (see the module docstring).

        Never touches ``job.session`` before the end: progress is committed in transactions
        of its own, so it survives a failed attempt (and SQLite's one writer is not held
        while the PACS answers).
        """
        export_id = str(job.payload["export_id"])
        started = self._start_attempt(export_id, job.job_id)
        if started is None:
            return
        export, study, destination, pending = started
        sent_now = 0
        failure: str | None = None
        try:
            sent_now, failure = self._send(export, study, destination, pending)
        except AssociationFailed as exc:
            failure = str(exc)
        except Exception as exc:  # noqa: BLE001  # any failure of an attempt is recorded and retried
            failure = f"the attempt failed: {type(exc).__name__}"  # the type only: messages may quote data
        self._finish_attempt(export, study, sent_now, failure, job)

    def _start_attempt(
        self, export_id: str, job_id: str
    ) -> tuple[ExamExport, Study, StorePeer, list[Instance]] | None:
        now = self.reader.clock.now()
        with self.reader.db.transaction() as session:
            export = session.get(ExamExport, export_id, with_for_update=True)
            if export is None or export.status not in _ACTIVE or export.job_id != job_id:
                return None  # finished, deleted, or superseded by a retry's job
            export.status = ExportStatus.RUNNING.value
            export.attempts += 1
            export.updated_at = now
            export.next_attempt_at = None
            study = session.get(Study, export.study_id)
            destination = session.get(PacsDestination, export.destination_id)
            if study is None or destination is None:
                export.status = ExportStatus.FAILED.value
                export.reason = "the exam was deleted" if study is None else "the destination was removed"
                export.finished_at = now
                self._audit(session, export, AuditAction.EXPORT_FAIL, now)
                return None
            pending_ids = set(
                session.scalars(
                    select(ExamExportItem.instance_id).where(
                        ExamExportItem.export_id == export.id,
                        ExamExportItem.status != ExportItemStatus.SENT.value,
                    )
                )
            )
            pending = [
                instance for instance in self.reader.instances(session, study) if instance.id in pending_ids
            ]
            missing = pending_ids - {instance.id for instance in pending}
            if missing:  # deleted from the exam since: nothing left to send of them
                session.execute(
                    update(ExamExportItem)
                    .where(ExamExportItem.export_id == export.id, ExamExportItem.instance_id.in_(missing))
                    .values(status=ExportItemStatus.FAILED.value, error="the instance was deleted")
                )
            peer = StorePeer(
                destination.ae_title,
                destination.host,
                destination.port,
                destination.calling_ae_title,
                tls=destination.tls,
                ca_pem=destination.ca_pem,
                timeout=self.settings.pacs_timeout_seconds,
            )
            session.expunge(export)
            session.expunge(study)
            return export, study, peer, pending

    def _send(
        self, export: ExamExport, study: Study, peer: StorePeer, pending: list[Instance]
    ) -> tuple[int, str | None]:
        if not pending:
            return 0, None
        contexts = presentation_contexts({(i.sop_class_uid, i.transfer_syntax_uid) for i in pending})
        uid_map: dict[str, str] = {}
        sent = 0
        refused: list[str] = []
        with StoreAssociation(peer, contexts) as association:
            for instance in pending:
                try:
                    dataset = dcmread(
                        io.BytesIO(b"".join(self._reidentified(study, instance, uid_map).iter_dicom()))
                    )
                except (NotFound, ObjectNotFound, KeyShredded, ObjectIntegrityError) as exc:
                    self._item(export.id, instance.id, None, f"not readable: {type(exc).__name__}")
                    refused.append("unreadable")
                    continue
                status = association.store(dataset)
                if status is not None and status in STORED:
                    self._item(export.id, instance.id, status, None)
                    sent += 1
                else:
                    text = "no response" if status is None else f"C-STORE status 0x{status:04X}"
                    self._item(export.id, instance.id, status, text)
                    refused.append(text)
        if refused:
            return sent, f"{len(refused)} of {len(pending)} instances not stored: {refused[0]}"
        return sent, None

    def _reidentified(self, study: Study, instance: Instance, uid_map: dict[str, str]) -> InstanceReading:
        """The instance with its PHI and original UIDs back (the PACS's own record of it)."""
        reader = self.reader
        with reader.db.transaction() as session:
            opened = reader.open(session, study, instance)
            series_uid = session.scalar(
                select(Series.series_instance_uid).where(Series.id == instance.series_id)
            )
            with reader.phi_db.read() as phi_session:
                phi = reader.instance_phi(session, phi_session, study, instance.id)
        uid_map[study.study_instance_uid] = phi.uids.study_instance_uid
        if series_uid is not None:
            uid_map[series_uid] = phi.uids.series_instance_uid
        uid_map[instance.sop_instance_uid] = phi.uids.sop_instance_uid
        return InstanceReading(study, instance, opened, phi, uid_map)

    def _item(self, export_id: str, instance_id: str, status: int | None, error: str | None) -> None:
        now = self.reader.clock.now()
        with self.reader.db.transaction() as session:
            item = session.get(ExamExportItem, (export_id, instance_id), with_for_update=True)
            if item is None:
                return
            item.attempts += 1
            item.dimse_status = status
            item.error = error
            if error is None:
                item.status = ExportItemStatus.SENT.value
                item.sent_at = now
            else:
                item.status = ExportItemStatus.PENDING.value

    def _finish_attempt(
        self, export: ExamExport, study: Study, sent_now: int, failure: str | None, job: JobContext
    ) -> None:
        now = self.reader.clock.now()
        with self.reader.db.transaction() as session:
            row = session.get(ExamExport, export.id, with_for_update=True)
            if row is None:
                return
            if sent_now:
                record(
                    session,
                    AuditAction.PHI_EXPORT,
                    SystemSubject(_SYSTEM, row.institution_id),
                    Target("patient", study.patient_ref),
                    Outcome.SUCCESS,
                    now=now,
                )
            unsent = session.scalar(
                select(ExamExportItem.instance_id).where(
                    ExamExportItem.export_id == row.id, ExamExportItem.status != ExportItemStatus.SENT.value
                )
            )
            row.updated_at = now
            if failure is None and unsent is None:
                row.status = ExportStatus.COMPLETED.value
                row.reason = None
                row.finished_at = now
                self._audit(session, row, AuditAction.EXPORT_COMPLETE, now)
                return
            reason = (failure or "instances could not be read")[:500]
            row.reason = reason
            if job.attempt >= row.max_attempts:
                row.status = ExportStatus.FAILED.value
                row.finished_at = now
                session.execute(
                    update(ExamExportItem)
                    .where(
                        ExamExportItem.export_id == row.id,
                        ExamExportItem.status == ExportItemStatus.PENDING.value,
                    )
                    .values(status=ExportItemStatus.FAILED.value)
                )
                self._audit(session, row, AuditAction.EXPORT_FAIL, now)
            else:
                row.status = ExportStatus.RETRYING.value
                row.next_attempt_at = now + min(timedelta(seconds=2**job.attempt), MAX_BACKOFF)
        # The queue retries with the same back-off (or marks the job failed after the last).
        raise JobError(f"export {export.id}: {reason}")

    def _audit(self, session: Session, row: ExamExport, action: AuditAction, now: datetime) -> None:
        record(
            session,
            action,
            SystemSubject(_SYSTEM, row.institution_id),
            Target("export", row.id),
            Outcome.SUCCESS if action is AuditAction.EXPORT_COMPLETE else Outcome.FAILURE,
            now=now,
        )
