"""Request and response models of the exam API (``/api/v1/exams``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from phivault.exams.models import Series
from phivault.exams.service import MAX_COMMENT, Comment, Exam, ExamDetail, ExamPage


class ExamPhiOut(BaseModel):
    """The patient and study as the hospital knows them: only for ``phi:read``."""

    patient_name: str
    patient_id: str
    issuer_of_patient_id: str
    birth_date: str
    sex: str
    accession_number: str
    study_date: str
    study_time: str
    study_description: str
    referring_physician_name: str
    study_instance_uid: str


class ExamOut(BaseModel):
    """An exam (a DICOM study), de-identified; ``phi`` only for readers with ``phi:read``."""

    id: str
    study_instance_uid: str = Field(description="the stored (remapped) Study Instance UID")
    patient: str = Field(description="the patient's pseudonym")
    study_date: str = Field(description="de-identified: empty, or shifted by the Modified Dates option")
    study_time: str
    study_description: str
    modalities: list[str]
    number_of_series: int
    number_of_instances: int
    size: int
    archived_at: datetime | None
    legal_hold_at: datetime | None
    created_at: datetime
    updated_at: datetime
    phi: ExamPhiOut | None = None

    @classmethod
    def of(cls, exam: Exam) -> ExamOut:
        study = exam.study
        phi = None
        if exam.phi is not None:
            patient, values = exam.phi.patient, exam.phi.study
            phi = ExamPhiOut(
                patient_name=patient.patient_name,
                patient_id=patient.patient_id,
                issuer_of_patient_id=patient.issuer_of_patient_id,
                birth_date=patient.birth_date,
                sex=patient.sex,
                accession_number=values.accession_number,
                study_date=values.study_date,
                study_time=values.study_time,
                study_description=values.study_description,
                referring_physician_name=values.referring_physician_name,
                study_instance_uid=values.study_instance_uid,
            )
        return cls(
            id=study.id,
            study_instance_uid=study.study_instance_uid,
            patient=study.patient_ref,
            study_date=study.study_date,
            study_time=study.study_time,
            study_description=study.study_description,
            modalities=[m for m in study.modalities.split("\\") if m],
            number_of_series=study.number_of_series,
            number_of_instances=study.number_of_instances,
            size=study.size,
            archived_at=study.archived_at,
            legal_hold_at=study.legal_hold_at,
            created_at=study.created_at,
            updated_at=study.updated_at,
            phi=phi,
        )


class ExamPageOut(BaseModel):
    items: list[ExamOut]
    next_offset: int | None = Field(description="the offset of the next page; null on the last page")

    @classmethod
    def of(cls, page: ExamPage) -> ExamPageOut:
        return cls(items=[ExamOut.of(exam) for exam in page.items], next_offset=page.next_offset)


class SeriesOut(BaseModel):
    id: str
    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    number_of_instances: int

    @classmethod
    def of(cls, series: Series) -> SeriesOut:
        return cls.model_validate(series, from_attributes=True)


class ExamDetailOut(ExamOut):
    series: list[SeriesOut]
    comments: int

    @classmethod
    def of_detail(cls, detail: ExamDetail) -> ExamDetailOut:
        base = ExamOut.of(detail.exam).model_dump()
        return cls(**base, series=[SeriesOut.of(s) for s in detail.series], comments=detail.comments)


class CommentIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"body": "Left kidney: no findings."}]}
    )

    body: Annotated[str, Field(min_length=1, max_length=MAX_COMMENT)]


class CommentOut(BaseModel):
    id: str
    exam_id: str
    author_id: str
    body: str | None = Field(description="null for readers without phi:read (a comment may name the patient)")
    created_at: datetime
    updated_at: datetime
    own: bool = Field(description="written by the caller: it may edit and delete it")

    @classmethod
    def of(cls, comment: Comment) -> CommentOut:
        return cls.model_validate(comment, from_attributes=True)


class CommentsOut(BaseModel):
    items: list[CommentOut]
