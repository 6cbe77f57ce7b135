"""STOW-RS, the Store Instances transaction (PS3.18 §10.5): each part of a
``multipart/related`` request goes through the ingest pipeline, and the answer is the Store
Instances Response (§10.5.3) as ``application/dicom+json`` (PS3.18 Annex F).

The response, per instance:

* stored or already stored (a re-send is idempotent): an item of the Referenced SOP
  Sequence (0008,1199) with the SOP Class and SOP Instance UIDs **as sent** and the
  Retrieve URL (0008,1190) of the stored, de-identified instance (its new UIDs);
* quarantined (burned-in text no pixel rule covers): an item of the Referenced SOP Sequence
  with Warning Reason (0008,1196) ``B000`` and no Retrieve URL, since the instance can be
  retrieved only once an institution admin releases it;
* refused: an item of the Failed SOP Sequence (0008,1198) with Failure Reason (0008,1197)
  and the UIDs as sent; a part whose UIDs cannot be read (not DICOM, say) is an item of the
  Other Failures Sequence (0008,119A) with its Failure Reason.

Items with a warning or failure also carry Error Comment (0000,0902), the standard DIMSE
field for "an application-specific text description of the error" (PS3.7 §C.4.x), holding
phivault's stable problem ``code`` (``dicom_not_dicom``, ``quarantined`` …): a client
branches on it without private attributes. The HTTP status follows PS3.18 Table 10.5.3-1:
200 all stored, 202 some refused or with warnings, 409 none stored — except that when no
instance was stored because the storage quota or the storage itself is exhausted, the
answer is the problem 413 ``quota_exceeded`` or 507 ``storage_full``.

Parts are ingested as they arrive (one part in memory at a time). A request that turns out
malformed after some parts were stored answers with a problem; the instances stored before
stay stored, and sending the whole request again is safe (re-sends are idempotent).
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, Protocol

import anyio.to_thread
import pydicom
from pydicom.errors import InvalidDicomError

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, RequestContext, Target, record
from phivault.clock import Clock
from phivault.db.engine import Database
from phivault.dicom.errors import DicomRejected, RejectionCode, StowFailureReason
from phivault.dicom.multipart import MultipartError, MultipartReader, Part, is_dicom_part, stow_boundary
from phivault.dicom.validation import is_deflated, read_file_meta
from phivault.exams.errors import QuotaExceeded
from phivault.exams.types import IngestOrigin, Receipt, ReceiptStatus
from phivault.storage.errors import StorageFull

log = logging.getLogger(__name__)

DICOM_JSON: Final = "application/dicom+json"

# Warning Reason (0008,1196) of a quarantined instance. PS3.18 §10.5.3 names B000 "Coercion
# of Data Elements": the instance is kept, and stored only after its pixel data are changed
# (a pixel rule blanks the burned-in text) or, if an admin rejects it, never.
WARNING_QUARANTINED: Final = 0xB000
# Failure Reason of an instance outside the study named in the request's URL. PS3.18 names
# no value; dcm4chee-arc uses C409 ("Cannot understand" range, PS3.4 Table B.2-1).
FAILURE_STUDY_MISMATCH: Final = 0xC409

CODE_QUARANTINED: Final = "quarantined"
CODE_STUDY_MISMATCH: Final = "dicom_study_mismatch"
CODE_QUOTA: Final = "quota_exceeded"
CODE_STORAGE_FULL: Final = "storage_full"

# DICOM JSON tags (PS3.18 §F.2): keyword → "ggggeeee".
_RETRIEVE_URL: Final = "00081190"
_FAILED_SOP_SEQUENCE: Final = "00081198"
_OTHER_FAILURES_SEQUENCE: Final = "0008119A"
_REFERENCED_SOP_SEQUENCE: Final = "00081199"
_SOP_CLASS: Final = "00081150"
_SOP_INSTANCE: Final = "00081155"
_WARNING_REASON: Final = "00081196"
_FAILURE_REASON: Final = "00081197"
_ERROR_COMMENT: Final = "00000902"
_UID_TAGS: Final = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")


class StowError(Exception):
    """The request as a whole is refused: the problem ``status`` and ``code``."""

    def __init__(self, status: int, code: str, detail: str, **extensions: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extensions = extensions


class Ingest(Protocol):
    """What STOW-RS needs of the ingest pipeline (``runtime.ingest``)."""

    def ingest(
        self, source: bytes | BinaryIO, origin: IngestOrigin, *, context: RequestContext = NO_CONTEXT
    ) -> Receipt: ...


@dataclass(frozen=True, slots=True)
class SentUids:
    """The UIDs of a part as its sender wrote them (``None`` where they cannot be read)."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None


