"""RFC 9457 problem details: the one error shape of every HTTP response.

Each problem carries a stable machine-readable ``code``; clients branch on it, not on
``title`` or ``detail``. Details never quote request bodies (they may hold PHI).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from phivault.accounts.errors import AccountsError
from phivault.crypto.errors import KeyIntegrityError, KeyNotFound, KeyShredded, ObjectIntegrityError
from phivault.devices.errors import DevicesError
from phivault.dicom.errors import DicomRejected
from phivault.exams.errors import InvalidRequest, NotFound, QuarantineResolved, QuotaExceeded
from phivault.storage.errors import ObjectNotFound, StorageFull, StorageUnavailable

log = logging.getLogger(__name__)

ExceptionHandler = Callable[[Request, Exception], Awaitable[JSONResponse]]

PROBLEM_JSON = "application/problem+json"

_CODES_BY_STATUS: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
    507: "storage_full",
}


class Problem(Exception):
    """Raise to answer with a problem; ``code`` is the stable identifier clients match on."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extensions: Any,  # noqa: ANN401
    ) -> None:
        super().__init__(detail or code)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extensions = extensions


# Statuses of protocols phivault speaks that the IANA registry does not list.
_EXTRA_TITLES = {460: "Checksum Mismatch"}  # tus 1.0 checksum extension


def _title(status: int) -> str:
    return _EXTRA_TITLES.get(status) or HTTPStatus(status).phrase


def problem_response(problem: Problem) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": _title(problem.status),
        "status": problem.status,
        "code": problem.code,
    }
    if problem.detail:
        body["detail"] = problem.detail
    body.update(problem.extensions)
    return JSONResponse(body, status_code=problem.status, headers=problem.headers, media_type=PROBLEM_JSON)


async def _on_problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)  # noqa: S101  # nosec B101  # registered for Problem only
    return problem_response(exc)


async def _on_http_exception(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101  # nosec B101  # registered for it only
    code = _CODES_BY_STATUS.get(exc.status_code, "http_error")
    phrase = HTTPStatus(exc.status_code).phrase
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None
    return problem_response(Problem(exc.status_code, code, detail, headers=dict(exc.headers or {})))


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # noqa: S101  # nosec B101  # registered for it only
    # "input" is left out on purpose: it may be PHI or a password.
    errors = [
        {
            "loc": [str(part) for part in error.get("loc", ())],
            "msg": error.get("msg", ""),
            "type": error.get("type", ""),
        }
        for error in exc.errors()
    ]
    if any(error["type"] == "json_invalid" for error in errors):
        return problem_response(Problem(400, "malformed_body", "the request body is not valid JSON"))
    return problem_response(Problem(422, "validation_error", "the request is invalid", errors=errors))


async def _on_database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", type(exc).__name__)
    return problem_response(
        Problem(503, "database_unavailable", "the database is unavailable; retry later", headers=_RETRY)
    )


async def _on_storage_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("object store unavailable: %s", type(exc).__name__)
    return problem_response(
        Problem(
            503, "object_store_unavailable", "the object store is unavailable; retry later", headers=_RETRY
        )
    )


async def _on_storage_full(_request: Request, _exc: Exception) -> JSONResponse:
    log.error("object store is full")
    return problem_response(Problem(507, "storage_full", "the object store has no space left"))


async def _on_object_missing(_request: Request, _exc: Exception) -> JSONResponse:
    return problem_response(Problem(404, "not_found"))


async def _on_shredded(_request: Request, _exc: Exception) -> JSONResponse:
    # 410 Gone (RFC 9110 §15.5.11): the data existed and is permanently unavailable.
    return problem_response(Problem(410, "shredded", "this data was permanently destroyed"))


async def _on_integrity_failure(_request: Request, exc: Exception) -> JSONResponse:
    # The crypto layer already raised the security alert (log + audit event). 409, not 5xx:
    # the stored state of this one resource stops it from being served (RFC 9110 §15.5.10);
    # retrying cannot help and the service itself is healthy. Nothing unauthenticated and
    # no detail of what failed is returned (no oracle).
    log.warning("refused to serve data that failed its integrity check: %s", type(exc).__name__)
    return problem_response(
        Problem(409, "integrity_check_failed", "stored data failed its integrity check; it was not returned")
    )


async def _on_key_missing(_request: Request, _exc: Exception) -> JSONResponse:
    return problem_response(Problem(404, "not_found"))


async def _on_accounts_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AccountsError)  # noqa: S101  # nosec B101  # registered for it only
    problem = Problem(exc.status, exc.code, exc.detail, headers=dict(exc.headers), **exc.extensions)
    return problem_response(problem)


