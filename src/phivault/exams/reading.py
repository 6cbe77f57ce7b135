"""The read core: every path that reads exams finds, opens and re-identifies them here.

QIDO-RS, WADO-RS and the exam API use it today; share links and export to PACS will.

* **Scope.** A principal reads the exams of its own institution, with ``exam:read``;
  anything else answers ``NotFound`` (another tenant's study looks like no study).
* **Open.** An instance is the encrypted, de-identified object ingest stored; it is opened
  for random access (``OpenedObject.read``) so a frame or a header costs the segments it
  touches, or streamed whole. Patient keys are unwrapped in a short transaction; the bytes
  are read after it commits (on SQLite every transaction holds the write lock).
* **Re-identify.** PHI goes back only to principals holding ``phi:read`` in the owning
  institution (``may_read_phi``): the instance's sealed PHI document
  (``phi_instances.record``) is opened and ``dicom.reid.reidentify`` puts its values and the
  original UIDs back. Those principals also see and may use original UIDs: a UID they send
  is looked up as stored and as remapped with the institution's secret.
* **Audit.** Callers record what they did (``audit``); each disclosure of a patient's PHI
  is one ``phi.read`` event naming the patient by pseudonym.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from pydicom import dcmread
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from sqlalchemy import Row, select
from sqlalchemy.orm import Session

from phivault.accounts.errors import Forbidden
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import RequestContext, Target, record
from phivault.clock import Clock
from phivault.crypto.service import KeyHierarchy, ObjectContext, OpenedObject, SealedField
from phivault.db.engine import Database
from phivault.dicom.layout import PIXEL_DATA_TAG, InstanceLayout, read_frames, read_layout
from phivault.dicom.phi import PhiRecord
from phivault.dicom.reid import reidentify
from phivault.dicom.uids import remap_uid
from phivault.exams.errors import NotFound
from phivault.exams.models import Instance, Series, Study
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiStudy
from phivault.exams.phi_store import OriginalUids, PhiStore, field_aad
from phivault.exams.secrets import InstitutionSecrets
from phivault.storage.base import ObjectStore

INSTANCE_KIND: Final = "instance"  # ingest.INSTANCE_KIND: the object kind of stored instances
_PREAMBLE: Final = b"\x00" * 128 + b"DICM"
_PATH_TAG_END: Final = 10  # "(gggg,eeee)"


def may_read_phi(principal: Principal, institution_id: str) -> bool:
    """PHI goes to principals holding ``phi:read`` in the institution that owns the data."""
    return principal.has(Permission.PHI_READ) and principal.institution_id == institution_id


def reading_institution(principal: Principal) -> str:
    """The institution whose exams ``principal`` may read; ``Forbidden`` without ``exam:read``."""
    if not principal.has(Permission.EXAM_READ):
        raise Forbidden
    if principal.institution_id is None:
        raise NotFound
    return principal.institution_id


@dataclass(frozen=True, slots=True)
class InstancePhi:
    """The PHI document of one instance (``PhiInstance.record``), opened."""

    phi: PhiRecord
    uids: OriginalUids
    version: str  # digest of the sealed document: changes when a re-send replaces it


@dataclass(frozen=True, slots=True)
class PatientPhi:
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str
    birth_date: str
    sex: str


@dataclass
class PhiBatch:
    """PHI opened by ``ExamReader.phi_of``, by patient pseudonym, study id and instance id."""

    patients: dict[str, PatientPhi] = field(default_factory=dict)
    studies: dict[str, StudyPhi] = field(default_factory=dict)
    instances: dict[str, InstancePhi] = field(default_factory=dict)

    def patient(self, patient_ref: str) -> PatientPhi:
        return self.patients.get(patient_ref, PatientPhi("", "", "", "", ""))

    def study(self, study_id: str) -> StudyPhi:
        return self.studies.get(study_id, StudyPhi())


@dataclass(frozen=True, slots=True)
class StudyPhi:
    """The study's PHI as ingest sealed it (``PhiStudy.record``)."""

    accession_number: str = ""
    referring_physician_name: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    study_id: str = ""
    study_instance_uid: str = ""


PATIENT_FIELDS: Final = ("patient_id", "issuer_of_patient_id", "patient_name", "birth_date", "sex")
_ROW_BATCH: Final = 500


