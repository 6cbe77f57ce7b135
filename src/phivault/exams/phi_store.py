"""The PHI store: patients matched per institution, and the PHI of studies and instances.

Values are sealed with the patient's key (``KeyHierarchy.encrypt_field``), each bound to
its table, column and row id. Matching uses blind indexes (``IngestSecret.blind``), never
decryption. Patient keys live in the main database with the rest of the key hierarchy, so
sealing and opening need a main-database session; rows live in the PHI database.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.clock import Clock
from phivault.crypto.service import KeyHierarchy
from phivault.db.engine import Database
from phivault.dicom.phi import PhiRecord
from phivault.exams.phi_models import PhiInstance, PhiPatient, PhiPatientToken, PhiStudy
from phivault.exams.secrets import IngestSecret
from phivault.ids import new_id

_PATIENT_FIELDS = ("patient_id", "issuer_of_patient_id", "patient_name", "birth_date", "sex")


def field_aad(table: str, column: str, row_id: str) -> bytes:
    return f"{table}/{column}/{row_id}".encode()


@dataclass(frozen=True, slots=True)
class PatientRef:
    """A patient of the PHI store: its pseudonym (row id) and key."""

    id: str
    patient_key_id: str


@dataclass(frozen=True, slots=True)
class OriginalUids:
    """The UIDs as received; only the PHI store keeps them (for re-identified export)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def patient_index(secret: IngestSecret, phi: PhiRecord, original_study_uid: str) -> str:
    """The patient's blind index: PatientID + issuer (PS3.3 C.7.1.1). Without a PatientID
    the patient cannot be recognised again, so each study gets a patient of its own.
    """
    if phi.patient_id.strip():
        return secret.blind("patient", phi.issuer_of_patient_id.strip(), phi.patient_id.strip())
    return secret.blind("study-patient", original_study_uid)