def sent_uids(data: bytes) -> SentUids:
    """Read the SOP Class, SOP Instance and Study UIDs of a PS3.10 file, leniently.

    For naming an instance in the response only: what may be stored is decided by the
    pipeline's strict validation. Never raises.
    """
    try:
        _, meta = read_file_meta(io.BytesIO(with_preamble(data)))
        if is_deflated(meta):
            # Never inflated here: the pipeline inflates within the size limit. The File
            # Meta group names the instance too (PS3.10 §7.1).
            names = (meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID"))
            return SentUids(*(_uid_text(name) for name in names))
        dataset = pydicom.dcmread(
            io.BytesIO(with_preamble(data)),
            stop_before_pixels=True,
            defer_size=1024,
            specific_tags=list(_UID_TAGS),
        )
        values = [dataset.get(keyword) for keyword in _UID_TAGS]
    except (InvalidDicomError, EOFError, OSError, ValueError, LookupError, TypeError, AttributeError):
        return SentUids()
    except Exception:  # noqa: BLE001  # hostile input: any parse failure means "unknown"
        return SentUids()
    texts = [_uid_text(value) for value in values]
    return SentUids(*texts)


def _uid_text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip("\x00 ")
    return text if 0 < len(text) <= 64 and all(c.isdigit() or c == "." for c in text) else None  # noqa: PLR2004  # PS3.5 §9.1


_PREAMBLE: Final = b"\x00" * 128 + b"DICM"


def with_preamble(data: bytes) -> bytes:
    """``data`` as a PS3.10 file: a part that starts with the File Meta group but lacks the
    128-byte preamble and "DICM" prefix (PS3.10 §7.1) gets them.

    dicomweb-client, among others, writes in-memory data sets that way. Only the framing
    is added; the File Meta group must still be there and is validated like any other.
    """
    # (0002,gggg) in Explicit VR Little Endian, the only encoding of File Meta (PS3.10 §7.1).
    if data[:2] == b"\x02\x00" and data[4:6].isalpha() and data[4:6].isupper():
        return _PREAMBLE + data
    return data


@dataclass(frozen=True, slots=True)
class InstanceOutcome:
    """What became of one part: a receipt, or a failure reason and code."""

    sent: SentUids
    receipt: Receipt | None = None
    failure_reason: int | None = None
    code: str = ""
    extensions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def accepted(cls, sent: SentUids, receipt: Receipt) -> InstanceOutcome:
        return cls(sent=sent, receipt=receipt, code=receipt.status.value)

    @classmethod
    def failed(cls, sent: SentUids, reason: int, code: str, **extensions: str) -> InstanceOutcome:
        return cls(sent=sent, failure_reason=reason, code=code, extensions=extensions)

    @property
    def warning_reason(self) -> int | None:
        if self.receipt is not None and self.receipt.status is ReceiptStatus.QUARANTINED:
            return WARNING_QUARANTINED
        return None


@dataclass(frozen=True, slots=True)
class StoreResponse:
    """The Store Instances Response: HTTP status and DICOM JSON body."""

    status: int
    body: dict[str, Any]


def retrieve_url(base_url: str, receipt: Receipt) -> str:
    """The WADO-RS URL of a stored instance (PS3.18 §10.4), by its de-identified UIDs."""
    return (
        f"{base_url.rstrip('/')}/dicomweb/studies/{receipt.study_instance_uid}"
        f"/series/{receipt.series_instance_uid}/instances/{receipt.sop_instance_uid}"
    )


def build_response(outcomes: list[InstanceOutcome], *, base_url: str, study: str | None) -> StoreResponse:
    """The Store Instances Response for ``outcomes`` (PS3.18 §10.5.3, Table 10.5.3-1).

    ``study`` is the Study Instance UID the request's URL named, if any: then the top-level
    Retrieve URL names the stored study.
    """
    if not outcomes:
        raise StowError(400, "multipart_empty", "the request holds no instances")
    accepted = [outcome for outcome in outcomes if outcome.receipt is not None]
    failed = [outcome for outcome in outcomes if outcome.receipt is None]
    if not accepted:
        _raise_if_out_of_resources(failed)
    body: dict[str, Any] = {}
    if study is not None and accepted:
        receipt = accepted[0].receipt
        assert receipt is not None  # noqa: S101  # nosec B101  # accepted means a receipt
        study_url = f"{base_url.rstrip('/')}/dicomweb/studies/{receipt.study_instance_uid}"
        body[_RETRIEVE_URL] = _value("UR", study_url)
    # An instance that cannot be named (no readable SOP Class and Instance UIDs, Type 1 in a
    # Failed SOP Sequence item) is reported in the Other Failures Sequence instead.
    named = [outcome for outcome in failed if outcome.sent.sop_class_uid and outcome.sent.sop_instance_uid]
    unnamed = [outcome for outcome in failed if outcome not in named]
    if named:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_failed_item(outcome) for outcome in named]}
    if unnamed:
        body[_OTHER_FAILURES_SEQUENCE] = {"vr": "SQ", "Value": [_failed_item(outcome) for outcome in unnamed]}
    if accepted:
        body[_REFERENCED_SOP_SEQUENCE] = {
            "vr": "SQ",
            "Value": [_referenced_item(outcome, base_url) for outcome in accepted],
        }
    if not accepted:
        status = 409
    elif failed or any(outcome.warning_reason is not None for outcome in accepted):
        status = 202
    else:
        status = 200
    return StoreResponse(status, dict(sorted(body.items())))