def _rows(
    phi_session: Session,
    model: type[PhiPatient | PhiStudy | PhiInstance],
    ids: list[str],
    columns: Sequence[str],
) -> list[Row[Any]]:
    """The named columns (and id, institution) of the rows with these ids: plain rows, no
    ORM objects (a search page reads a few columns of some dozens of rows).
    """
    selected = [model.id, model.institution_id, *(getattr(model, column) for column in columns)]
    found: list[Row[Any]] = []
    for start in range(0, len(ids), _ROW_BATCH):
        chunk = ids[start : start + _ROW_BATCH]
        found.extend(phi_session.execute(select(*selected).where(model.id.in_(chunk))))
    return found


def _instance_phi(document: dict[str, Any], sealed: bytes) -> InstancePhi:
    uids = document["uids"]
    return InstancePhi(
        phi=_phi_record(dict(document["phi"])),
        uids=OriginalUids(
            str(uids["study_instance_uid"]), str(uids["series_instance_uid"]), str(uids["sop_instance_uid"])
        ),
        version=hashlib.sha256(sealed).hexdigest()[:16],
    )


def _phi_record(values: dict[str, object]) -> PhiRecord:
    other = values.pop("other", [])
    assert isinstance(other, list)  # noqa: S101  # nosec B101  # asdict of a PhiRecord
    known = {name: str(value) for name, value in values.items() if name in PhiRecord.__dataclass_fields__}
    return PhiRecord(**known, other=tuple((str(path), str(value)) for path, value in other))


