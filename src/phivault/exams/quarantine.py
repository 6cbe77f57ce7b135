"""Quarantine review: an institution admin lists instances whose burned-in text no pixel
rule covered, and releases them with a rule (they then go through the pipeline as if just
received) or rejects them (their bytes are deleted). Nothing here shows PHI: an entry names
its device type and image geometry, which is what choosing a rule needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Final, cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from phivault.accounts.errors import Forbidden
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, RequestContext, Target, record
from phivault.clock import Clock
from phivault.config.settings import Settings
from phivault.crypto.service import KeyHierarchy, ObjectContext, PlaintextStream
from phivault.db.engine import Database
from phivault.dicom.pixels import PixelRule
from phivault.dicom.validation import validate
from phivault.exams.errors import NotFound, QuarantineResolved
from phivault.exams.ingest import QUARANTINE_KIND, IngestService, Received
from phivault.exams.models import QuarantinedInstance, QuarantineStatus
from phivault.exams.types import IngestChannel, IngestOrigin, Receipt
from phivault.storage.base import ObjectStore

MAX_PAGE: Final = 200


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    id: str
    status: str
    reason: str
    sop_class_uid: str
    modality: str
    manufacturer: str
    model_name: str
    rows: int | None
    columns: int | None
    transfer_syntax_uid: str
    received_size: int
    channel: str
    device_id: str | None
    created_at: datetime
    resolved_at: datetime | None
    instance_id: str | None


def _entry(row: QuarantinedInstance) -> QuarantineEntry:
    return QuarantineEntry(
        id=row.id,
        status=row.status,
        reason=row.reason,
        sop_class_uid=row.sop_class_uid,
        modality=row.modality,
        manufacturer=row.manufacturer,
        model_name=row.model_name,
        rows=row.rows,
        columns=row.columns,
        transfer_syntax_uid=row.transfer_syntax_uid,
        received_size=row.received_size,
        channel=row.channel,
        device_id=row.device_id,
        created_at=row.created_at,
        resolved_at=row.resolved_at,
        instance_id=row.instance_id,
    )


class Quarantine:
    def __init__(  # the runtime's parts this service composes
        self,
        settings: Settings,
        db: Database,
        store: ObjectStore,
        keys: KeyHierarchy,
        clock: Clock,
        ingest: IngestService,
    ) -> None:
        self._settings = settings
        self._db = db
        self._store = store
        self._keys = keys
        self._clock = clock
        self._ingest = ingest

    def list(
        self,
        principal: Principal,
        *,
        status: QuarantineStatus | None = QuarantineStatus.PENDING,
        limit: int = 50,
        before: datetime | None = None,
        context: RequestContext = NO_CONTEXT,
    ) -> list[QuarantineEntry]:
        """Newest first; ``before`` pages (the ``created_at`` of the last entry seen)."""
        institution_id = _institution_of(principal)
        query = select(QuarantinedInstance).where(QuarantinedInstance.institution_id == institution_id)
        if status is not None:
            query = query.where(QuarantinedInstance.status == status.value)
        if before is not None:
            query = query.where(QuarantinedInstance.created_at < before)
        query = query.order_by(QuarantinedInstance.created_at.desc()).limit(max(1, min(limit, MAX_PAGE)))
        with self._db.transaction() as session:
            rows = session.scalars(query).all()
            entries = [_entry(row) for row in rows]
            record(
                session,
                AuditAction.QUARANTINE_LIST,
                principal,
                None,
                Outcome.SUCCESS,
                now=self._clock.now(),
                context=context,
            )
        return entries

    def get(self, principal: Principal, quarantine_id: str) -> QuarantineEntry:
        with self._db.transaction() as session:
            return _entry(self._row(session, principal, quarantine_id))

    def release(
        self,
        principal: Principal,
        quarantine_id: str,
        rule: PixelRule | None,
        *,
        context: RequestContext = NO_CONTEXT,
    ) -> Receipt:
        """Run the instance through the pipeline again with ``rule`` tried first (None: the
        institution's current rules). ``InvalidRequest`` if it would still need quarantine.
        """
        with self._db.transaction() as session:
            row = self._row(session, principal, quarantine_id)
            if row.status != QuarantineStatus.PENDING.value or row.object_key is None:
                raise QuarantineResolved
            opened = self._keys.open_object(
                self._store,
                row.object_key,
                session=session,
                context=ObjectContext(row.institution_id, row.patient_key_id, QUARANTINE_KIND),
            )
            object_key = row.object_key
            origin = IngestOrigin(
                row.institution_id, principal, IngestChannel(row.channel), device_id=row.device_id
            )
            # Read from the store as the pipeline goes (never all of it in memory); every
            # byte is authenticated, so it is the original that was quarantined.
            original = PlaintextStream([(0, opened)], opened.plaintext_size)
            received = Received(cast("BinaryIO", original), row.received_size, row.received_sha256)
        try:
            validated = validate(received.stream, max_size=max(opened.plaintext_size, 1))
            receipt = self._ingest.store_validated(
                validated,
                received,
                origin,
                context=context,
                extra_rules=(rule,) if rule is not None else (),
                released_from=quarantine_id,
            )
        finally:
            original.close()
        self._forget_original(quarantine_id, object_key)
        return receipt

    def reject(
        self, principal: Principal, quarantine_id: str, *, context: RequestContext = NO_CONTEXT
    ) -> None:
        """Refuse the instance for good: its bytes are deleted; the entry stays, resolved."""
        now = self._clock.now()
        with self._db.transaction() as session:
            row = self._row(session, principal, quarantine_id, for_update=True)
            if row.status != QuarantineStatus.PENDING.value:
                raise QuarantineResolved
            object_key = row.object_key
            row.status = QuarantineStatus.REJECTED.value
            row.resolved_at = now
            row.resolved_by = principal.actor.id
            row.object_key = None
            record(
                session,
                AuditAction.QUARANTINE_REJECT,
                principal,
                Target("quarantine", quarantine_id),
                Outcome.SUCCESS,
                now=now,
                context=context,
            )
        if object_key is not None:
            self._ingest.discard_object(object_key)

    def _forget_original(self, quarantine_id: str, object_key: str) -> None:
        """After a release committed: the original (with its PHI) is no longer needed."""
        with self._db.transaction() as session:
            row = session.get(QuarantinedInstance, quarantine_id)
            if row is not None and row.object_key == object_key:
                row.object_key = None
        self._ingest.discard_object(object_key)

    @staticmethod
    def _row(
        session: Session, principal: Principal, quarantine_id: str, *, for_update: bool = False
    ) -> QuarantinedInstance:
        row = session.get(QuarantinedInstance, quarantine_id, with_for_update=for_update)
        if row is None or row.institution_id != _institution_of(principal):
            raise NotFound
        return row


def _institution_of(principal: Principal) -> str:
    if not principal.has(Permission.INSTITUTION_CONFIGURE):
        raise Forbidden
    if principal.institution_id is None:
        raise NotFound
    return principal.institution_id