def _raise_if_out_of_resources(failed: list[InstanceOutcome]) -> None:
    codes = {outcome.code for outcome in failed}
    if codes == {CODE_QUOTA}:
        scope = failed[0].extensions.get("quota", "institution")
        raise StowError(
            413, CODE_QUOTA, f"the {scope} storage quota would be exceeded; nothing was stored", quota=scope
        )
    if codes == {CODE_STORAGE_FULL}:
        raise StowError(507, CODE_STORAGE_FULL, "the object store has no space left; nothing was stored")


def _value(vr: str, value: object) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]}


def _failed_item(outcome: InstanceOutcome) -> dict[str, Any]:
    item: dict[str, Any] = {
        _ERROR_COMMENT: _value("LO", outcome.code),
        _FAILURE_REASON: _value("US", outcome.failure_reason),
    }
    if outcome.sent.sop_class_uid is not None:
        item[_SOP_CLASS] = _value("UI", outcome.sent.sop_class_uid)
    if outcome.sent.sop_instance_uid is not None:
        item[_SOP_INSTANCE] = _value("UI", outcome.sent.sop_instance_uid)
    return dict(sorted(item.items()))


def _referenced_item(outcome: InstanceOutcome, base_url: str) -> dict[str, Any]:
    receipt = outcome.receipt
    assert receipt is not None  # noqa: S101  # nosec B101  # only accepted outcomes get here
    item: dict[str, Any] = {
        _SOP_CLASS: _value("UI", receipt.sop_class_uid),
        _SOP_INSTANCE: _value("UI", receipt.received_sop_instance_uid),
    }
    warning = outcome.warning_reason
    if warning is None:
        item[_RETRIEVE_URL] = _value("UR", retrieve_url(base_url, receipt))
    else:
        item[_WARNING_REASON] = _value("US", warning)
        item[_ERROR_COMMENT] = _value("LO", outcome.code)
    return dict(sorted(item.items()))


