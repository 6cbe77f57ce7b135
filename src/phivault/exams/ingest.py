"""The one ingest pipeline: agent uploads, STOW-RS and C-STORE all end here (DESIGN.md §3).

::

    1 size and quota                     QuotaExceeded / DicomRejected(too large)
    2 parse and validate (dicom.validation)   DicomRejected, audited
    3 same SOP Instance UID stored before?    receipt "duplicate", nothing written
    4 patient of the PHI store (blind index; created with its key on first sight)
    5 de-identify (Basic Profile + the institution's options, UIDs remapped)
    6 pixel rules for burned-in text, else quarantine (original kept encrypted, apart)
    7 encrypt the de-identified instance (DEK under the patient key) into the object store
    8 PHI rows of the instance and study (PHI database)
    9 one transaction of the main database: study, series, instance rows and the audit
      record; only now is the instance visible; the receipt goes back after this commit.

Memory: Pixel Data, nearly all of an instance, is never held. Validation leaves its value
in the received stream (``ValidatedInstance.pixel_data``); steps 4-6 work on the header;
step 7 has pydicom write the file while the value is read from the stream (native frames
blanked one at a time) straight into the encryptor (``dicom/part10.py``). The bytes are
those pydicom writes with every value in memory. Exceptions, held in memory as before: RLE
Lossless that a pixel rule must blank (the codec decodes it whole) and Deflated Explicit VR
Little Endian (pydicom inflates the whole data set).

Crash safety: the object (7) and the PHI rows (8) are written before the transaction (9)
that makes them reachable. A crash in between leaves an unreferenced object and PHI rows
without an instance; ``sweeper.py`` removes both after a grace period, and a re-send
replaces them (row ids are derived from the remapped UIDs). Nothing is acknowledged before
(9) commits, and nothing is visible before it either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, RequestContext, Subject, Target, record
from phivault.clock import Clock
from phivault.config.settings import Settings
from phivault.crypto.service import EncryptedObject, KeyHierarchy, ObjectContext, PendingObject
from phivault.db.engine import Database
from phivault.dicom.deid import deidentify
from phivault.dicom.errors import DicomRejected, RejectionCode
from phivault.dicom.part10 import attach_pixel_data, encode
from phivault.dicom.phi import PhiRecord, extract_phi
from phivault.dicom.pixels import PixelOutcomeKind, PixelRule, apply_pixel_rules
from phivault.dicom.uids import remap_uid
from phivault.dicom.validation import ValidatedInstance, validate
from phivault.exams.errors import InvalidRequest, QuarantineResolved, QuotaExceeded
from phivault.exams.models import (
    UID_LENGTH,
    Instance,
    QuarantinedInstance,
    QuarantineStatus,
    Series,
    Study,
)
from phivault.exams.name_index import patient_tokens
from phivault.exams.phi_store import OriginalUids, PatientRef, PhiStore, patient_index
from phivault.exams.policy import Policies
from phivault.exams.secrets import IngestSecret, InstitutionSecrets
from phivault.exams.types import IngestOrigin, Receipt, ReceiptStatus
from phivault.ids import new_id
from phivault.storage.base import ObjectStore
from phivault.storage.errors import ObjectNotFound

logger = logging.getLogger(__name__)

INSTANCE_KIND: Final = "instance"
QUARANTINE_KIND: Final = "quarantine"
_HASH_CHUNK: Final = 1024 * 1024
_SHORT: Final = 64  # LO/SH-sized index columns


@dataclass(frozen=True, slots=True)
class Received:
    """The bytes as received: a readable, seekable stream, its size and SHA-256."""

    stream: BinaryIO
    size: int
    sha256: str


def receive(source: bytes | BinaryIO, max_size: int) -> Received:
    """Hash and measure ``source``; refuse it past ``max_size`` before parsing anything."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > max_size:
            raise DicomRejected(RejectionCode.TOO_LARGE, f"the instance is larger than {max_size} bytes")
        return Received(io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest())
    if not source.seekable():
        data = source.read(max_size + 1)
        return receive(data, max_size)
    start = source.tell()
    digest = hashlib.sha256()
    size = 0
    while chunk := source.read(_HASH_CHUNK):
        size += len(chunk)
        if size > max_size:
            raise DicomRejected(RejectionCode.TOO_LARGE, f"the instance is larger than {max_size} bytes")
        digest.update(chunk)
    source.seek(start)
    return Received(source, size, digest.hexdigest())