class ExamReader:
    """``runtime.reading``: see the module docstring."""

    def __init__(  # the runtime's parts this service composes
        self,
        db: Database,
        phi_db: Database,
        store: ObjectStore,
        keys: KeyHierarchy,
        secrets: InstitutionSecrets,
        phi: PhiStore,
        clock: Clock,
    ) -> None:
        self.db = db
        self.phi_db = phi_db
        self.store = store
        self.keys = keys
        self.secrets = secrets
        self.phi = phi
        self.clock = clock

    # -- UIDs -------------------------------------------------------------------------------

    def stored_uids(self, principal: Principal, institution_id: str, uids: Iterable[str]) -> list[str]:
        """The stored UIDs a principal's UIDs may name: as given, and for PHI readers also
        the institution's remapping of an original UID.
        """
        given = [uid for uid in uids if uid]
        if not may_read_phi(principal, institution_id):
            return given
        secret = self.secrets.get(institution_id).uid
        return list(dict.fromkeys([*given, *(remap_uid(uid, secret) for uid in given)]))

    # -- lookups --------------------------------------------------------------------------

    def study(self, session: Session, principal: Principal, study_uid: str) -> Study:
        institution_id = reading_institution(principal)
        found = session.scalars(
            select(Study).where(
                Study.institution_id == institution_id,
                Study.study_instance_uid.in_(self.stored_uids(principal, institution_id, [study_uid])),
            )
        ).first()
        if found is None:
            raise NotFound
        return found

    def study_by_id(self, session: Session, principal: Principal, study_id: str) -> Study:
        institution_id = reading_institution(principal)
        found = session.get(Study, study_id)
        if found is None or found.institution_id != institution_id:
            raise NotFound
        return found

    def series(self, session: Session, principal: Principal, study: Study, series_uid: str) -> Series:
        found = session.scalars(
            select(Series).where(
                Series.institution_id == study.institution_id,
                Series.study_id == study.id,
                Series.series_instance_uid.in_(
                    self.stored_uids(principal, study.institution_id, [series_uid])
                ),
            )
        ).first()
        if found is None:
            raise NotFound
        return found

    def instance(
        self, session: Session, principal: Principal, study: Study, series: Series | None, sop_uid: str
    ) -> Instance:
        query = select(Instance).where(
            Instance.institution_id == study.institution_id,
            Instance.study_id == study.id,
            Instance.sop_instance_uid.in_(self.stored_uids(principal, study.institution_id, [sop_uid])),
        )
        if series is not None:
            query = query.where(Instance.series_id == series.id)
        found = session.scalars(query).first()
        if found is None:
            raise NotFound
        return found

    def instances(self, session: Session, study: Study, series: Series | None = None) -> list[Instance]:
        """The instances of a study (or one series), in series then instance order."""
        query = (
            select(Instance)
            .join(Series, Series.id == Instance.series_id)
            .where(Instance.institution_id == study.institution_id, Instance.study_id == study.id)
            .order_by(Series.series_number, Series.created_at, Instance.instance_number, Instance.created_at)
        )
        if series is not None:
            query = query.where(Instance.series_id == series.id)
        return list(session.scalars(query))

    def series_of(self, session: Session, study: Study, series_id: str) -> Series:
        found = session.get(Series, series_id)
        if found is None or found.study_id != study.id:
            raise NotFound
        return found

    # -- objects --------------------------------------------------------------------------

    def open(self, session: Session, study: Study, instance: Instance) -> OpenedObject:
        """The stored (de-identified) instance, opened for range reads and streaming."""
        return self.keys.open_object(
            self.store,
            instance.object_key,
            session=session,
            context=ObjectContext(study.institution_id, study.patient_key_id, INSTANCE_KIND),
        )

    # -- PHI ------------------------------------------------------------------------------

    def phi_of(
        self,
        session: Session,
        phi_session: Session,
        studies: Sequence[Study],
        instances: Sequence[tuple[Study, str]] = (),
        *,
        patient_fields: Sequence[str] = PATIENT_FIELDS,
    ) -> PhiBatch:
        """The PHI of several studies, their patients and some of their instances, opened
        together: at most three PHI-store queries and one batch of decryptions
        (``decrypt_fields`` unwraps each patient key once), whatever the number of studies.

        Only ``patient_fields`` (of ``PATIENT_FIELDS``) of the patients are decrypted, the
        others are left empty: a search opens what its answers show.
        """
        unknown = set(patient_fields) - set(PATIENT_FIELDS)
        if unknown:
            raise ValueError(f"not patient fields: {sorted(unknown)}")
        by_study = {study.id: study for study in studies}
        owners = {instance_id: study for study, instance_id in instances}
        institutions = {study.institution_id for study in studies}
        patient_columns = [column for column in PATIENT_FIELDS if column in patient_fields]
        # Rows of another institution are left out (ids come from scoped index rows anyway).
        patient_refs = sorted({s.patient_ref for s in studies}) if patient_columns else []
        patient_rows = [
            row
            for row in _rows(phi_session, PhiPatient, patient_refs, ["patient_key_id", *patient_columns])
            if row.institution_id in institutions
        ]
        study_rows = [
            row
            for row in _rows(phi_session, PhiStudy, sorted(by_study), ["record"])
            if row.institution_id == by_study[row.id].institution_id
        ]
        instance_rows = [
            row
            for row in _rows(phi_session, PhiInstance, sorted(owners), ["record"])
            if row.institution_id == owners[row.id].institution_id
        ]
        fields = [
            SealedField(row.patient_key_id, getattr(row, column), field_aad("phi_patients", column, row.id))
            for row in patient_rows
            for column in patient_columns
        ]
        fields += [
            SealedField(
                by_study[row.id].patient_key_id, row.record, field_aad("phi_studies", "record", row.id)
            )
            for row in study_rows
        ]
        fields += [
            SealedField(
                owners[row.id].patient_key_id, row.record, field_aad("phi_instances", "record", row.id)
            )
            for row in instance_rows
        ]
        opened = iter(self.keys.decrypt_fields(session, fields))
        batch = PhiBatch()
        for row in patient_rows:
            opened_columns = {column: next(opened).decode() for column in patient_columns}
            batch.patients[row.id] = PatientPhi(
                **{column: opened_columns.get(column, "") for column in PATIENT_FIELDS}
            )
        known = StudyPhi.__dataclass_fields__
        for row in study_rows:
            values = json.loads(next(opened))
            batch.studies[row.id] = StudyPhi(**{k: str(v) for k, v in values.items() if k in known})
        for row in instance_rows:
            batch.instances[row.id] = _instance_phi(json.loads(next(opened)), row.record)
        return batch

    def instance_phi(
        self, session: Session, phi_session: Session, study: Study, instance_id: str
    ) -> InstancePhi:
        found = self.phi_of(session, phi_session, [], [(study, instance_id)]).instances.get(instance_id)
        if found is None:
            raise NotFound  # an index row without its PHI: the sweeper's business
        return found

    def study_phi(self, session: Session, phi_session: Session, study: Study) -> StudyPhi:
        return self.phi_of(session, phi_session, [study]).studies.get(study.id, StudyPhi())

    def patient_phi(self, session: Session, phi_session: Session, study: Study) -> PatientPhi:
        return self.phi_of(session, phi_session, [study]).patient(study.patient_ref)

    def patient_names(
        self, session: Session, phi_session: Session, institution_id: str, patient_refs: Iterable[str]
    ) -> dict[str, str]:
        """Decrypted names of the given patients (the candidates of a name query only)."""
        refs = sorted(set(patient_refs))
        rows = [
            row
            for row in _rows(phi_session, PhiPatient, refs, ["patient_key_id", "patient_name"])
            if row.institution_id == institution_id
        ]
        fields = [
            SealedField(
                row.patient_key_id, row.patient_name, field_aad("phi_patients", "patient_name", row.id)
            )
            for row in rows
        ]
        names = self.keys.decrypt_fields(session, fields)
        return {row.id: name.decode() for row, name in zip(rows, names, strict=True)}

    # -- reading instances ----------------------------------------------------------------

    def read_instance(
        self,
        principal: Principal,
        study: Study,
        instance: Instance,
        *,
        uid_map: dict[str, str] | None = None,
        with_phi: bool = True,
    ) -> InstanceReading:
        """Open ``instance`` for ``principal``: its PHI document too when it may read PHI
        (and ``with_phi``: frames and rendered images need none).

        ``uid_map`` (stored → original UIDs) grows with every instance opened through it, so
        instances of one retrieval re-identify each other's references.
        """
        with self.db.transaction() as session:
            series_uid = session.scalar(
                select(Series.series_instance_uid).where(Series.id == instance.series_id)
            )
            if series_uid is None:
                raise NotFound
            return self._reading(session, principal, study, instance, series_uid, uid_map, with_phi=with_phi)

    def open_instance(
        self,
        principal: Principal,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        *,
        action: AuditAction,
        context: RequestContext,
        with_phi: bool = True,
    ) -> InstanceReading:
        """Find one instance by its WADO-RS path, audit the access and open it, all in one
        transaction (a viewer asks for frames one by one: each costs few round trips).
        """
        with self.db.transaction() as session:
            study = self.study(session, principal, study_uid)
            series = self.series(session, principal, study, series_uid)
            instance = self.instance(session, principal, study, series, sop_uid)
            self.audit(session, principal, action, Target("instance", instance.id), context)
            reading = self._reading(
                session, principal, study, instance, series.series_instance_uid, None, with_phi=with_phi
            )
            if reading.phi is not None:
                self.audit_phi(session, principal, [study.patient_ref], context)
            return reading

    def _reading(
        self,
        session: Session,
        principal: Principal,
        study: Study,
        instance: Instance,
        series_uid: str,
        uid_map: dict[str, str] | None,
        *,
        with_phi: bool,
    ) -> InstanceReading:
        opened = self.open(session, study, instance)
        phi: InstancePhi | None = None
        if with_phi and may_read_phi(principal, study.institution_id):
            # The PHI database is only read here: a write transaction would take SQLite's write lock
            # in whichever order the two sessions are first used, and two requests taking the two
            # locks in opposite orders wait on each other until the busy timeout (bench/load.py).
            with self.phi_db.read() as phi_session:
                phi = self.instance_phi(session, phi_session, study, instance.id)
        uids = uid_map if uid_map is not None else {}
        if phi is not None:
            uids[study.study_instance_uid] = phi.uids.study_instance_uid
            uids[series_uid] = phi.uids.series_instance_uid
            uids[instance.sop_instance_uid] = phi.uids.sop_instance_uid
        return InstanceReading(study, instance, opened, phi, uids)

    def retrieve(
        self,
        principal: Principal,
        study_uid: str,
        series_uid: str | None = None,
        sop_uid: str | None = None,
        *,
        action: AuditAction,
        context: RequestContext,
    ) -> Retrieval:
        """Find the instances a WADO-RS path names (NotFound if none) and audit the access."""
        with self.db.transaction() as session:
            study = self.study(session, principal, study_uid)
            series = self.series(session, principal, study, series_uid) if series_uid is not None else None
            if sop_uid is not None:
                instances = [self.instance(session, principal, study, series, sop_uid)]
                target = Target("instance", instances[0].id)
            else:
                instances = self.instances(session, study, series)
                target = Target("series", series.id) if series is not None else Target("study", study.id)
            if not instances:
                raise NotFound
            self.audit(session, principal, action, target, context)
            reidentified = may_read_phi(principal, study.institution_id)
            if reidentified:
                self.audit_phi(session, principal, [study.patient_ref], context)
        return Retrieval(principal, study, instances, reidentified=reidentified)

    def readings(self, retrieval: Retrieval) -> Iterator[InstanceReading]:
        """Each instance of a retrieval, opened in turn (for streaming one after another)."""
        uid_map: dict[str, str] = {}
        for instance in retrieval.instances:
            yield self.read_instance(retrieval.principal, retrieval.study, instance, uid_map=uid_map)

    # -- audit ----------------------------------------------------------------------------

    def audit(
        self,
        session: Session,
        principal: Principal,
        action: AuditAction,
        target: Target | None,
        context: RequestContext,
    ) -> None:
        record(session, action, principal, target, Outcome.SUCCESS, now=self.clock.now(), context=context)

    def audit_phi(
        self, session: Session, principal: Principal, patient_refs: Iterable[str], context: RequestContext
    ) -> None:
        """One ``phi.read`` per patient whose PHI is disclosed (by pseudonym, never a value)."""
        for patient_ref in sorted(set(patient_refs)):
            self.audit(session, principal, AuditAction.PHI_READ, Target("patient", patient_ref), context)