class PhiStore:
    def __init__(self, phi_db: Database, db: Database, keys: KeyHierarchy, clock: Clock) -> None:
        self._phi_db = phi_db
        self._db = db
        self._keys = keys
        self._clock = clock

    # -- patients -----------------------------------------------------------------------

    def find_patient(self, institution_id: str, index: str) -> PatientRef | None:
        with self._phi_db.read() as phi:
            row = phi.execute(
                select(PhiPatient.id, PhiPatient.patient_key_id).where(
                    PhiPatient.institution_id == institution_id, PhiPatient.patient_id_index == index
                )
            ).one_or_none()
        return None if row is None else PatientRef(row.id, row.patient_key_id)

    def find_or_create_patient(
        self, institution_id: str, index: str, phi: PhiRecord, *, tokens: Iterable[str] = ()
    ) -> PatientRef:
        """The institution's patient with blind index ``index``, created on first sight.

        A new patient gets a new key (main database, committed first: a key without a
        patient holds nothing), then its row (PHI database) with its name and PatientID
        ``tokens`` (``name_index.patient_tokens``). Two ingests racing to create the same
        patient: the unique blind index lets one win; the other uses the winner.
        """
        found = self.find_patient(institution_id, index)
        if found is not None:
            return found
        now = self._clock.now()
        patient_id = new_id()
        with self._db.transaction() as session:
            key_id = self._keys.new_patient_key(session, institution_id, now)
            sealed = {
                column: self._keys.encrypt_field(
                    session, key_id, getattr(phi, column), aad=field_aad("phi_patients", column, patient_id)
                )
                for column in _PATIENT_FIELDS
            }
        try:
            with self._phi_db.transaction() as phi_session:
                phi_session.add(
                    PhiPatient(
                        id=patient_id,
                        institution_id=institution_id,
                        patient_key_id=key_id,
                        patient_id_index=index,
                        created_at=now,
                        updated_at=now,
                        **sealed,
                    )
                )
                phi_session.flush()  # the patient row before the rows that reference it
                phi_session.add_all(
                    PhiPatientToken(institution_id=institution_id, token=token, patient_id=patient_id)
                    for token in sorted(set(tokens))
                )
        except IntegrityError:
            found = self.find_patient(institution_id, index)
            if found is None:
                raise
            return found  # the unused key holds nothing; the sweeper destroys it
        return PatientRef(patient_id, key_id)

    def patient_values(self, session: Session, phi_session: Session, patient_id: str) -> dict[str, str]:
        """The patient's PHI in clear (for principals allowed to read it)."""
        row = phi_session.get(PhiPatient, patient_id)
        if row is None:
            return {}
        return {
            column: self._keys.decrypt_field(
                session,
                row.patient_key_id,
                getattr(row, column),
                aad=field_aad("phi_patients", column, row.id),
            ).decode()
            for column in _PATIENT_FIELDS
        }

    # -- studies and instances -----------------------------------------------------------

    def seal_instance(
        self,
        session: Session,
        patient: PatientRef,
        instance_id: str,
        phi: PhiRecord,
        uids: OriginalUids,
    ) -> bytes:
        """The sealed PHI document of one instance: the PHI record (named values, and every
        other value the profile removed or replaced, by path) and the original UIDs.
        """
        document: dict[str, Any] = {"phi": asdict(phi), "uids": asdict(uids)}
        return self._keys.encrypt_field(
            session,
            patient.patient_key_id,
            json.dumps(document, sort_keys=True, separators=(",", ":")),
            aad=field_aad("phi_instances", "record", instance_id),
        )

    def seal_study(
        self, session: Session, patient: PatientRef, study_id: str, values: dict[str, str]
    ) -> bytes:
        return self._keys.encrypt_field(
            session,
            patient.patient_key_id,
            json.dumps(values, sort_keys=True, separators=(",", ":")),
            aad=field_aad("phi_studies", "record", study_id),
        )

    def put_instance(  # noqa: PLR0913  # the rows' fields, named at the one call site
        self,
        *,
        institution_id: str,
        patient: PatientRef,
        study_id: str,
        instance_id: str,
        sealed_instance: bytes,
        sealed_study: bytes,
        accession_index: str | None,
        study_date_index: str | None,
        now: datetime,
    ) -> None:
        """Write the PHI rows of one instance (and of its study, the first time).

        Ids are derived from the remapped UIDs, so a re-send after a crash finds the row it
        left behind: replaced, not duplicated.
        """
        for attempt in range(3):
            try:
                self._put_instance(
                    institution_id,
                    patient,
                    study_id,
                    instance_id,
                    sealed_instance,
                    sealed_study,
                    now,
                    accession_index=accession_index,
                    study_date_index=study_date_index,
                )
            except IntegrityError:
                if attempt == 2:  # noqa: PLR2004
                    raise
                continue  # a concurrent ingest of the same study or instance committed first
            return

    def _put_instance(  # noqa: PLR0913
        self,
        institution_id: str,
        patient: PatientRef,
        study_id: str,
        instance_id: str,
        sealed_instance: bytes,
        sealed_study: bytes,
        now: datetime,
        *,
        accession_index: str | None,
        study_date_index: str | None,
    ) -> None:
        with self._phi_db.transaction() as phi:
            existing = phi.get(PhiInstance, instance_id)
            if existing is not None:
                existing.record = sealed_instance
                existing.patient_id = patient.id
                existing.created_at = now
            else:
                phi.add(
                    PhiInstance(
                        id=instance_id,
                        institution_id=institution_id,
                        patient_id=patient.id,
                        study_id=study_id,
                        record=sealed_instance,
                        created_at=now,
                    )
                )
            if phi.get(PhiStudy, study_id) is None:
                phi.add(
                    PhiStudy(
                        id=study_id,
                        institution_id=institution_id,
                        patient_id=patient.id,
                        accession_number_index=accession_index,
                        study_date_index=study_date_index,
                        record=sealed_study,
                        created_at=now,
                    )
                )

    def delete_instance(self, instance_id: str) -> None:
        with self._phi_db.transaction() as phi:
            row = phi.get(PhiInstance, instance_id)
            if row is not None:
                phi.delete(row)