@dataclass(frozen=True, slots=True)
class _Uids:
    """The remapped (stored) UIDs of one instance."""

    study: str
    series: str
    sop: str


@dataclass(frozen=True, slots=True)
class _Work:
    """One instance on its way through the pipeline, once its patient is known."""

    validated: ValidatedInstance
    received: Received
    origin: IngestOrigin
    context: RequestContext
    patient: PatientRef
    secret: IngestSecret
    uids: _Uids
    phi: PhiRecord

    def receipt(self, status: ReceiptStatus, instance_id: str, study_id: str | None) -> Receipt:
        return Receipt(
            status=status,
            instance_id=instance_id,
            sha256=self.received.sha256,
            size=self.received.size,
            sop_class_uid=self.validated.sop_class_uid,
            received_sop_instance_uid=self.validated.sop_instance_uid,
            sop_instance_uid=self.uids.sop,
            series_instance_uid=self.uids.series,
            study_instance_uid=self.uids.study,
            study_id=study_id,
        )


@dataclass(frozen=True, slots=True)
class _Prepared:
    pending: PendingObject
    sealed_instance: bytes
    sealed_study: bytes


def _text(dataset: Dataset, keyword: str, limit: int = _SHORT) -> str:
    value = dataset.get(keyword)
    if value is None or value == "":
        return ""
    text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    return text[:limit]


def _int(dataset: Dataset, keyword: str) -> int | None:
    value = dataset.get(keyword)
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


