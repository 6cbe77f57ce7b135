"""QIDO-RS routes (PS3.18 §10.6): search for studies, series and instances.

Thin: parse the query, call ``runtime.search`` (``exams.search``), answer PS3.18 Annex F
JSON. Who sees PHI and how PHI keys match: ``exams/search.py`` and docs/exams.md.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse

from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.service import RequestContext
from phivault.dicom.accept import best_single, parse_accept
from phivault.exams.search import QueryLevel, parse_query
from phivault.http.deps import RequestContextDep, RuntimeDep, require
from phivault.http.problems import Problem
from phivault.runtime import Runtime

DICOM_JSON: Final = "application/dicom+json"
UID_PATTERN: Final = r"^[0-9]+(\.[0-9]+)*$"

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

Reader = Annotated[Principal, Depends(require(Permission.EXAM_READ))]
StudyUid = Annotated[str, Path(min_length=1, max_length=64, pattern=UID_PATTERN)]
SeriesUid = Annotated[str, Path(min_length=1, max_length=64, pattern=UID_PATTERN)]

_QUERY_DOC: Final = (
    "Query keys by keyword or tag (`PatientID=…`, `00100020=…`), `includefield`, `limit`, "
    "`offset`, `fuzzymatching`. PHI keys and PHI in answers only with `phi:read` (docs/exams.md)."
)
_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": "the matching objects (possibly none), PS3.18 Annex F DICOM JSON",
        "content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
    },
}


def _search(
    request: Request,
    principal: Principal,
    runtime: Runtime,
    context: RequestContext,
    level: QueryLevel,
    *,
    study: str | None = None,
    series: str | None = None,
) -> Response:
    chosen = best_single(parse_accept(request.headers.get("accept")), (DICOM_JSON, "application/json"))
    if chosen is None:
        raise Problem(406, "not_acceptable", "QIDO-RS answers application/dicom+json")
    query = parse_query(
        level,
        list(request.query_params.multi_items()),
        max_results=runtime.settings.qido_max_results,
        study_uid=study,
        series_uid=series,
    )
    result = runtime.search.search(
        principal, query, context=context, base_url=runtime.settings.public_url.rstrip("/")
    )
    warnings = [*result.warnings]
    if result.more:
        warnings.append("there are more results: ask again with a higher offset")  # PS3.18 §8.3.4.4
    headers = {"Warning": ", ".join(f'299 phivault "{text}"' for text in warnings)} if warnings else {}
    return JSONResponse(
        [dataset.to_json() for dataset in result.datasets], media_type=chosen, headers=headers
    )


@router.get("/studies", summary="Search for studies (QIDO-RS)", description=_QUERY_DOC, responses=_RESPONSES)
def search_studies(
    request: Request, principal: Reader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    return _search(request, principal, runtime, context, QueryLevel.STUDY)


@router.get("/series", summary="Search for series (QIDO-RS)", description=_QUERY_DOC, responses=_RESPONSES)
def search_series(
    request: Request, principal: Reader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    return _search(request, principal, runtime, context, QueryLevel.SERIES)


@router.get(
    "/instances", summary="Search for instances (QIDO-RS)", description=_QUERY_DOC, responses=_RESPONSES
)
def search_instances(
    request: Request, principal: Reader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    return _search(request, principal, runtime, context, QueryLevel.INSTANCE)


@router.get(
    "/studies/{study}/series",
    summary="Search for a study's series (QIDO-RS)",
    description=_QUERY_DOC,
    responses=_RESPONSES,
)
def search_study_series(
    study: StudyUid, request: Request, principal: Reader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    return _search(request, principal, runtime, context, QueryLevel.SERIES, study=study)


@router.get(
    "/studies/{study}/instances",
    summary="Search for a study's instances (QIDO-RS)",
    description=_QUERY_DOC,
    responses=_RESPONSES,
)
def search_study_instances(
    study: StudyUid, request: Request, principal: Reader, runtime: RuntimeDep, context: RequestContextDep
) -> Response:
    return _search(request, principal, runtime, context, QueryLevel.INSTANCE, study=study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="Search for a series' instances (QIDO-RS)",
    description=_QUERY_DOC,
    responses=_RESPONSES,
)
def search_series_instances(
    study: StudyUid,
    series: SeriesUid,
    request: Request,
    principal: Reader,
    runtime: RuntimeDep,
    context: RequestContextDep,
) -> Response:
    return _search(request, principal, runtime, context, QueryLevel.INSTANCE, study=study, series=series)
