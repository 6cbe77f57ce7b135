"""QIDO-RS searches (PS3.18 §10.6) over the de-identified index and the PHI store's blind indexes.

Every principal queries the attributes **as it sees them**:

* principals with ``phi:read`` in the institution (``reading.may_read_phi``) match PHI keys
  against the PHI store without decrypting it: PatientID (+ IssuerOfPatientID) by blind
  index, PatientName by the name tokens of ``name_index`` (only the candidates are
  decrypted to check a wildcard pattern), AccessionNumber by blind index, StudyDate by the
  blind index of each day of the range (at most ``PHIVAULT_QIDO_MAX_DATE_RANGE_DAYS``);
  answers carry the PHI and the original UIDs;
* everyone else sees de-identified attributes only: PatientName and PatientID are the
  patient's pseudonym and match it; StudyDate matches the de-identified (empty or shifted)
  date; a key that exists only as PHI (AccessionNumber, PatientBirthDate …) is refused with
  400 ``phi_query_not_permitted`` rather than silently matching nothing.

A key the index cannot match (StudyTime, ReferringPhysicianName …) is ignored with a
``Warning: 299`` header, as PS3.18 §8.3.4.1 asks. Archived studies are left out of
searches unless StudyInstanceUID names them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from enum import StrEnum
from typing import Final

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import ColumnElement, and_, func, literal, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction
from phivault.audit.service import RequestContext
from phivault.dicom.jsonmodel import DicomJsonObject
from phivault.dicom.phi import PhiRecord
from phivault.exams.errors import InvalidRequest
from phivault.exams.models import Instance, Series, Study
from phivault.exams.name_index import (
    MAX_CANDIDATES_TO_VERIFY,
    NamePatternTooBroad,
    name_query,
    patient_id_token,
)
from phivault.exams.phi_models import PhiPatient, PhiPatientToken, PhiStudy
from phivault.exams.phi_store import patient_index
from phivault.exams.reading import (
    ExamReader,
    InstancePhi,
    PhiBatch,
    may_read_phi,
    reading_institution,
)
from phivault.exams.secrets import IngestSecret

MAX_CANDIDATES: Final = 30_000  # studies or patients matched on the PHI side before paging
MAX_NAME_PATTERN: Final = 200  # characters: five PN components of 64 would not fit anyway
MAX_NAME_WILDCARDS: Final = 8
# Up to this many candidates (studies, or patients) from the PHI keys, a study search reads
# the candidates' keys and orders and pages them here (_few_studies).
MAX_CANDIDATES_ORDERED_HERE: Final = 2_000
_IN_CHUNK: Final = 5_000
_DATE: Final = re.compile(r"^\d{8}$")
_UID: Final = re.compile(r"^[0-9.]{1,64}$")
_CODE: Final = re.compile(r"^[A-Za-z0-9_ ]{1,16}$")
_SERIES_DESCRIPTION_PATH: Final = "(0008,103E)"


class QueryLevel(StrEnum):
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword  # noqa: S101  # nosec B101  # the keywords below exist
    return int(tag)


PATIENT_NAME: Final = _tag("PatientName")
PATIENT_ID: Final = _tag("PatientID")
ISSUER: Final = _tag("IssuerOfPatientID")
STUDY_UID: Final = _tag("StudyInstanceUID")
STUDY_DATE: Final = _tag("StudyDate")
ACCESSION: Final = _tag("AccessionNumber")
MODALITIES: Final = _tag("ModalitiesInStudy")
SERIES_UID: Final = _tag("SeriesInstanceUID")
MODALITY: Final = _tag("Modality")
SERIES_NUMBER: Final = _tag("SeriesNumber")
SOP_UID: Final = _tag("SOPInstanceUID")
SOP_CLASS: Final = _tag("SOPClassUID")
INSTANCE_NUMBER: Final = _tag("InstanceNumber")

_STUDY_KEYS: Final = frozenset(
    {PATIENT_NAME, PATIENT_ID, ISSUER, STUDY_UID, STUDY_DATE, ACCESSION, MODALITIES}
)
_SERIES_KEYS: Final = frozenset({SERIES_UID, MODALITY, SERIES_NUMBER})
_INSTANCE_KEYS: Final = frozenset({SOP_UID, SOP_CLASS, INSTANCE_NUMBER})
# Attributes that exist only as PHI: a principal without phi:read has nothing to match them on.
_PHI_ONLY: Final = frozenset(
    _tag(k)
    for k in (
        "AccessionNumber",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "ReferringPhysicianName",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientAddress",
        "StudyID",
    )
)
_UID_LISTS: Final = frozenset({STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS})
_VALUE_LISTS: Final = frozenset({MODALITIES, MODALITY})

_STUDY_FIELDS: Final = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "RetrieveURL",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
_STUDY_EXTRA: Final = ("StudyDescription", "IssuerOfPatientID")
_PATIENT_ATTRIBUTES: Final = (  # the answer attribute of each of reading.PATIENT_FIELDS
    (PATIENT_ID, "patient_id"),
    (ISSUER, "issuer_of_patient_id"),
    (PATIENT_NAME, "patient_name"),
    (_tag("PatientBirthDate"), "birth_date"),
    (_tag("PatientSex"), "sex"),
)
_SERIES_FIELDS: Final = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "RetrieveURL",
    "StudyInstanceUID",
)
_INSTANCE_FIELDS: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "RetrieveURL",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SeriesInstanceUID",
    "StudyInstanceUID",
)
_DEFAULT_FIELDS: Final = frozenset(_tag(k) for k in (*_STUDY_FIELDS, *_SERIES_FIELDS, *_INSTANCE_FIELDS))


@dataclass(frozen=True, slots=True)
class QidoQuery:
    """A parsed QIDO-RS request (PS3.18 §8.3.4): matching keys, included fields, paging."""

    level: QueryLevel
    matches: dict[int, str]
    include: frozenset[int]
    include_all: bool
    limit: int
    offset: int
    fuzzy: bool
    study_uid: str | None = None  # from the path: /studies/{study}/series …
    series_uid: str | None = None
    warnings: tuple[str, ...] = ()

    def value(self, tag: int) -> str:
        """A matching key's value; empty (universal matching) when absent."""
        return self.matches.get(tag, "").strip()