@dataclass(frozen=True)
class Retrieval:
    """What a WADO-RS path named, for one principal: the study and its instances, in order."""

    principal: Principal
    study: Study
    instances: list[Instance]
    reidentified: bool

    def etag(self, representation: str) -> str:
        """A strong validator of one representation (``dicom``, ``metadata`` …) of the whole
        answer: its instances and whether they are re-identified.
        """
        digest = hashlib.sha256(f"{representation}/{'r' if self.reidentified else 'd'}/".encode())
        for instance in self.instances:
            digest.update(f"{instance.id}:{instance.sha256};".encode())
        return f'"{digest.hexdigest()[:32]}"'


@dataclass
class InstanceReading:
    """One instance opened for one principal: the stored bytes, and its PHI when allowed."""

    study: Study
    instance: Instance
    opened: OpenedObject
    phi: InstancePhi | None
    uid_map: dict[str, str] = field(default_factory=dict)

    @property
    def reidentified(self) -> bool:
        return self.phi is not None

    @cached_property
    def layout(self) -> InstanceLayout:
        return read_layout(self.opened)

    @property
    def etag(self) -> str:
        """A strong validator of what this principal gets (de-identified or not)."""
        if self.phi is None:
            return f'"{self.instance.sha256[:32]}"'
        digest = hashlib.sha256(f"{self.instance.sha256}/{self.phi.version}".encode()).hexdigest()
        return f'"r{digest[:31]}"'

    @property
    def size(self) -> int | None:
        """The byte size of ``iter_dicom`` when known ahead (the stored instance)."""
        return None if self.phi is not None else self.instance.size

    def header(self) -> Dataset:
        """Everything but the pixel data (and what follows it), re-identified if allowed."""
        header = self.layout.header
        if self.phi is None:
            return header
        return reidentify(header, self.phi.phi, self.uid_map)

    def iter_dicom(self) -> Iterator[bytes]:
        """The PS3.10 file: as stored, or re-identified (the header re-encoded, the pixel
        data streamed from the stored object without decoding it).
        """
        if self.phi is None:
            yield from self.opened.iter_plaintext()
            return
        layout = self.layout
        pixel = layout.pixel_data
        if pixel is None or _touches_trailer(self.phi.phi):
            yield _encode(self._reidentify_whole())
            return
        yield _encode_header(
            reidentify(layout.header, self.phi.phi, self.uid_map), layout.transfer_syntax_uid
        )
        yield from self.opened.iter_range(
            pixel.element_offset, self.opened.plaintext_size - pixel.element_offset
        )

    def frames(self, numbers: Sequence[int]) -> list[bytes]:
        """Frames as stored (no PHI lives in pixel data that passed the pixel rules)."""
        return read_frames(self.opened, self.layout, numbers)

    def _reidentify_whole(self) -> Dataset:
        # Rare: a deflated data set, or PHI recorded after the pixel data (a private group
        # past 7FE0). The instance is decoded whole, within the ingest size limit.
        assert self.phi is not None  # noqa: S101  # nosec B101  # checked by the caller
        dataset = dcmread(io.BytesIO(b"".join(self.opened.iter_plaintext())))
        return reidentify(dataset, self.phi.phi, self.uid_map)


def _touches_trailer(phi: PhiRecord) -> bool:
    return any(int(path[1:5] + path[6:_PATH_TAG_END], 16) > PIXEL_DATA_TAG for path, _ in phi.other)


def _encode_header(header: Dataset, transfer_syntax_uid: str) -> bytes:
    syntax = dicom_uid.UID(transfer_syntax_uid)
    buffer = DicomBytesIO()
    buffer.write(_PREAMBLE)
    write_file_meta_info(buffer, header.file_meta, enforce_standard=True)
    buffer.is_little_endian = syntax.is_little_endian
    buffer.is_implicit_VR = syntax.is_implicit_VR
    body = Dataset()
    for element in header:
        body.add(element)
    write_dataset(buffer, body)
    return buffer.getvalue()


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
