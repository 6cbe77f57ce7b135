"""Resumable uploads (the tus 1.0 core protocol with the creation, checksum, expiration and
termination extensions), finalized into the ingest pipeline.

Data path. Each PATCH streams its body through a SHA-256 into a new encrypted object
(``KeyHierarchy.prepare_object(...).write``): nothing of a chunk is buffered whole and
nothing plaintext touches a disk. The object is written first; then one transaction
checks the offset again and records the chunk with the new offset. A crash in between
leaves an object no row refers to (removed with the upload), never a half-recorded chunk;
once a PATCH is answered, its chunk is in the database and the store.

Keys. Every upload has its own key of the hierarchy (a ``patient_keys`` row). When the
upload ends — finalized, rejected, cancelled, expired — the key is destroyed (crypto-
shredding, recorded in the purge ledger) and the chunk objects are deleted; copies of
them in backups are unreadable from then on.

Finalize reads the chunks back twice, decrypting as it goes: first to compare the SHA-256
of the whole with the one the device sent, then as the stream the ingest pipeline parses.
Nothing reaches ingest that the device did not vouch for.

Several replicas: every state lives in the database (offset, chunks, the finalize lease),
so any replica continues an upload another started.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import BinaryIO, Protocol, cast

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, Actor, RequestContext, Subject, SystemSubject, Target, record
from phivault.clock import Clock
from phivault.config.settings import Settings
from phivault.crypto.errors import InvalidParameterError, ObjectIntegrityError
from phivault.crypto.models import InstitutionKey, PurgeReason
from phivault.crypto.service import KeyHierarchy, ObjectContext, PlaintextStream
from phivault.db.engine import Database
from phivault.db.jobs import JobContext
from phivault.devices.errors import (
    ChunkChecksumMismatch,
    ChunkLengthInvalid,
    Forbidden,
    InvalidInput,
    NotFound,
    OffsetMismatch,
    QuotaExceeded,
    UploadBusy,
    UploadClosed,
    UploadDigestMismatch,
    UploadFailed,
    UploadGone,
    UploadIncomplete,
    UploadRejected,
    UploadTooLarge,
)
from phivault.devices.models import UNFINISHED, DpopProofSeen, Upload, UploadChunk, UploadStatus
from phivault.devices.service import Devices, is_device, schedule_housekeeping
from phivault.dicom.errors import DicomRejected
from phivault.exams import errors as exam_errors
from phivault.exams.types import IngestChannel, IngestOrigin, Receipt
from phivault.ids import new_id, new_token
from phivault.storage.base import ObjectStore

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
OBJECT_KIND = "upload"
MAX_CLIENT_REF = 64
HASH_BLOCK = 1 << 20
FINALIZE_LEASE = timedelta(minutes=10)
FINALIZE_BYTES_PER_SECOND = 4_000_000  # lease grows with the size: 2 GB adds ~8 minutes
ENDED_ROWS_KEPT = timedelta(days=30)  # a repeated finalize is answered from the row until then
HOUSEKEEPING_BATCH = 200
_UPLOADS_ACTOR = Actor.system("uploads")
INTEGRITY_FAILED = "integrity_check_failed"


class ReadableStream(Protocol):
    def read(self, size: int, /) -> bytes: ...


class Ingest(Protocol):
    """What uploads need of the ingest pipeline (``runtime.ingest``, the exams part)."""

    def ingest(self, source: BinaryIO, origin: IngestOrigin, *, context: RequestContext = ...) -> Receipt: ...

    def check_quota(self, institution_id: str, device_id: str | None, incoming: int) -> None: ...


@dataclass(frozen=True, slots=True)
class UploadReceipt:
    """What the device gets back: the digest and size of the bytes received (to compare
    with what it sent) and the de-identified UIDs phivault stores the instance under.
    """

    status: str
    instance_id: str
    sha256: str
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    study_id: str | None

    @classmethod
    def of(cls, receipt: Receipt) -> UploadReceipt:
        # The sender's own SOP Instance UID is left out: it is not kept in the main database.
        return cls(
            status=receipt.status.value,
            instance_id=receipt.instance_id,
            sha256=receipt.sha256,
            size=receipt.size,
            sop_class_uid=receipt.sop_class_uid,
            sop_instance_uid=receipt.sop_instance_uid,
            series_instance_uid=receipt.series_instance_uid,
            study_instance_uid=receipt.study_instance_uid,
            study_id=receipt.study_id,
        )

    def as_row(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_row(cls, row: dict[str, object]) -> UploadReceipt:
        study_id = row.get("study_id")
        return cls(
            status=str(row["status"]),
            instance_id=str(row["instance_id"]),
            sha256=str(row["sha256"]),
            size=int(str(row["size"])),
            sop_class_uid=str(row["sop_class_uid"]),
            sop_instance_uid=str(row["sop_instance_uid"]),
            series_instance_uid=str(row["series_instance_uid"]),
            study_instance_uid=str(row["study_instance_uid"]),
            study_id=None if study_id is None else str(study_id),
        )


@dataclass(frozen=True, slots=True)
class UploadInfo:
    id: str
    length: int
    offset: int
    status: str
    created_at: datetime
    expires_at: datetime
    receipt: UploadReceipt | None


@dataclass(frozen=True, slots=True)
class HousekeepingReport:
    expired: int  # open uploads that ran past their expiry
    cleaned: int  # ended uploads whose key was shredded and chunks deleted
    forgotten: int  # rows no longer needed (old uploads, replay cache, tokens, codes)


def _info(upload: Upload) -> UploadInfo:
    return UploadInfo(
        id=upload.id,
        length=upload.length,
        offset=upload.offset,
        status=upload.status,
        created_at=upload.created_at,
        expires_at=upload.expires_at,
        receipt=UploadReceipt.from_row(upload.receipt) if upload.receipt else None,
    )


def _object_prefix(upload_id: str) -> str:
    return f"{OBJECT_KIND}/{upload_id}/"


class _ChunkBody:
    """The body of one PATCH, read through: counts, and refuses more or fewer bytes than
    the declared ``Content-Length`` (so a short body never becomes a chunk). The SHA-256
    is taken by the object writer on the same pass.
    """

    def __init__(self, source: ReadableStream, expected: int) -> None:
        self._source = source
        self._expected = expected
        self.count = 0

    def read(self, size: int, /) -> bytes:
        want = min(size if size >= 0 else HASH_BLOCK, self._expected - self.count)
        if want <= 0:
            if self._source.read(1):
                raise ChunkLengthInvalid
            return b""
        data = self._source.read(want)
        if not data or len(data) > want:
            raise ChunkLengthInvalid  # the body ended before Content-Length (or ran past it)
        self.count += len(data)
        return data


class Uploads:
    """Resumable uploads of devices; ``ingest`` is the exams part's pipeline."""

    def __init__(  # the runtime's parts this service uses
        self,
        settings: Settings,
        db: Database,
        clock: Clock,
        keys: KeyHierarchy,
        store: ObjectStore,
        devices: Devices,
        ingest: Ingest | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.keys = keys
        self.store = store
        self.devices = devices
        self.ingest = ingest
        self.expiry = timedelta(hours=settings.upload_expiry_hours)
        self.max_length = settings.dicom_max_instance_bytes

    def _pipeline(self) -> Ingest:
        if self.ingest is None:
            msg = "the ingest pipeline is not configured"
            raise RuntimeError(msg)
        return self.ingest

    # -- creation -------------------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        length: int,
        *,
        client_ref: str | None = None,
        context: RequestContext = NO_CONTEXT,
    ) -> tuple[UploadInfo, bool]:
        """Open an upload of ``length`` bytes; returns it and whether it is new.

        Refused before any data is accepted when it is larger than one exam may be, or
        when it would exceed a storage quota: ``length`` plus the declared lengths of the
        device's other unfinished uploads must fit (the exams part's ``check_quota``).
        With a ``client_ref`` the device already used for an unfinished upload, that one is
        returned: a creation repeated after a lost answer does not open a second upload.
        """
        device_id, institution_id = self._device(principal)
        if client_ref is not None and not 1 <= len(client_ref) <= MAX_CLIENT_REF:
            raise InvalidInput(f"client-ref is 1 to {MAX_CLIENT_REF} characters")
        if length < 1:
            raise InvalidInput("Upload-Length is a positive number of bytes")
        if length > self.max_length:
            raise UploadTooLarge(f"an exam file may have at most {self.max_length} bytes")
        with self.db.transaction() as session:
            if client_ref is not None:
                existing = self._by_client_ref(session, device_id, client_ref)
                if existing is not None:
                    return _info(existing), False
            pending = session.scalar(
                select(func.coalesce(func.sum(Upload.length), 0)).where(
                    Upload.device_id == device_id, Upload.status.in_(UNFINISHED)
                )
            )
        # Outside any transaction: the pipeline reads usage in its own (and SQLite has one
        # writer). Two creations racing past this check are caught again at ingest.
        try:
            self._pipeline().check_quota(institution_id, device_id, length + int(pending or 0))
        except exam_errors.QuotaExceeded as exc:
            raise QuotaExceeded(exc.scope, exc.limit, exc.used, exc.incoming) from None
        now = self.clock.now()
        with self.db.transaction() as session:
            if client_ref is not None:
                existing = self._by_client_ref(session, device_id, client_ref)
                if existing is not None:
                    return _info(existing), False
            upload = Upload(
                id=new_id(),
                institution_id=institution_id,
                device_id=device_id,
                client_ref=client_ref,
                length=length,
                offset=0,
                patient_key_id=self._upload_key(session, institution_id, now),
                status=UploadStatus.OPEN.value,
                created_at=now,
                updated_at=now,
                expires_at=now + self.expiry,
                lease_token=None,
                lease_until=None,
                finished_at=None,
                receipt=None,
                problem_code=None,
                problem_detail=None,
                objects_deleted=False,
            )
            session.add(upload)
            session.flush()
            record(
                session,
                AuditAction.UPLOAD_CREATE,
                principal,
                Target("upload", upload.id),
                Outcome.SUCCESS,
                now=now,
                context=context,
            )
            schedule_housekeeping(session, now)
            return _info(upload), True

    @staticmethod
    def _by_client_ref(session: Session, device_id: str, client_ref: str) -> Upload | None:
        return session.scalars(
            select(Upload).where(
                Upload.device_id == device_id, Upload.client_ref == client_ref, Upload.status.in_(UNFINISHED)
            )
        ).first()

    def _upload_key(self, session: Session, institution_id: str, now: datetime) -> str:
        """A new key for one upload's chunks, under the institution's key (made on first use)."""
        has_key = session.scalar(
            select(InstitutionKey.id).where(InstitutionKey.institution_id == institution_id).limit(1)
        )
        if has_key is None:
            try:
                with session.begin_nested():
                    self.keys.new_institution_key(session, institution_id, now)
            except (IntegrityError, InvalidParameterError):
                pass  # another request made it first
        return self.keys.new_patient_key(session, institution_id, now)

    # -- reading the state ----------------------------------------------------------------

    def get(self, principal: Principal, upload_id: str, *, resumable: bool = False) -> UploadInfo:
        """The device's upload; with ``resumable``, ``UploadGone`` once it expired or was
        cancelled (tus HEAD: the client must start again).
        """
        now = self.clock.now()
        with self.db.transaction() as session:
            upload = self._own(session, principal, upload_id)
            if resumable and (
                upload.status in (UploadStatus.EXPIRED.value, UploadStatus.CANCELLED.value)
                or (upload.status == UploadStatus.OPEN.value and upload.expires_at <= now)
            ):
                raise UploadGone
            return _info(upload)

    def _device(self, principal: Principal) -> tuple[str, str]:
        if not is_device(principal) or principal.institution_id is None:
            raise Forbidden("only devices upload through this API")
        return principal.actor.id, principal.institution_id

    def _own(
        self, session: Session, principal: Principal, upload_id: str, *, for_update: bool = False
    ) -> Upload:
        """The device's own upload; anyone else's (another device, another institution)
        answers ``NotFound``, as if it did not exist.
        """
        device_id, institution_id = self._device(principal)
        upload = session.get(Upload, upload_id, with_for_update=for_update) if len(upload_id) <= 64 else None  # noqa: PLR2004
        if upload is None or upload.device_id != device_id or upload.institution_id != institution_id:
            raise NotFound
        return upload

    @staticmethod
    def _check_open(upload: Upload, now: datetime) -> None:
        if upload.status in (UploadStatus.EXPIRED.value, UploadStatus.CANCELLED.value) or (
            upload.status == UploadStatus.OPEN.value and upload.expires_at <= now
        ):
            raise UploadGone
        if upload.status != UploadStatus.OPEN.value:
            raise UploadClosed

    # -- chunks ---------------------------------------------------------------------------

    def append(  # the PATCH request's parts, named at the call site
        self,
        principal: Principal,
        upload_id: str,
        *,
        offset: int,
        length: int,
        checksum: bytes,
        body: ReadableStream,
    ) -> UploadInfo:
        """Store ``length`` bytes at ``offset`` (which must be the server's offset) whose
        SHA-256 is ``checksum``; returns the upload with its new offset.
        """
        now = self.clock.now()
        with self.db.transaction() as session:
            upload = self._own(session, principal, upload_id)
            self._check_open(upload, now)
            if offset != upload.offset:
                raise OffsetMismatch(upload.offset)
            if length < 0 or length > upload.length - upload.offset:
                raise ChunkLengthInvalid
            if length == 0:
                return _info(upload)
            pending = self.keys.prepare_object(
                session,
                ObjectContext(upload.institution_id, upload.patient_key_id, f"{OBJECT_KIND}/{upload.id}"),
            )
        # An exception here (a short body, a dropped connection) leaves nothing: put is atomic.
        written = pending.write(self.store, _ChunkBody(body, length))
        received = bytes.fromhex(written.sha256)
        if not secrets.compare_digest(received, checksum):
            self.store.delete(pending.key)
            raise ChunkChecksumMismatch
        refusal: Exception | None = None
        with self.db.transaction() as session:
            upload = self._own(session, principal, upload_id, for_update=True)
            try:
                self._check_open(upload, now)
            except (UploadGone, UploadClosed) as exc:
                refusal = exc
            if refusal is None and upload.offset != offset:
                refusal = OffsetMismatch(upload.offset)  # a concurrent PATCH won
            if refusal is None:
                session.add(
                    UploadChunk(
                        upload_id=upload.id,
                        start=offset,
                        length=length,
                        object_key=pending.key,
                        sha256=received.hex(),
                        created_at=now,
                    )
                )
                upload.offset = offset + length
                upload.updated_at = now
                upload.expires_at = now + self.expiry
                info = _info(upload)
        if refusal is not None:
            self.store.delete(pending.key)
            raise refusal
        return info

    # -- finalize -------------------------------------------------------------------------

    def finalize(
        self, principal: Principal, upload_id: str, sha256: str, context: RequestContext = NO_CONTEXT
    ) -> UploadReceipt:
        """Check the SHA-256 of the whole, hand the bytes to the ingest pipeline, and end
        the upload. Repeating it answers as the first call did (the receipt, or the same
        refusal), so a device that lost the answer simply asks again.
        """
        expected = sha256.strip().lower()
        if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):  # noqa: PLR2004
            raise InvalidInput("sha256 is 64 hexadecimal digits")
        now = self.clock.now()
        lease = new_token()
        with self.db.transaction() as session:
            upload = self._own(session, principal, upload_id, for_update=True)
            answer = self._settled_answer(upload, now)
            if answer is not None:
                return answer
            if upload.offset != upload.length:
                raise UploadIncomplete(upload.offset, upload.length)
            upload.status = UploadStatus.FINALIZING.value
            upload.lease_token = lease
            upload.lease_until = (
                now + FINALIZE_LEASE + timedelta(seconds=upload.length / FINALIZE_BYTES_PER_SECOND)
            )
            upload.updated_at = now
            stream = self._open_stream(session, upload)
        try:
            return self._ingest(principal, upload_id, stream, expected, lease, context)
        finally:
            stream.close()

    def _settled_answer(self, upload: Upload, now: datetime) -> UploadReceipt | None:
        """The answer of an upload that was finalized before (or is being), else ``None``."""
        status = upload.status
        if status == UploadStatus.FINISHED.value and upload.receipt:
            return UploadReceipt.from_row(upload.receipt)
        if status == UploadStatus.REJECTED.value:
            raise UploadRejected(upload.problem_code or "rejected", upload.problem_detail or "rejected")
        if status == UploadStatus.FAILED.value:
            if upload.problem_code == UploadDigestMismatch.code:
                raise UploadDigestMismatch
            raise UploadFailed(upload.problem_code or INTEGRITY_FAILED)
        if (
            status == UploadStatus.FINALIZING.value
            and upload.lease_until is not None
            and upload.lease_until > now
        ):
            raise UploadBusy(int((upload.lease_until - now).total_seconds()))
        if status == UploadStatus.FINALIZING.value:
            return None  # the finalizer's lease ran out (it crashed): take over
        self._check_open(upload, now)
        return None

    def _open_stream(self, session: Session, upload: Upload) -> PlaintextStream:
        chunks = session.scalars(
            select(UploadChunk).where(UploadChunk.upload_id == upload.id).order_by(UploadChunk.start)
        ).all()
        context = ObjectContext(upload.institution_id, upload.patient_key_id, f"{OBJECT_KIND}/{upload.id}")
        opened = [
            (
                chunk.start,
                self.keys.open_object(self.store, chunk.object_key, session=session, context=context),
            )
            for chunk in chunks
        ]
        return PlaintextStream(opened, upload.length)

    def _ingest(
        self,
        principal: Principal,
        upload_id: str,
        stream: PlaintextStream,
        expected: str,
        lease: str,
        context: RequestContext,
    ) -> UploadReceipt:
        device_id, institution_id = self._device(principal)
        try:
            digest = hashlib.sha256()
            while block := stream.read(HASH_BLOCK):
                digest.update(block)
        except ObjectIntegrityError:
            # A stored chunk was altered (the alert is raised): the device sends it again.
            self._end(principal, upload_id, lease, UploadStatus.FAILED, context, code=INTEGRITY_FAILED)
            raise
        except Exception:
            self._release(upload_id, lease)
            raise
        if not secrets.compare_digest(digest.hexdigest(), expected):
            self._end(
                principal, upload_id, lease, UploadStatus.FAILED, context, code=UploadDigestMismatch.code
            )
            raise UploadDigestMismatch
        stream.seek(0)
        origin = IngestOrigin(institution_id, principal, IngestChannel.UPLOAD, device_id=device_id)
        try:
            # A seekable binary stream, as the pipeline wants (not typed as BinaryIO by io).
            receipt = self._pipeline().ingest(cast("BinaryIO", stream), origin, context=context)
        except DicomRejected as exc:
            self._end(
                principal,
                upload_id,
                lease,
                UploadStatus.REJECTED,
                context,
                code=str(exc.code),
                detail=exc.reason,
            )
            raise UploadRejected(str(exc.code), exc.reason) from None
        except exam_errors.QuotaExceeded as exc:
            # Space may be freed or the quota raised: the upload stays, to be finalized later.
            self._release(upload_id, lease)
            raise QuotaExceeded(exc.scope, exc.limit, exc.used, exc.incoming) from None
        except Exception:
            self._release(upload_id, lease)
            raise
        answer = UploadReceipt.of(receipt)
        if answer.sha256 != expected:  # the pipeline hashed other bytes than we did: a bug
            log.error("upload %s: the ingest receipt's digest differs from the upload's", upload_id)
        self._end(principal, upload_id, lease, UploadStatus.FINISHED, context, receipt=answer)
        return answer

    def _release(self, upload_id: str, lease: str) -> None:
        with self.db.transaction() as session:
            upload = session.get(Upload, upload_id, with_for_update=True)
            if upload is not None and upload.lease_token == lease:
                upload.status = UploadStatus.OPEN.value
                upload.lease_token = None
                upload.lease_until = None

    def _end(  # noqa: PLR0913
        self,
        subject: Subject,
        upload_id: str,
        lease: str | None,
        status: UploadStatus,
        context: RequestContext,
        *,
        code: str | None = None,
        detail: str | None = None,
        receipt: UploadReceipt | None = None,
    ) -> None:
        """Record how the upload ended, destroy its key, then delete its chunks."""
        now = self.clock.now()
        with self.db.transaction() as session:
            upload = session.get(Upload, upload_id, with_for_update=True)
            if upload is None or (lease is not None and upload.lease_token != lease):
                return  # another finalizer took over after our lease ran out; it records the end
            upload.status = status.value
            upload.lease_token = None
            upload.lease_until = None
            upload.finished_at = now
            upload.updated_at = now
            upload.problem_code = code
            upload.problem_detail = detail[:300] if detail else None
            upload.receipt = receipt.as_row() if receipt is not None else None
            action = AuditAction.UPLOAD_FINALIZE if lease is not None else AuditAction.UPLOAD_CANCEL
            record(
                session,
                action,
                subject,
                Target("upload", upload.id),
                Outcome.SUCCESS if status is UploadStatus.FINISHED or lease is None else Outcome.FAILURE,
                now=now,
                context=context,
                institution_id=upload.institution_id,
            )
            self._shred(session, upload, now)
        self._delete_objects(upload_id)

    def _shred(self, session: Session, upload: Upload, now: datetime) -> None:
        self.keys.destroy_patient_key(
            session,
            upload.patient_key_id,
            actor=SystemSubject(_UPLOADS_ACTOR, upload.institution_id),
            reason=PurgeReason.TRANSIENT,
            now=now,
        )

    def _delete_chunk_objects(self, upload_id: str) -> bool:
        """Delete every object of the upload (also ones a crash left without a row)."""
        try:
            for key in list(self.store.keys(_object_prefix(upload_id))):
                self.store.delete(key)
        except Exception as exc:  # noqa: BLE001  # housekeeping retries; the key is shredded already
            log.warning("upload %s: could not delete its chunks yet: %s", upload_id, type(exc).__name__)
            return False
        return True

    def _delete_objects(self, upload_id: str) -> None:
        if self._delete_chunk_objects(upload_id):
            with self.db.transaction() as session:
                upload = session.get(Upload, upload_id)
                if upload is not None:
                    upload.objects_deleted = True

    # -- cancel (tus termination) ---------------------------------------------------------

    def cancel(self, principal: Principal, upload_id: str, context: RequestContext = NO_CONTEXT) -> None:
        now = self.clock.now()
        with self.db.transaction() as session:
            upload = self._own(session, principal, upload_id, for_update=True)
            if upload.status in (UploadStatus.CANCELLED.value, UploadStatus.EXPIRED.value):
                raise UploadGone
            if (
                upload.status == UploadStatus.FINALIZING.value
                and upload.lease_until
                and upload.lease_until > now
            ):
                raise UploadBusy(int((upload.lease_until - now).total_seconds()))
            if upload.status not in UNFINISHED:
                raise UploadClosed
        self._end(principal, upload_id, None, UploadStatus.CANCELLED, context)

    # -- housekeeping ---------------------------------------------------------------------

    def housekeeping_job(self, job: JobContext) -> None:
        report = self.housekeeping(job.session, job.now)
        if report.expired or report.cleaned:
            log.info("uploads housekeeping: %d expired, %d cleaned", report.expired, report.cleaned)

    def run_housekeeping(self) -> HousekeepingReport:
        """``housekeeping`` now, in a transaction of its own (tests, the CLI)."""
        with self.db.transaction() as session:
            return self.housekeeping(session, self.clock.now())

    def housekeeping(self, session: Session, now: datetime) -> HousekeepingReport:
        """Expire abandoned uploads; shred the keys and delete the chunks of ended ones;
        forget ended uploads after 30 days; empty the replay cache of stale proofs and
        tokens. Runs in the caller's transaction (the job's) and is safe on several
        workers at once; deleting objects twice is harmless. Reschedules itself while
        anything is left to do.
        """
        system = SystemSubject(_UPLOADS_ACTOR)
        stale = session.scalars(
            select(Upload)
            .where(Upload.status.in_(UNFINISHED), Upload.expires_at <= now)
            .order_by(Upload.expires_at)
            .limit(HOUSEKEEPING_BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        expired = 0
        for upload in stale:
            if (
                upload.status == UploadStatus.FINALIZING.value
                and upload.lease_until
                and upload.lease_until > now
            ):
                continue  # being finalized right now
            upload.status = UploadStatus.EXPIRED.value
            upload.updated_at = now
            upload.lease_token = None
            record(
                session,
                AuditAction.UPLOAD_EXPIRE,
                system,
                Target("upload", upload.id),
                Outcome.SUCCESS,
                now=now,
                institution_id=upload.institution_id,
            )
            expired += 1
        ended = session.scalars(
            select(Upload)
            .where(Upload.status.not_in(UNFINISHED), Upload.objects_deleted.is_(False))
            .limit(HOUSEKEEPING_BATCH)
            .with_for_update(skip_locked=True)
        ).all()
        cleaned = 0
        for upload in ended:
            self._shred(session, upload, now)
            if self._delete_chunk_objects(upload.id):
                upload.objects_deleted = True
                cleaned += 1
        forgotten = self.devices.forget_expired(session, now)
        old = session.scalars(
            select(Upload)
            .where(
                Upload.status.not_in(UNFINISHED),
                Upload.objects_deleted.is_(True),
                Upload.updated_at <= now - ENDED_ROWS_KEPT,
            )
            .limit(HOUSEKEEPING_BATCH)
        ).all()
        for upload in old:
            session.delete(upload)
        forgotten += len(old)
        if self._work_left(session):
            schedule_housekeeping(session, now)
        return HousekeepingReport(expired=expired, cleaned=cleaned, forgotten=forgotten)

    @staticmethod
    def _work_left(session: Session) -> bool:
        pending = select(Upload.id).where(Upload.status.in_(UNFINISHED) | Upload.objects_deleted.is_(False))
        return (
            session.scalar(pending.limit(1)) is not None
            or session.scalar(select(DpopProofSeen.digest).limit(1)) is not None
        )


def decode_checksum(header: str | None) -> bytes | None:
    """The digest of ``Upload-Checksum: sha256 <base64>`` (tus checksum extension), or
    ``None`` when the header is absent; ``ValueError`` for another algorithm or bad base64.
    """
    if header is None:
        return None
    algorithm, _, value = header.strip().partition(" ")
    if algorithm.lower() != "sha256":
        raise ValueError(algorithm)
    digest = base64.b64decode(value.strip(), validate=True)
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("length")
    return digest