async def _on_quota(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QuotaExceeded)  # noqa: S101  # nosec B101  # registered for it only
    return problem_response(
        Problem(
            413,
            "quota_exceeded",
            f"the {exc.scope} storage quota of {exc.limit} bytes would be exceeded",
            quota=exc.scope,
            limit=exc.limit,
            used=exc.used,
        )
    )


async def _on_exams_not_found(_request: Request, _exc: Exception) -> JSONResponse:
    return problem_response(Problem(404, "not_found"))


async def _on_invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidRequest)  # noqa: S101  # nosec B101  # registered for it only
    return problem_response(Problem(400, exc.code, exc.detail))


async def _on_quarantine_resolved(_request: Request, _exc: Exception) -> JSONResponse:
    return problem_response(
        Problem(409, "quarantine_resolved", "the instance was released or rejected meanwhile")
    )


async def _on_dicom_rejected(_request: Request, exc: Exception) -> JSONResponse:
    # One instance refused where the API carries one (an upload's finalize); STOW-RS answers
    # per instance in its response dataset instead. The reason names a rule, never a value.
    assert isinstance(exc, DicomRejected)  # noqa: S101  # nosec B101  # registered for it only
    return problem_response(Problem(422, exc.code.value, exc.reason))


async def _on_devices_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DevicesError)  # noqa: S101  # nosec B101  # registered for it only
    problem = Problem(exc.status, exc.code, exc.detail, headers=dict(exc.headers), **exc.extensions)
    return problem_response(problem)


async def _on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    # Logged by type only: exception messages can quote data.
    log.error("unhandled %s", type(exc).__name__)
    return problem_response(Problem(500, "internal_error"))


_RETRY = {"Retry-After": "5"}
_HANDLERS: tuple[tuple[type[Exception], ExceptionHandler], ...] = (
    (Problem, _on_problem),
    (StarletteHTTPException, _on_http_exception),
    (RequestValidationError, _on_validation_error),
    (OperationalError, _on_database_unavailable),
    (InterfaceError, _on_database_unavailable),
    (PoolTimeoutError, _on_database_unavailable),
    (StorageUnavailable, _on_storage_unavailable),
    (StorageFull, _on_storage_full),
    (ObjectNotFound, _on_object_missing),
    (KeyShredded, _on_shredded),
    (ObjectIntegrityError, _on_integrity_failure),
    (KeyIntegrityError, _on_integrity_failure),
    (KeyNotFound, _on_key_missing),
    (AccountsError, _on_accounts_error),
    (DevicesError, _on_devices_error),
    (QuotaExceeded, _on_quota),
    (NotFound, _on_exams_not_found),
    (InvalidRequest, _on_invalid_request),
    (QuarantineResolved, _on_quarantine_resolved),
    (DicomRejected, _on_dicom_rejected),
    (Exception, _on_unexpected),
)


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details; `code` is stable, branch on it.",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "code": {"type": "string"},
        "detail": {"type": "string"},
    },
    "required": ["type", "title", "status", "code"],
    "additionalProperties": True,
}


def document_problems(schema: dict[str, Any]) -> dict[str, Any]:
    """Make an OpenAPI document say what the handlers above do: every error is a problem.

    FastAPI documents its own 422 body as ``application/json``; phivault answers
    ``application/problem+json``, so the document is corrected in one place, and every
    operation declares the client (4XX) and unavailability (503) problems it can return.
    """
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)

    def problem(description: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }

    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = problem("the request is invalid (`validation_error`)")
            responses.setdefault("4XX", problem("a client error"))
            responses.setdefault("503", problem("a dependency is unavailable; retry later"))
            for response in responses.values():
                content = response.get("content", {})
                if PROBLEM_JSON not in content and "application/json" not in content:
                    continue
                if response.get("description", "").startswith("a dependency"):
                    response["content"] = problem("")["content"]
    return schema


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error path through ``problem_response``."""
    for exc_type, handler in _HANDLERS:
        app.add_exception_handler(exc_type, handler)