class IngestService:
    """``runtime.ingest``: see the module docstring."""

    def __init__(  # the runtime's parts this service composes
        self,
        settings: Settings,
        db: Database,
        phi_db: Database,
        store: ObjectStore,
        keys: KeyHierarchy,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self._db = db
        self._store = store
        self._keys = keys
        self._clock = clock
        self.secrets = InstitutionSecrets(db, keys, clock)
        self.phi = PhiStore(phi_db, db, keys, clock)
        self.policies = Policies(settings, db, clock)

    # -- entry points -------------------------------------------------------------------

    def check_quota(self, institution_id: str, device_id: str | None, incoming: int) -> None:
        """Raise ``QuotaExceeded`` if ``incoming`` more bytes would pass a quota (uploads
        call this before accepting data).
        """
        with self._db.read() as session:
            self.policies.check_quota(session, institution_id, device_id, incoming)

    def ingest(
        self, source: bytes | BinaryIO, origin: IngestOrigin, *, context: RequestContext = NO_CONTEXT
    ) -> Receipt:
        """Ingest one PS3.10 instance for ``origin``; see the module docstring.

        Raises ``DicomRejected`` or ``QuotaExceeded`` (both audited); nothing is stored then.
        A stream must stay open until this returns.
        """
        try:
            received = receive(source, self.settings.dicom_max_instance_bytes)
            validated = validate(received.stream, max_size=self.settings.dicom_max_instance_bytes)
            return self.store_validated(validated, received, origin, context=context)
        except DicomRejected as exc:
            self._audit_refusal(origin, context, Target("dicom_rejection", exc.code.value), Outcome.FAILURE)
            raise
        except QuotaExceeded as exc:
            self._audit_refusal(origin, context, Target("quota", exc.scope), Outcome.DENIED)
            raise

    def store_validated(
        self,
        validated: ValidatedInstance,
        received: Received,
        origin: IngestOrigin,
        *,
        context: RequestContext = NO_CONTEXT,
        extra_rules: tuple[PixelRule, ...] = (),
        released_from: str | None = None,
    ) -> Receipt:
        """Steps 3-9 for an instance already validated (also: release from quarantine,
        with the admin's rule first and ``released_from`` the quarantine entry).
        """
        institution_id = origin.institution_id
        secret = self.secrets.get(institution_id)
        uids = _Uids(
            study=remap_uid(validated.study_instance_uid, secret.uid),
            series=remap_uid(validated.series_instance_uid, secret.uid),
            sop=remap_uid(validated.sop_instance_uid, secret.uid),
        )
        dataset = validated.header  # Pixel Data stays in the received stream
        phi = extract_phi(dataset)
        # The patient first (PHI database; created with its key on first sight), so that one
        # main-database transaction then checks quota, re-sends, policy and the study's owner
        # and prepares the object key and the sealed PHI (fewer commits per instance).
        patient = self.phi.find_or_create_patient(
            institution_id,
            patient_index(secret, phi, validated.study_instance_uid),
            phi,
            tokens=patient_tokens(secret, patient_name=phi.patient_name, patient_id=phi.patient_id),
        )
        work = _Work(validated, received, origin, context, patient, secret, uids, phi)
        with self._db.read() as session:
            earlier = self._earlier(session, work)
            if earlier is None and released_from is None:  # quarantined bytes are counted already
                self.policies.check_quota(session, institution_id, origin.device_id, received.size)
            policy = self.policies.load(session, institution_id)
            owner = session.scalar(
                select(Study.patient_ref).where(
                    Study.institution_id == institution_id, Study.study_instance_uid == uids.study
                )
            )
            prepared = self._prepare(session, work) if earlier is None else None
        if earlier is not None and released_from is None:
            self._audit(
                origin, context, AuditAction.INSTANCE_DUPLICATE, Target("instance", earlier.instance_id)
            )
            return earlier
        if owner is not None and owner != patient.id:
            raise DicomRejected(RejectionCode.STUDY_PATIENT_CONFLICT, "the study belongs to another patient")
        deidentified = deidentify(
            dataset, options=policy.options, institution_secret=secret.uid, pseudonym=patient.id
        )
        attach_pixel_data(deidentified, validated.pixel_data)  # Table E.1-1 keeps Pixel Data
        outcome = apply_pixel_rules(deidentified, extra_rules + policy.rules)
        if outcome.kind is PixelOutcomeKind.QUARANTINE:
            if released_from is not None:
                raise InvalidRequest(
                    "pixel_rule_not_applicable",
                    f"the instance still needs quarantine: {outcome.reason}",
                )
            return self._quarantine(work, str(outcome.reason))
        if prepared is None:  # released from quarantine, yet stored meanwhile: a duplicate
            with self._db.read() as session:
                prepared = self._prepare(session, work)
        return self._store_instance(work, deidentified, prepared, released_from=released_from)

    # -- steps --------------------------------------------------------------------------

    def _earlier(self, session: Session, work: _Work) -> Receipt | None:
        """The receipt of the same SOP Instance UID stored or quarantined before, if any.

        Its UIDs are the ones stored: remapping is deterministic per institution.
        """
        institution_id, sop_uid = work.origin.institution_id, work.uids.sop
        row = session.execute(
            select(Instance.id, Instance.study_id).where(
                Instance.institution_id == institution_id, Instance.sop_instance_uid == sop_uid
            )
        ).one_or_none()
        if row is not None:
            return work.receipt(ReceiptStatus.DUPLICATE, row.id, row.study_id)
        waiting = session.scalar(
            select(QuarantinedInstance.id).where(
                QuarantinedInstance.institution_id == institution_id,
                QuarantinedInstance.sop_instance_uid == sop_uid,
                QuarantinedInstance.status == QuarantineStatus.PENDING.value,
            )
        )
        return None if waiting is None else work.receipt(ReceiptStatus.QUARANTINED, waiting, None)

    def _prepare(self, session: Session, work: _Work) -> _Prepared:
        """The new object's key and DEK, and the sealed PHI of the instance and its study."""
        validated, patient, secret, uids, phi = work.validated, work.patient, work.secret, work.uids, work.phi
        original = validated.dataset
        study_id = secret.derived_id("study", uids.study)
        instance_id = secret.derived_id("instance", uids.sop)
        return _Prepared(
            pending=self._keys.prepare_object(
                session, ObjectContext(work.origin.institution_id, patient.patient_key_id, INSTANCE_KIND)
            ),
            sealed_instance=self.phi.seal_instance(
                session,
                patient,
                instance_id,
                phi,
                OriginalUids(
                    validated.study_instance_uid, validated.series_instance_uid, validated.sop_instance_uid
                ),
            ),
            sealed_study=self.phi.seal_study(
                session,
                patient,
                study_id,
                {
                    "accession_number": phi.accession_number,
                    "referring_physician_name": phi.referring_physician_name,
                    "study_date": _text(original, "StudyDate"),
                    "study_time": _text(original, "StudyTime"),
                    "study_description": _text(original, "StudyDescription"),
                    "study_id": _text(original, "StudyID"),
                    "study_instance_uid": validated.study_instance_uid,
                },
            ),
        )

    def _store_instance(
        self, work: _Work, deidentified: Dataset, prepared: _Prepared, *, released_from: str | None
    ) -> Receipt:
        validated, origin, context = work.validated, work.origin, work.context
        patient, secret, uids, phi = work.patient, work.secret, work.uids, work.phi
        institution_id = origin.institution_id
        study_id = secret.derived_id("study", uids.study)
        series_id = secret.derived_id("series", uids.series)
        instance_id = secret.derived_id("instance", uids.sop)
        # Pixel Data is read from the received bytes (and blanked) only while this is
        # encrypted: memory does not grow with its size.
        plaintext = encode(deidentified)
        accession = phi.accession_number.strip()
        study_date = _text(validated.dataset, "StudyDate")
        stored = prepared.pending.write(self._store, plaintext)
        try:
            self.phi.put_instance(
                institution_id=institution_id,
                patient=patient,
                study_id=study_id,
                instance_id=instance_id,
                sealed_instance=prepared.sealed_instance,
                sealed_study=prepared.sealed_study,
                accession_index=secret.blind("accession", accession) if accession else None,
                study_date_index=secret.blind("study-date", study_date) if study_date else None,
                now=self._clock.now(),
            )
            receipt = work.receipt(ReceiptStatus.STORED, instance_id, study_id)

            def write_index(session: Session) -> None:
                self._index(session, work, deidentified, receipt, stored, series_id)
                if released_from is not None:
                    self._mark_released(session, released_from, instance_id, origin.subject)
                    self._record(
                        session,
                        origin,
                        context,
                        AuditAction.QUARANTINE_RELEASE,
                        Target("quarantine", released_from),
                    )
                self._record(
                    session, origin, context, AuditAction.INSTANCE_INGEST, Target("instance", instance_id)
                )

            committed = self._commit_index(write_index)
        except BaseException:
            self.discard_object(stored.key)
            raise
        if not committed:
            # The same instance was committed by a concurrent ingest: ours is a duplicate.
            self.discard_object(stored.key)
            self._audit(origin, context, AuditAction.INSTANCE_DUPLICATE, Target("instance", instance_id))
            return dataclasses.replace(receipt, status=ReceiptStatus.DUPLICATE)
        return receipt

    def _commit_index(self, write: Callable[[Session], None]) -> bool:
        """Run ``write`` in one main-database transaction; False if the instance exists.

        A concurrent ingest of another instance of the same new study or series may win the
        race to create those rows: the transaction is retried and then finds them.
        """
        for attempt in range(3):
            try:
                with self._db.transaction() as session:
                    write(session)
            except _InstanceExists:
                return False
            except IntegrityError:
                if attempt == 2:  # noqa: PLR2004
                    raise
                continue
            return True
        return False  # pragma: no cover  # the loop returns or raises

    def _index(  # the rows' sources, named at the one call site
        self,
        session: Session,
        work: _Work,
        dataset: Dataset,
        receipt: Receipt,
        stored: EncryptedObject,
        series_id: str,
    ) -> None:
        origin, patient = work.origin, work.patient
        object_key, size, sha256 = stored.key, stored.size, stored.sha256
        now = self._clock.now()
        institution_id = origin.institution_id
        study_id = work.secret.derived_id("study", work.uids.study)  # the receipt's study
        if session.scalar(
            select(Instance.id).where(
                Instance.institution_id == institution_id,
                Instance.sop_instance_uid == receipt.sop_instance_uid,
            )
        ):
            raise _InstanceExists
        study = session.get(Study, study_id, with_for_update=True)
        if study is None:
            study = Study(
                id=study_id,
                institution_id=institution_id,
                patient_ref=patient.id,
                patient_key_id=patient.patient_key_id,
                study_instance_uid=receipt.study_instance_uid,
                study_date=_text(dataset, "StudyDate", 8),
                study_time=_text(dataset, "StudyTime", 16),
                study_description=_text(dataset, "StudyDescription"),
                modalities="",
                number_of_series=0,
                number_of_instances=0,
                size=0,
                archived_at=None,
                created_at=now,
                updated_at=now,
            )
            session.add(study)
            session.flush()  # no ORM relationships: flush parents before their children
        elif study.patient_ref != patient.id:  # a concurrent ingest of the study's first instance
            raise DicomRejected(RejectionCode.STUDY_PATIENT_CONFLICT, "the study belongs to another patient")
        series = session.get(Series, series_id)
        if series is None:
            series = Series(
                id=series_id,
                institution_id=institution_id,
                study_id=study.id,
                series_instance_uid=receipt.series_instance_uid,
                modality=_text(dataset, "Modality", 16),
                series_number=_int(dataset, "SeriesNumber"),
                series_description=_text(dataset, "SeriesDescription"),
                number_of_instances=0,
                created_at=now,
            )
            session.add(series)
            session.flush()
            study.number_of_series += 1
        modalities = [m for m in study.modalities.split("\\") if m]
        if series.modality and series.modality not in modalities:
            study.modalities = "\\".join([*modalities, series.modality])[:_SHORT]
        series.number_of_instances += 1
        study.number_of_instances += 1
        study.size += size
        study.updated_at = now
        session.add(
            Instance(
                id=receipt.instance_id,
                institution_id=institution_id,
                study_id=study.id,
                series_id=series.id,
                sop_instance_uid=receipt.sop_instance_uid,
                sop_class_uid=receipt.sop_class_uid[:UID_LENGTH],
                transfer_syntax_uid=str(dataset.file_meta.get("TransferSyntaxUID", ""))[:UID_LENGTH],
                instance_number=_int(dataset, "InstanceNumber"),
                rows=_int(dataset, "Rows"),
                columns=_int(dataset, "Columns"),
                number_of_frames=_int(dataset, "NumberOfFrames"),
                object_key=object_key,
                size=size,
                sha256=sha256,
                received_size=receipt.size,
                received_sha256=receipt.sha256,
                channel=origin.channel.value,
                device_id=origin.device_id,
                created_at=now,
            )
        )
        session.flush()

    def _quarantine(self, work: _Work, reason: str) -> Receipt:
        """Keep the instance as received, encrypted under its patient's key, for an admin."""
        validated, received, origin, context = work.validated, work.received, work.origin, work.context
        patient, uids = work.patient, work.uids
        dataset = validated.dataset
        quarantine_id = new_id()
        with self._db.read() as session:
            pending = self._keys.prepare_object(
                session, ObjectContext(origin.institution_id, patient.patient_key_id, QUARANTINE_KIND)
            )
        received.stream.seek(0)
        stored = pending.write(self._store, received.stream)
        try:
            with self._db.transaction() as session:
                session.add(
                    QuarantinedInstance(
                        id=quarantine_id,
                        institution_id=origin.institution_id,
                        patient_key_id=patient.patient_key_id,
                        patient_ref=patient.id,
                        object_key=stored.key,
                        reason=reason,
                        status=QuarantineStatus.PENDING.value,
                        sop_class_uid=validated.sop_class_uid[:UID_LENGTH],
                        sop_instance_uid=uids.sop,
                        modality=_text(dataset, "Modality", 16),
                        manufacturer=_text(dataset, "Manufacturer"),
                        model_name=_text(dataset, "ManufacturerModelName"),
                        rows=_int(dataset, "Rows"),
                        columns=_int(dataset, "Columns"),
                        transfer_syntax_uid=validated.transfer_syntax_uid[:UID_LENGTH],
                        received_size=received.size,
                        received_sha256=received.sha256,
                        channel=origin.channel.value,
                        device_id=origin.device_id,
                        created_at=self._clock.now(),
                        resolved_at=None,
                        resolved_by=None,
                        instance_id=None,
                    )
                )
                self._record(
                    session,
                    origin,
                    context,
                    AuditAction.INSTANCE_QUARANTINE,
                    Target("quarantine", quarantine_id),
                )
        except BaseException:
            self.discard_object(stored.key)
            raise
        return work.receipt(ReceiptStatus.QUARANTINED, quarantine_id, None)

    def _mark_released(
        self, session: Session, quarantine_id: str, instance_id: str, subject: Subject
    ) -> None:
        row = session.get(QuarantinedInstance, quarantine_id, with_for_update=True)
        if row is None or row.status != QuarantineStatus.PENDING.value:
            raise QuarantineResolved
        row.status = QuarantineStatus.RELEASED.value
        row.resolved_at = self._clock.now()
        row.resolved_by = subject.actor.id
        row.instance_id = instance_id
        # The original stays referenced until the release commits; then it is deleted
        # (quarantine.py), and the sweeper catches it should that deletion not happen.
        session.flush()

    # -- audit and clean-up ---------------------------------------------------------------

    def _record(
        self,
        session: Session,
        origin: IngestOrigin,
        context: RequestContext,
        action: AuditAction,
        target: Target,
    ) -> None:
        record(
            session,
            action,
            origin.subject,
            target,
            Outcome.SUCCESS,
            now=self._clock.now(),
            context=context,
            institution_id=origin.institution_id,
        )

    def _audit(
        self, origin: IngestOrigin, context: RequestContext, action: AuditAction, target: Target
    ) -> None:
        with self._db.transaction() as session:
            self._record(session, origin, context, action, target)

    def _audit_refusal(
        self, origin: IngestOrigin, context: RequestContext, target: Target, outcome: Outcome
    ) -> None:
        with self._db.transaction() as session:
            record(
                session,
                AuditAction.INSTANCE_REJECT,
                origin.subject,
                target,
                outcome,
                now=self._clock.now(),
                context=context,
                institution_id=origin.institution_id,
            )

    def discard_object(self, key: str) -> None:
        """Delete an object no row references (best effort: the sweeper is the backstop)."""
        try:
            self._store.delete(key)
        except ObjectNotFound:
            pass
        except Exception:  # noqa: BLE001  # the sweeper removes it later; the caller's error matters
            logger.warning("could not delete unreferenced object %s; the sweeper will", key)


class _InstanceExists(Exception):  # control flow inside _commit_index
    pass