@dataclass(frozen=True, slots=True)
class SearchResult:
    datasets: list[DicomJsonObject]
    more: bool  # further results exist past ``limit`` (PS3.18 §8.3.4.4: warn the client)
    warnings: tuple[str, ...] = ()


def _attribute(name: str) -> int:
    """A QIDO attribute id: a keyword or eight hex digits (PS3.18 §8.3.4.1)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        try:
            dictionary_VR(int(name, 16))
        except KeyError:
            raise InvalidRequest("unknown_attribute", f"{name} is not a DICOM attribute") from None
        return int(name, 16)
    found = tag_for_keyword(name)
    if found is None:
        raise InvalidRequest("unknown_attribute", f"{name[:64]} is not a DICOM attribute keyword")
    return int(found)


def _count(name: str, value: str, *, minimum: int, maximum: int) -> int:
    if not value.isdigit() or len(value) > 9:  # noqa: PLR2004  # fits any integer column
        raise InvalidRequest("invalid_query_parameter", f"{name} must be a whole number")
    number = int(value)
    if not minimum <= number <= maximum:
        raise InvalidRequest("invalid_query_parameter", f"{name} must be between {minimum} and {maximum}")
    return number


def parse_query(  # noqa: C901, PLR0912  # one branch per parameter of PS3.18 §8.3.4
    level: QueryLevel,
    parameters: Sequence[tuple[str, str]],
    *,
    max_results: int,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> QidoQuery:
    """Parse QIDO-RS query parameters; ``InvalidRequest`` (400) for anything malformed."""
    matches: dict[int, str] = {}
    include: set[int] = set()
    include_all = False
    limit, offset, fuzzy = max_results, 0, False
    ignored: list[str] = []
    for name, value in parameters:
        if name == "includefield":
            for item in (part.strip() for part in value.split(",")):
                if item == "all":
                    include_all = True
                elif item:
                    include.add(_attribute(item))
        elif name == "limit":
            limit = _count("limit", value, minimum=1, maximum=max_results)
        elif name == "offset":
            offset = _count("offset", value, minimum=0, maximum=10**9)
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise InvalidRequest("invalid_query_parameter", "fuzzymatching must be true or false")
            fuzzy = value == "true"
        elif "." in name:
            ignored.append(name[:64])  # sequence matching (PS3.18 §8.3.4.1): not supported
        else:
            tag = _attribute(name)
            if tag in matches:
                raise InvalidRequest("invalid_query_parameter", f"{name} is given more than once")
            matches[tag] = value
    supported = set(_STUDY_KEYS)
    if level is not QueryLevel.STUDY:
        supported |= _SERIES_KEYS
    if level is QueryLevel.INSTANCE:
        supported |= _INSTANCE_KEYS
    ignored.extend(
        keyword_for_tag(tag) or f"{tag:08X}"
        for tag in matches
        if tag not in supported and matches[tag].strip()
    )
    for tag in _UID_LISTS & matches.keys():
        for uid in _split(matches[tag]):
            if not _UID.match(uid):
                raise InvalidRequest("invalid_query_parameter", f"{keyword_for_tag(tag)} is not a UID list")
    warnings = (
        (f"the following attributes are not supported for matching: {', '.join(ignored)}",) if ignored else ()
    )
    return QidoQuery(
        level=level,
        matches=matches,
        include=frozenset(include),
        include_all=include_all,
        limit=limit,
        offset=offset,
        fuzzy=fuzzy,
        study_uid=study_uid,
        series_uid=series_uid,
        warnings=warnings,
    )


def _split(value: str) -> list[str]:
    """A list of values: comma (PS3.18 §8.3.4.1) or backslash (PS3.4 C.2.2.2.2) separated."""
    return [part.strip() for part in re.split(r"[,\\]", value) if part.strip()]


@dataclass(frozen=True, slots=True)
class DateRange:
    start: date | None
    end: date | None


def parse_date_range(value: str) -> DateRange:
    """A DA value or range (PS3.4 C.2.2.2.5): ``D``, ``D1-D2``, ``D1-``, ``-D2``."""
    first, dash, last = value.partition("-")

    def day(text: str) -> date | None:
        if not text:
            return None
        if not _DATE.match(text):
            raise InvalidRequest("invalid_query_parameter", "StudyDate must be YYYYMMDD or a range of them")
        try:
            return date(int(text[:4]), int(text[4:6]), int(text[6:]))
        except ValueError:
            raise InvalidRequest("invalid_query_parameter", "StudyDate is not a calendar date") from None

    start, end = day(first.strip()), day(last.strip())
    if not dash:
        return DateRange(start, start)
    if start is not None and end is not None and start > end:
        raise InvalidRequest("invalid_query_parameter", "the StudyDate range ends before it starts")
    return DateRange(start, end)


def modalities_include(codes: Sequence[str]) -> ColumnElement[bool]:
    """Studies whose ModalitiesInStudy holds one of ``codes`` (CS values, PS3.5 §6.2)."""
    for code in codes:
        if not _CODE.match(code):
            raise InvalidRequest("invalid_query_parameter", "a modality is 1-16 letters, digits, _ or space")
    padded = literal("\\") + Study.modalities + literal("\\")
    return or_(*(padded.like("%\\" + code.replace("_", "!_") + "\\%", escape="!") for code in codes))


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


@dataclass(frozen=True, slots=True)
class _Candidates:
    """The studies that PatientID, PatientName, StudyDate or AccessionNumber narrowed a
    search to: a condition on ``studies`` listing ``size`` values.
    """

    condition: ColumnElement[bool]
    size: int
    by_study_id: bool  # ``Study.id IN …`` (else ``Study.patient_ref IN …``)


@dataclass
class _Scope:
    """What a search knows once PHI keys are resolved: SQL conditions on ``studies``."""

    principal: Principal
    institution_id: str
    conditions: list[ColumnElement[bool]] = field(default_factory=list)  # besides the institution
    candidates: _Candidates | None = None
    empty: bool = False  # a PHI key matched nothing: no need to ask the main database

    def where(self) -> list[ColumnElement[bool]]:
        narrowed = [self.candidates.condition] if self.candidates is not None else []
        return [Study.institution_id == self.institution_id, *self.conditions, *narrowed]


class Searcher:
    """QIDO-RS searches for one runtime (``runtime.search``)."""

    def __init__(self, reader: ExamReader, *, max_date_range_days: int) -> None:
        self.reader = reader
        self.max_date_range_days = max_date_range_days

    # -- entry ----------------------------------------------------------------------------

    def search(
        self, principal: Principal, query: QidoQuery, *, context: RequestContext, base_url: str
    ) -> SearchResult:
        institution_id = reading_institution(principal)
        phi_ok = may_read_phi(principal, institution_id)
        refused = sorted(
            keyword_for_tag(tag) for tag in _PHI_ONLY if query.value(tag) and tag in query.matches
        )
        if refused and not phi_ok:
            raise InvalidRequest(
                "phi_query_not_permitted",
                f"matching on {', '.join(refused)} needs phi:read: they exist only as PHI",
            )
        reader = self.reader
        # The PHI database is only read here: a write transaction would take SQLite's write lock
        # in whichever order the two sessions are first used, and two requests taking the two
        # locks in opposite orders wait on each other until the busy timeout (bench/load.py).
        with reader.db.transaction() as session, reader.phi_db.read() as phi_session:
            if query.study_uid is not None:  # the path names a study (and series): 404 if unknown
                named = reader.study(session, principal, query.study_uid)
                if query.series_uid is not None:
                    reader.series(session, principal, named, query.series_uid)
            scope = self._study_scope(session, phi_session, principal, institution_id, query, phi_ok=phi_ok)
            if query.level is QueryLevel.STUDY:
                rows: list[tuple[Study, Series | None, Instance | None]] = [
                    (study, None, None) for study in self._studies(session, scope, query)
                ]
            elif query.level is QueryLevel.SERIES:
                rows = [(study, series, None) for study, series in self._series(session, scope, query)]
            else:
                rows = [
                    (study, series, instance)
                    for study, series, instance in self._instances(session, scope, query)
                ]
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            datasets = self._answer(session, phi_session, rows, query, phi_ok=phi_ok, base_url=base_url)
            reader.audit(session, principal, AuditAction.EXAM_SEARCH, None, context)
            if phi_ok and rows:
                reader.audit_phi(session, principal, (study.patient_ref for study, _, _ in rows), context)
        return SearchResult(datasets, more, query.warnings)

    # -- the study scope: PHI keys first, then the index ------------------------------------

    def _study_scope(
        self,
        session: Session,
        phi_session: Session,
        principal: Principal,
        institution_id: str,
        query: QidoQuery,
        *,
        phi_ok: bool,
    ) -> _Scope:
        scope = _Scope(principal, institution_id)
        study_uids = _split(query.study_uid or query.value(STUDY_UID))
        if study_uids:
            stored = self.reader.stored_uids(principal, institution_id, study_uids)
            scope.conditions.append(Study.study_instance_uid.in_(stored))
        else:
            scope.conditions.append(Study.archived_at.is_(None))
        modalities = _split(query.value(MODALITIES))
        if modalities:
            scope.conditions.append(modalities_include(modalities))
        if phi_ok:
            self._phi_scope(session, phi_session, institution_id, query, scope)
        else:
            self._pseudonym_scope(query, scope)
        return scope

    def _pseudonym_scope(self, query: QidoQuery, scope: _Scope) -> None:
        patient_id = query.value(PATIENT_ID)
        if patient_id and patient_id != "*":
            scope.candidates = _Candidates(Study.patient_ref == patient_id, 1, by_study_id=False)
        name = query.value(PATIENT_NAME)
        if name and name != "*":
            scope.conditions.append(
                func.lower(Study.patient_ref).like(_like_pattern(name.lower().rstrip("^")), escape="\\")
            )
        dates = query.value(STUDY_DATE)
        if dates:
            span = parse_date_range(dates)
            scope.conditions.append(Study.study_date != "")
            if span.start is not None:
                scope.conditions.append(Study.study_date >= span.start.strftime("%Y%m%d"))
            if span.end is not None:
                scope.conditions.append(Study.study_date <= span.end.strftime("%Y%m%d"))

    def _phi_scope(
        self, session: Session, phi_session: Session, institution_id: str, query: QidoQuery, scope: _Scope
    ) -> None:
        secret = self.reader.secrets.get(institution_id)
        patients = self._patients(session, phi_session, institution_id, secret, query)
        if patients is not None and not patients:
            scope.empty = True
            return
        study_filters = self._phi_study_filters(secret, query)
        if study_filters:
            phi_query = select(PhiStudy.id).where(PhiStudy.institution_id == institution_id, *study_filters)
            if patients is not None:
                studies: set[str] = set()
                for chunk in _chunks(sorted(patients)):
                    studies.update(phi_session.scalars(phi_query.where(PhiStudy.patient_id.in_(chunk))))
            else:
                studies = set(phi_session.scalars(phi_query.limit(MAX_CANDIDATES + 1)))
            if len(studies) > MAX_CANDIDATES:
                raise _too_broad()
            if not studies:
                scope.empty = True
                return
            scope.candidates = _Candidates(_in(Study.id, studies), len(studies), by_study_id=True)
        elif patients is not None:
            scope.candidates = _Candidates(_in(Study.patient_ref, patients), len(patients), by_study_id=False)

    def _phi_study_filters(self, secret: IngestSecret, query: QidoQuery) -> list[ColumnElement[bool]]:
        filters: list[ColumnElement[bool]] = []
        accession = query.value(ACCESSION)
        if accession and accession != "*":
            if "*" in accession or "?" in accession:
                raise InvalidRequest(
                    "unsupported_matching", "AccessionNumber matches exactly, without wildcards"
                )
            filters.append(PhiStudy.accession_number_index == secret.blind("accession", accession))
        dates = query.value(STUDY_DATE)
        if dates:
            days = self._days(parse_date_range(dates))
            filters.append(
                PhiStudy.study_date_index.in_(
                    [secret.blind("study-date", d.strftime("%Y%m%d")) for d in days]
                )
            )
        return filters

    def _patients(
        self,
        session: Session,
        phi_session: Session,
        institution_id: str,
        secret: IngestSecret,
        query: QidoQuery,
    ) -> set[str] | None:
        """Patients matching PatientID / PatientName (None: those keys do not restrict)."""
        found: set[str] | None = None
        patient_id = query.value(PATIENT_ID)
        if patient_id and patient_id != "*":
            if "*" in patient_id or "?" in patient_id:
                raise InvalidRequest("unsupported_matching", "PatientID matches exactly, without wildcards")
            issuer = query.value(ISSUER) if ISSUER in query.matches else None
            found = self.patients_with_id(phi_session, institution_id, patient_id, issuer=issuer)
        name = query.value(PATIENT_NAME)
        if len(name) > MAX_NAME_PATTERN or name.count("*") + name.count("?") > MAX_NAME_WILDCARDS:
            # Bounds the regular expression that checks candidates (no catastrophic backtracking).
            raise InvalidRequest(
                "invalid_query_parameter",
                f"a PatientName is at most {MAX_NAME_PATTERN} characters with {MAX_NAME_WILDCARDS} wildcards",
            )
        if name:
            try:
                plan = name_query(secret, name, fuzzy=query.fuzzy)
            except NamePatternTooBroad:
                raise InvalidRequest(
                    "query_too_broad",
                    "a PatientName pattern needs a literal prefix or at least three letters in a row",
                ) from None
            if not plan.matches_everyone:
                candidates = self._with_tokens(phi_session, institution_id, plan.tokens)
                if found is not None:
                    candidates &= found
                if plan.verify is not None and candidates:
                    if len(candidates) > MAX_CANDIDATES_TO_VERIFY:
                        raise _too_broad()
                    names = self.reader.patient_names(session, phi_session, institution_id, candidates)
                    candidates = {ref for ref, value in names.items() if plan.accepts(value)}
                found = candidates
        return found

    def patients_with_id(
        self, phi_session: Session, institution_id: str, patient_id: str, *, issuer: str | None = None
    ) -> set[str]:
        """The institution's patients with this PatientID (under ``issuer``, or any issuer
        when None: PS3.18 §10.6.1.2.3), by blind index.
        """
        secret = self.reader.secrets.get(institution_id)
        if issuer is None:
            return self._with_tokens(phi_session, institution_id, {patient_id_token(secret, patient_id)})
        record = PhiRecord(patient_id=patient_id, issuer_of_patient_id=issuer)
        return set(
            phi_session.scalars(
                select(PhiPatient.id).where(
                    PhiPatient.institution_id == institution_id,
                    PhiPatient.patient_id_index == patient_index(secret, record, ""),
                )
            )
        )

    def _with_tokens(self, phi_session: Session, institution_id: str, tokens: Iterable[str]) -> set[str]:
        wanted = sorted(set(tokens))
        query = (
            select(PhiPatientToken.patient_id)
            .where(PhiPatientToken.institution_id == institution_id, PhiPatientToken.token.in_(wanted))
            .group_by(PhiPatientToken.patient_id)
            .having(func.count(PhiPatientToken.token) == len(wanted))
            .limit(MAX_CANDIDATES + 1)
        )
        found = set(phi_session.scalars(query))
        if len(found) > MAX_CANDIDATES:
            raise _too_broad()
        return found

    def _days(self, span: DateRange) -> list[date]:
        today = self.reader.clock.now().date()
        if span.start is None:
            raise InvalidRequest(
                "date_range_too_wide",
                "a StudyDate range needs a start date (the PHI index is searched by day)",
            )
        end = span.end or today
        count = (end - span.start).days + 1
        if count > self.max_date_range_days:
            raise InvalidRequest(
                "date_range_too_wide", f"a StudyDate range may span at most {self.max_date_range_days} days"
            )
        return [span.start + timedelta(days=n) for n in range(max(count, 0))]

    # -- the index ------------------------------------------------------------------------

    def _studies(self, session: Session, scope: _Scope, query: QidoQuery) -> list[Study]:
        if scope.empty:
            return []
        if scope.candidates is not None and scope.candidates.size <= MAX_CANDIDATES_ORDERED_HERE:
            return self._few_studies(session, scope, scope.candidates, query)
        statement = select(Study).where(*scope.where()).order_by(Study.created_at.desc(), Study.id)
        return list(session.scalars(statement.offset(query.offset).limit(query.limit + 1)))

    def _few_studies(
        self, session: Session, scope: _Scope, candidates: _Candidates, query: QidoQuery
    ) -> list[Study]:
        """The page of a search narrowed to a few candidates: their keys are read by primary
        key (or patient), ordered and paged here, then the page's rows are read.

        Asked for the ordered page at once, the databases walk the institution's studies
        newest first (``ix_studies_institution_created``) testing each against the
        candidate list: for a seven-day range of 100 000 studies, some 14 000 rows to find
        26. SQLite (no planner statistics) even prefers that index for ``id IN …`` unless
        the institution term is left out, so that term is checked on the rows instead.
        """
        conditions = [*scope.conditions, candidates.condition]
        if not candidates.by_study_id:
            conditions.append(Study.institution_id == scope.institution_id)  # ix_studies_institution_patient
        statement = select(Study.id, Study.created_at, Study.institution_id).where(*conditions)
        keys = [
            (row.id, row.created_at)
            for row in session.execute(statement)
            if row.institution_id == scope.institution_id
        ]
        # ORDER BY created_at DESC, id: two stable sorts. UUIDs sort alike bytewise and in
        # any collation (same length, hyphens in the same places, digits before letters).
        keys.sort(key=lambda key: key[0])
        keys.sort(key=lambda key: key[1], reverse=True)
        page = [study_id for study_id, _ in keys[query.offset : query.offset + query.limit + 1]]
        if not page:
            return []
        found = {study.id: study for study in session.scalars(select(Study).where(Study.id.in_(page)))}
        return [found[study_id] for study_id in page if study_id in found]

    def _series_conditions(self, query: QidoQuery, principal_uids: list[str]) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if principal_uids:
            conditions.append(Series.series_instance_uid.in_(principal_uids))
        modalities = _split(query.value(MODALITY))
        if modalities:
            conditions.append(Series.modality.in_(modalities))
        number = query.value(SERIES_NUMBER)
        if number:
            conditions.append(
                Series.series_number == _count("SeriesNumber", number, minimum=0, maximum=10**9)
            )
        return conditions

    def _series(self, session: Session, scope: _Scope, query: QidoQuery) -> list[tuple[Study, Series]]:
        if scope.empty:
            return []
        uids = self._uids(scope, query.series_uid or query.value(SERIES_UID))
        statement = (
            select(Study, Series)
            .join(Series, Series.study_id == Study.id)
            .where(*scope.where(), *self._series_conditions(query, uids))
            .order_by(Study.created_at.desc(), Study.id, Series.series_number, Series.id)
            .offset(query.offset)
            .limit(query.limit + 1)
        )
        return [(row[0], row[1]) for row in session.execute(statement)]

    def _instances(
        self, session: Session, scope: _Scope, query: QidoQuery
    ) -> list[tuple[Study, Series, Instance]]:
        if scope.empty:
            return []
        conditions = self._series_conditions(
            query, self._uids(scope, query.series_uid or query.value(SERIES_UID))
        )
        sop_uids = self._uids(scope, query.value(SOP_UID))
        if sop_uids:
            conditions.append(Instance.sop_instance_uid.in_(sop_uids))
        classes = _split(query.value(SOP_CLASS))
        if classes:
            conditions.append(Instance.sop_class_uid.in_(classes))
        number = query.value(INSTANCE_NUMBER)
        if number:
            conditions.append(
                Instance.instance_number == _count("InstanceNumber", number, minimum=0, maximum=10**9)
            )
        statement = (
            select(Study, Series, Instance)
            .join(Series, Series.study_id == Study.id)
            .join(Instance, Instance.series_id == Series.id)
            .where(*scope.where(), *conditions)
            .order_by(
                Study.created_at.desc(),
                Study.id,
                Series.series_number,
                Series.id,
                Instance.instance_number,
                Instance.id,
            )
            .offset(query.offset)
            .limit(query.limit + 1)
        )
        return [(row[0], row[1], row[2]) for row in session.execute(statement)]

    def _uids(self, scope: _Scope, value: str) -> list[str]:
        uids = _split(value)
        return self.reader.stored_uids(scope.principal, scope.institution_id, uids) if uids else []

    # -- answers --------------------------------------------------------------------------

    def _answer(
        self,
        session: Session,
        phi_session: Session,
        rows: list[tuple[Study, Series | None, Instance | None]],
        query: QidoQuery,
        *,
        phi_ok: bool,
        base_url: str,
    ) -> list[DicomJsonObject]:
        with_study = query.level is QueryLevel.STUDY or query.study_uid is None
        answers = _Answers(
            self.reader,
            session,
            phi_session,
            rows,
            phi_ok=phi_ok,
            patient_fields=_patient_fields(query) if with_study else (),
        )
        datasets = []
        for study, series, instance in rows:
            dataset = DicomJsonObject()
            study_uid = answers.study_uid(study)
            study_url = f"{base_url}/dicomweb/studies/{study_uid}"
            if with_study:
                answers.study(dataset, study)
            if series is not None:
                series_uid = answers.series_uid(series)
                series_url = f"{study_url}/series/{series_uid}"
                answers.series(dataset, series)
                if instance is not None:
                    answers.instance(dataset, instance)
                    sop = answers.instance_phi(instance)
                    sop_uid = sop.uids.sop_instance_uid if sop is not None else instance.sop_instance_uid
                    dataset.set("RetrieveURL", f"{series_url}/instances/{sop_uid}")
                else:
                    dataset.set("RetrieveURL", series_url)
            else:
                dataset.set("RetrieveURL", study_url)
            dataset.set("StudyInstanceUID", study_uid)
            datasets.append(_filtered(dataset, query))
        return datasets


def _kept(query: QidoQuery) -> frozenset[int] | None:
    """The attributes an answer keeps (PS3.18 §10.6.3.3): default fields, matching keys and
    includefield; None: all of them (``includefield=all``).
    """
    if query.include_all:
        return None
    return _DEFAULT_FIELDS | query.matches.keys() | query.include


def _filtered(dataset: DicomJsonObject, query: QidoQuery) -> DicomJsonObject:
    kept = _kept(query)
    if kept is not None:
        dataset.keep(set(kept))
    return dataset


def _patient_fields(query: QidoQuery) -> tuple[str, ...]:
    """The patient PHI fields a study answer keeps: only those are decrypted."""
    kept = _kept(query)
    return tuple(name for tag, name in _PATIENT_ATTRIBUTES if kept is None or tag in kept)


def _in(column: InstrumentedAttribute[str], values: Iterable[str]) -> ColumnElement[bool]:
    ordered = sorted(set(values))
    return or_(*(column.in_(chunk) for chunk in _chunks(ordered))) if ordered else and_(literal(False))


def _chunks(values: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def _too_broad() -> InvalidRequest:
    return InvalidRequest(
        "query_too_broad", f"the query matches more than {MAX_CANDIDATES} candidates; narrow it down"
    )


class _Answers:
    """Builds answer data sets from the index rows and, for PHI readers, their PHI: opened
    up front for the whole page in one batch (``ExamReader.phi_of``).
    """

    def __init__(
        self,
        reader: ExamReader,
        session: Session,
        phi_session: Session,
        rows: list[tuple[Study, Series | None, Instance | None]],
        *,
        phi_ok: bool,
        patient_fields: Sequence[str],
    ) -> None:
        self.phi_ok = phi_ok
        self._series_docs: dict[str, InstancePhi] = {}
        self._phi = PhiBatch()
        if not phi_ok or not rows:
            return
        studies = list({study.id: study for study, _, _ in rows}.values())
        wanted: dict[str, tuple[Study, str]] = {}
        for study, _, instance in rows:
            if instance is not None:
                wanted[instance.id] = (study, instance.id)
        series_ids = sorted({series.id for _, series, _ in rows if series is not None})
        first_instance: dict[str, str] = {}
        if series_ids:
            # One instance of each series names its original Series Instance UID.
            found = session.execute(
                select(Instance.series_id, func.min(Instance.id))
                .where(Instance.series_id.in_(series_ids))
                .group_by(Instance.series_id)
            ).all()
            first_instance = {str(series_id): str(instance_id) for series_id, instance_id in found}
            by_series = {series.id: study for study, series, _ in rows if series is not None}
            for series_id, instance_id in first_instance.items():
                wanted.setdefault(instance_id, (by_series[series_id], instance_id))
        self._phi = reader.phi_of(
            session, phi_session, studies, list(wanted.values()), patient_fields=patient_fields
        )
        for series_id, instance_id in first_instance.items():
            document = self._phi.instances.get(instance_id)
            if document is not None:
                self._series_docs[series_id] = document

    def study_uid(self, study: Study) -> str:
        if not self.phi_ok:
            return study.study_instance_uid
        return self._phi.study(study.id).study_instance_uid or study.study_instance_uid

    def study(self, dataset: DicomJsonObject, study: Study) -> None:
        dataset.set("InstanceAvailability", "ONLINE")
        dataset.set("ModalitiesInStudy", [m for m in study.modalities.split("\\") if m] or None)
        dataset.set("NumberOfStudyRelatedSeries", study.number_of_series)
        dataset.set("NumberOfStudyRelatedInstances", study.number_of_instances)
        if self.phi_ok:
            view, patient = self._phi.study(study.id), self._phi.patient(study.patient_ref)
            dataset.set("StudyDate", view.study_date or None)
            dataset.set("StudyTime", view.study_time or None)
            dataset.set("AccessionNumber", view.accession_number or None)
            dataset.set("ReferringPhysicianName", view.referring_physician_name or None)
            dataset.set("StudyID", view.study_id or None)
            dataset.set("StudyDescription", view.study_description or None)
            dataset.set("PatientName", patient.patient_name or None)
            dataset.set("PatientID", patient.patient_id or None)
            dataset.set("IssuerOfPatientID", patient.issuer_of_patient_id or None)
            dataset.set("PatientBirthDate", patient.birth_date or None)
            dataset.set("PatientSex", patient.sex or None)
            return
        dataset.set("StudyDate", study.study_date or None)
        dataset.set("StudyTime", study.study_time or None)
        dataset.set("AccessionNumber", None)
        dataset.set("ReferringPhysicianName", None)
        dataset.set("StudyID", None)
        dataset.set("StudyDescription", study.study_description or None)
        dataset.set("PatientName", study.patient_ref)  # the pseudonym, as in the stored instances
        dataset.set("PatientID", study.patient_ref)
        dataset.set("PatientBirthDate", None)
        dataset.set("PatientSex", None)

    def _series_doc(self, series: Series) -> InstancePhi | None:
        return self._series_docs.get(series.id)

    def series_uid(self, series: Series) -> str:
        doc = self._series_doc(series)
        return doc.uids.series_instance_uid if doc is not None else series.series_instance_uid

    def series(self, dataset: DicomJsonObject, series: Series) -> None:
        dataset.set("SeriesInstanceUID", self.series_uid(series))
        dataset.set("Modality", series.modality or None)
        dataset.set("SeriesNumber", series.series_number)
        dataset.set("NumberOfSeriesRelatedInstances", series.number_of_instances)
        description = series.series_description
        doc = self._series_doc(series)
        if doc is not None:
            description = dict(doc.phi.other).get(_SERIES_DESCRIPTION_PATH, description)
        dataset.set("SeriesDescription", description or None)

    def instance_phi(self, instance: Instance) -> InstancePhi | None:
        return self._phi.instances.get(instance.id) if self.phi_ok else None

    def instance(self, dataset: DicomJsonObject, instance: Instance) -> None:
        doc = self.instance_phi(instance)
        dataset.set("SOPClassUID", instance.sop_class_uid)
        dataset.set(
            "SOPInstanceUID", doc.uids.sop_instance_uid if doc is not None else instance.sop_instance_uid
        )
        dataset.set("InstanceAvailability", "ONLINE")
        dataset.set("InstanceNumber", instance.instance_number)
        dataset.set("Rows", instance.rows)
        dataset.set("Columns", instance.columns)
        dataset.set("NumberOfFrames", instance.number_of_frames)