@dataclass(frozen=True, slots=True)
class StowLimits:
    max_instance_bytes: int
    max_request_bytes: int


class StowService:
    """Runs one STOW-RS request: reads parts as they arrive and ingests each."""

    def __init__(
        self, ingest: Ingest, db: Database, clock: Clock, limits: StowLimits, *, base_url: str
    ) -> None:
        self._ingest = ingest
        self._db = db
        self._clock = clock
        self._limits = limits
        self._base_url = base_url

    async def store(  # the request's parts, named at the one call site
        self,
        body: AsyncIterator[bytes],
        *,
        content_type: str | None,
        content_length: int | None,
        origin: IngestOrigin,
        context: RequestContext = NO_CONTEXT,
        study: str | None = None,
    ) -> StoreResponse:
        """Store every part of ``body`` for ``origin``; raises ``MultipartError`` or
        ``StowError`` when the request as a whole is refused.
        """
        limits = self._limits
        boundary = stow_boundary(content_type)
        if content_length is not None and content_length > limits.max_request_bytes:
            raise _request_too_large(limits.max_request_bytes)
        reader = MultipartReader(boundary, max_part_bytes=limits.max_instance_bytes)
        outcomes: list[InstanceOutcome] = []
        received = 0
        async for chunk in body:
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise _request_too_large(limits.max_request_bytes)
            for part in reader.feed(chunk):
                if not is_dicom_part(part):
                    raise MultipartError(
                        415,
                        "unsupported_media_type",
                        f"part {reader.parts} is not application/dicom (PS3.18 §10.5)",
                    )
                outcome = await anyio.to_thread.run_sync(self._store_part, part, origin, context, study)
                outcomes.append(outcome)
        reader.close()
        return build_response(outcomes, base_url=self._base_url, study=study)

    def _store_part(
        self, part: Part, origin: IngestOrigin, context: RequestContext, study: str | None
    ) -> InstanceOutcome:
        sent = sent_uids(part.body)
        if not part.complete:
            # Never held whole, so never handed to the pipeline: refused (and audited) here.
            self._audit_refusal(origin, context, RejectionCode.TOO_LARGE.value)
            return InstanceOutcome.failed(
                sent, StowFailureReason.OUT_OF_RESOURCES, RejectionCode.TOO_LARGE.value
            )
        if study is not None and sent.study_instance_uid is not None and sent.study_instance_uid != study:
            # PS3.18 §10.5: with a study in the URL, every instance must belong to it.
            self._audit_refusal(origin, context, CODE_STUDY_MISMATCH)
            return InstanceOutcome.failed(sent, FAILURE_STUDY_MISMATCH, CODE_STUDY_MISMATCH)
        try:
            receipt = self._ingest.ingest(with_preamble(part.body), origin, context=context)
        except DicomRejected as exc:
            return InstanceOutcome.failed(sent, exc.stow_failure_reason, exc.code.value)
        except QuotaExceeded as exc:
            return InstanceOutcome.failed(
                sent, StowFailureReason.OUT_OF_RESOURCES, CODE_QUOTA, quota=exc.scope
            )
        except StorageFull:
            log.error("object store is full: an instance was refused")  # noqa: TRY400  # no traceback: it may quote data
            return InstanceOutcome.failed(sent, StowFailureReason.OUT_OF_RESOURCES, CODE_STORAGE_FULL)
        return InstanceOutcome.accepted(sent, receipt)

    def _audit_refusal(self, origin: IngestOrigin, context: RequestContext, code: str) -> None:
        """The pipeline's own refusal event (``instance.reject``), for refusals made here."""
        with self._db.transaction() as session:
            record(
                session,
                AuditAction.INSTANCE_REJECT,
                origin.subject,
                Target("dicom_rejection", code),
                Outcome.FAILURE,
                now=self._clock.now(),
                context=context,
                institution_id=origin.institution_id,
            )


def _request_too_large(limit: int) -> MultipartError:
    return MultipartError(413, "request_too_large", f"the request body is larger than {limit} bytes")
