"""The exam API's logic: list and detail, comments, archive, legal hold and deletion.

Reads go through the read core (``reading.py``): scoped by institution, PHI only for
``phi:read``. Every call is one audit event (ids only).

* **Archive** hides an exam from default lists (the exam API's and QIDO-RS searches); it is
  kept, readable by UID, and can be unarchived.
* **Delete** is refused while the exam is under **legal hold** or younger than
  ``PHIVAULT_EXAM_RETENTION_DAYS``. It removes the index rows and comments (one main-database
  transaction: from then on the exam is gone), then the PHI rows and the objects; when the
  patient has nothing left in the institution its key is destroyed in that same
  transaction (crypto-shredding: whatever a crash leaves behind, and every backup copy, can
  no longer be decrypted). The sweeper removes what a crash between the steps leaves.
* **Comments** may name the patient, so bodies are sealed under the patient key and shown
  to PHI readers only; others see that a comment exists, by whom and when.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from phivault.accounts.errors import Forbidden
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction
from phivault.audit.service import RequestContext, Target
from phivault.crypto.models import PurgeReason
from phivault.exams.errors import ExamProtected, NotCommentAuthor, NotFound
from phivault.exams.models import ExamComment, Instance, QuarantinedInstance, QuarantineStatus, Series, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiStudy
from phivault.exams.phi_store import field_aad
from phivault.exams.reading import ExamReader, PatientPhi, StudyPhi, may_read_phi, reading_institution
from phivault.exams.search import Searcher, modalities_include
from phivault.ids import new_id
from phivault.storage.errors import ObjectNotFound

log = logging.getLogger(__name__)

MAX_PAGE: Final = 200
MAX_COMMENT: Final = 4000


@dataclass(frozen=True, slots=True)
class ExamFilter:
    """Filters of the exam list; ``patient_id`` (a PHI key) only for PHI readers."""

    archived: bool = False  # include archived exams
    modality: str | None = None
    patient: str | None = None  # the pseudonym
    patient_id: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    limit: int = 50
    offset: int = 0


@dataclass(frozen=True, slots=True)
class ExamPhi:
    patient: PatientPhi
    study: StudyPhi


@dataclass(frozen=True, slots=True)
class Exam:
    study: Study
    phi: ExamPhi | None


@dataclass(frozen=True, slots=True)
class ExamDetail:
    exam: Exam
    series: list[Series]
    comments: int


@dataclass(frozen=True, slots=True)
class ExamPage:
    items: list[Exam]
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class Comment:
    id: str
    exam_id: str
    author_id: str
    body: str | None  # None for readers without phi:read
    created_at: datetime
    updated_at: datetime
    own: bool


class ExamService:
    """``runtime.exams``: see the module docstring."""

    def __init__(self, reader: ExamReader, searcher: Searcher, *, retention: timedelta) -> None:
        self.reader = reader
        self.searcher = searcher
        self.retention = retention

    # -- reading --------------------------------------------------------------------------

    def search(self, principal: Principal, filters: ExamFilter, *, context: RequestContext) -> ExamPage:
        institution_id = reading_institution(principal)
        phi_ok = may_read_phi(principal, institution_id)
        if filters.patient_id and not phi_ok:
            raise Forbidden
        reader = self.reader
        # The PHI database is only read here: a write transaction would take SQLite's write lock
        # in whichever order the two sessions are first used, and two requests taking the two
        # locks in opposite orders wait on each other until the busy timeout (bench/load.py).
        with reader.db.transaction() as session, reader.phi_db.read() as phi_session:
            query = select(Study).where(Study.institution_id == institution_id)
            if not filters.archived:
                query = query.where(Study.archived_at.is_(None))
            if filters.modality:
                query = query.where(modalities_include([filters.modality]))
            if filters.patient:
                query = query.where(Study.patient_ref == filters.patient)
            if filters.created_from is not None:
                query = query.where(Study.created_at >= filters.created_from)
            if filters.created_to is not None:
                query = query.where(Study.created_at < filters.created_to)
            if filters.patient_id:
                patients = self.searcher.patients_with_id(phi_session, institution_id, filters.patient_id)
                query = query.where(Study.patient_ref.in_(sorted(patients)))
            rows = list(
                session.scalars(
                    query.order_by(Study.created_at.desc(), Study.id)
                    .offset(filters.offset)
                    .limit(filters.limit + 1)
                )
            )
            more = len(rows) > filters.limit
            rows = rows[: filters.limit]
            items = self._exams(session, phi_session, rows, phi_ok=phi_ok)
            reader.audit(session, principal, AuditAction.EXAM_SEARCH, None, context)
            if phi_ok:
                reader.audit_phi(session, principal, (study.patient_ref for study in rows), context)
        return ExamPage(items, filters.offset + filters.limit if more else None)

    def detail(self, principal: Principal, exam_id: str, *, context: RequestContext) -> ExamDetail:
        reader = self.reader
        with reader.db.transaction() as session, reader.phi_db.read() as phi_session:
            study = reader.study_by_id(session, principal, exam_id)
            phi_ok = may_read_phi(principal, study.institution_id)
            series = list(
                session.scalars(
                    select(Series)
                    .where(Series.study_id == study.id)
                    .order_by(Series.series_number, Series.id)
                )
            )
            comments = session.scalar(
                select(func.count()).select_from(ExamComment).where(ExamComment.study_id == study.id)
            )
            (exam,) = self._exams(session, phi_session, [study], phi_ok=phi_ok)
            reader.audit(session, principal, AuditAction.EXAM_VIEW, Target("study", study.id), context)
            if phi_ok:
                reader.audit_phi(session, principal, [study.patient_ref], context)
        return ExamDetail(exam, series, int(comments or 0))

    def _exams(
        self, session: Session, phi_session: Session, studies: list[Study], *, phi_ok: bool
    ) -> list[Exam]:
        if not phi_ok:
            return [Exam(study, None) for study in studies]
        batch = self.reader.phi_of(session, phi_session, studies)
        return [
            Exam(study, ExamPhi(batch.patient(study.patient_ref), batch.study(study.id))) for study in studies
        ]

    # -- archive and legal hold -----------------------------------------------------------

    def set_archived(
        self, principal: Principal, exam_id: str, *, archived: bool, context: RequestContext
    ) -> Exam:
        _require(principal, Permission.EXAM_ARCHIVE)
        with self.reader.db.transaction() as session:
            study = self._locked(session, principal, exam_id)
            now = self.reader.clock.now()
            if archived and study.archived_at is None:
                study.archived_at = now
            elif not archived:
                study.archived_at = None
            action = AuditAction.EXAM_ARCHIVE if archived else AuditAction.EXAM_UNARCHIVE
            self.reader.audit(session, principal, action, Target("study", study.id), context)
        return Exam(study, None)

    def set_legal_hold(
        self, principal: Principal, exam_id: str, *, held: bool, context: RequestContext
    ) -> Exam:
        _require(principal, Permission.EXAM_HOLD)
        with self.reader.db.transaction() as session:
            study = self._locked(session, principal, exam_id)
            if held and study.legal_hold_at is None:
                study.legal_hold_at = self.reader.clock.now()
                study.legal_hold_by = principal.actor.id[:36]
            elif not held:
                study.legal_hold_at = None
                study.legal_hold_by = None
            action = AuditAction.EXAM_LEGAL_HOLD if held else AuditAction.EXAM_LEGAL_HOLD_RELEASE
            self.reader.audit(session, principal, action, Target("study", study.id), context)
        return Exam(study, None)

    def _locked(self, session: Session, principal: Principal, exam_id: str) -> Study:
        self.reader.study_by_id(session, principal, exam_id)  # scope first: 404 for strangers
        study = session.get(Study, exam_id, with_for_update=True, populate_existing=True)
        if study is None:
            raise NotFound
        return study

    # -- deletion -------------------------------------------------------------------------

    def delete(
        self,
        principal: Principal,
        exam_id: str,
        *,
        reason: PurgeReason = PurgeReason.ADMINISTRATIVE,
        context: RequestContext,
    ) -> None:
        """Delete an exam (see the module docstring); ``ExamProtected`` while held or retained."""
        _require(principal, Permission.EXAM_DELETE)
        reader = self.reader
        now = reader.clock.now()
        with reader.db.transaction() as session:
            study = self._locked(session, principal, exam_id)
            if study.legal_hold_at is not None:
                raise ExamProtected("legal_hold", "the exam is under legal hold")
            kept_until = study.created_at + self.retention
            if now < kept_until:
                raise ExamProtected(
                    "retention_period", f"the exam is kept until {kept_until.date().isoformat()} (retention)"
                )
            object_keys = list(
                session.scalars(select(Instance.object_key).where(Instance.study_id == study.id))
            )
            session.execute(delete(ExamComment).where(ExamComment.study_id == study.id))
            session.execute(delete(Instance).where(Instance.study_id == study.id))
            session.execute(delete(Series).where(Series.study_id == study.id))
            session.execute(delete(Study).where(Study.id == study.id))
            reader.audit(session, principal, AuditAction.EXAM_DELETE, Target("study", study.id), context)
            patient_ref, patient_key_id = study.patient_ref, study.patient_key_id
            in_use = session.scalar(
                select(
                    exists().where(Study.patient_ref == patient_ref)
                    | exists().where(
                        QuarantinedInstance.patient_ref == patient_ref,
                        QuarantinedInstance.status == QuarantineStatus.PENDING.value,
                    )
                )
            )
            if not in_use:
                reader.keys.destroy_patient_key(
                    session, patient_key_id, actor=principal, reason=reason, now=now
                )
        with reader.phi_db.transaction() as phi:
            phi.execute(delete(PhiInstance).where(PhiInstance.study_id == exam_id))
            phi.execute(delete(PhiStudy).where(PhiStudy.id == exam_id))
            if not in_use:
                phi.execute(delete(PhiPatient).where(PhiPatient.id == patient_ref))  # tokens cascade
        for key in object_keys:
            try:
                reader.store.delete(key)
            except ObjectNotFound:
                pass
            except Exception:  # noqa: BLE001  # the sweeper removes it later; the exam is gone already
                log.warning("could not delete object %s of a deleted exam; the sweeper will", key)

    # -- comments -------------------------------------------------------------------------

    def comments(self, principal: Principal, exam_id: str, *, context: RequestContext) -> list[Comment]:
        reader = self.reader
        with reader.db.transaction() as session:
            study = reader.study_by_id(session, principal, exam_id)
            rows = list(
                session.scalars(
                    select(ExamComment)
                    .where(ExamComment.study_id == study.id)
                    .order_by(ExamComment.created_at, ExamComment.id)
                )
            )
            phi_ok = may_read_phi(principal, study.institution_id)
            found = [self._comment(session, study, row, principal, phi_ok=phi_ok) for row in rows]
            reader.audit(session, principal, AuditAction.EXAM_VIEW, Target("study", study.id), context)
            if phi_ok and rows:
                reader.audit_phi(session, principal, [study.patient_ref], context)
        return found

    def add_comment(
        self, principal: Principal, exam_id: str, body: str, *, context: RequestContext
    ) -> Comment:
        _require(principal, Permission.EXAM_COMMENT)
        reader = self.reader
        with reader.db.transaction() as session:
            study = reader.study_by_id(session, principal, exam_id)
            now = reader.clock.now()
            comment_id = new_id()
            row = ExamComment(
                id=comment_id,
                institution_id=study.institution_id,
                study_id=study.id,
                author_id=principal.actor.id[:36],
                body=self._seal(session, study, comment_id, body),
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            reader.audit(
                session, principal, AuditAction.EXAM_COMMENT_CREATE, Target("comment", comment_id), context
            )
            return self._comment(
                session, study, row, principal, phi_ok=may_read_phi(principal, study.institution_id)
            )

    def edit_comment(
        self, principal: Principal, exam_id: str, comment_id: str, body: str, *, context: RequestContext
    ) -> Comment:
        _require(principal, Permission.EXAM_COMMENT)
        reader = self.reader
        with reader.db.transaction() as session:
            study, row = self._own_comment(session, principal, exam_id, comment_id)
            row.body = self._seal(session, study, row.id, body)
            row.updated_at = reader.clock.now()
            reader.audit(
                session, principal, AuditAction.EXAM_COMMENT_UPDATE, Target("comment", row.id), context
            )
            return self._comment(
                session, study, row, principal, phi_ok=may_read_phi(principal, study.institution_id)
            )

    def delete_comment(
        self, principal: Principal, exam_id: str, comment_id: str, *, context: RequestContext
    ) -> None:
        _require(principal, Permission.EXAM_COMMENT)
        reader = self.reader
        with reader.db.transaction() as session:
            _, row = self._own_comment(session, principal, exam_id, comment_id)
            session.delete(row)
            reader.audit(
                session, principal, AuditAction.EXAM_COMMENT_DELETE, Target("comment", row.id), context
            )

    def _own_comment(
        self, session: Session, principal: Principal, exam_id: str, comment_id: str
    ) -> tuple[Study, ExamComment]:
        study = self.reader.study_by_id(session, principal, exam_id)
        row = session.get(ExamComment, comment_id, with_for_update=True)
        if row is None or row.study_id != study.id:
            raise NotFound
        if row.author_id != principal.actor.id:
            raise NotCommentAuthor
        return study, row

    def _seal(self, session: Session, study: Study, comment_id: str, body: str) -> bytes:
        return self.reader.keys.encrypt_field(
            session, study.patient_key_id, body, aad=field_aad("exam_comments", "body", comment_id)
        )

    def _comment(
        self, session: Session, study: Study, row: ExamComment, principal: Principal, *, phi_ok: bool
    ) -> Comment:
        body = None
        if phi_ok:
            body = self.reader.keys.decrypt_field(
                session, study.patient_key_id, row.body, aad=field_aad("exam_comments", "body", row.id)
            ).decode()
        return Comment(
            id=row.id,
            exam_id=row.study_id,
            author_id=row.author_id,
            body=body,
            created_at=row.created_at,
            updated_at=row.updated_at,
            own=row.author_id == principal.actor.id,
        )


def _require(principal: Principal, permission: Permission) -> None:
    if not principal.has(permission):
        raise Forbidden
