"""``GET /api/v1/audit/export``: ``audit:export`` required, scoped to the caller's institution
(a principal outside any institution sees only platform records), streamed in the three
formats, bad parameters as 422 problems, and every export audited with the request's context.

Sign-in itself belongs to the accounts tests: here the signed-in principal is supplied by
overriding the ``CurrentPrincipal`` dependency, so ``require(Permission.AUDIT_EXPORT)`` and the
route's scoping still run for real.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from sqlalchemy import select

from phivault.accounts.permissions import Permission, Role
from phivault.accounts.principal import Principal
from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.export import SD_ID, parse_jsonl_line
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject, Target, record
from phivault.http import deps
from phivault.runtime import Runtime
from phivault.web.app import create_app
from servers.rsyslog import parse_syslog

AUDITOR_A = Principal.for_user("auditor-a", "inst-a", Role.AUDITOR, None)
CLINICIAN_A = Principal.for_user("clinician-a", "inst-a", Role.CLINICIAN, None)
# An operator holding audit:export (the role may or may not grant it; scoping must hold anyway).
OPERATOR = Principal(
    Actor(ActorType.USER, "operator-1"), None, Role.OPERATOR, frozenset({Permission.AUDIT_EXPORT}), None
)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), base_url="https://testserver") as test_client:
        yield test_client


def _sign_in(client: TestClient, principal: Principal) -> None:
    client.app.dependency_overrides[deps._authenticated_principal] = lambda: principal  # type: ignore[attr-defined]


def _populate(runtime: Runtime) -> dict[str | None, list[str]]:
    written: dict[str | None, list[str]] = {"inst-a": [], "inst-b": [], None: []}
    with runtime.db.transaction() as session:
        for institution in ("inst-a", "inst-b", None, "inst-a"):
            subject = SystemSubject(Actor(ActorType.USER, f"writer-{institution}"), institution)
            written[institution].append(
                record(
                    session,
                    AuditAction.AUDIT_READ,
                    subject,
                    Target("exam", "e1"),
                    Outcome.SUCCESS,
                    now=runtime.clock.now(),
                )
            )
    while runtime.audit.integrate_pending(runtime.clock.now()):
        pass
    return written


def test_auditor_exports_only_own_institution_and_the_export_is_audited(
    runtime: Runtime, client: TestClient
) -> None:
    written = _populate(runtime)
    _sign_in(client, AUDITOR_A)
    response = client.get(
        "/api/v1/audit/export", params={"format": "jsonl"}, headers={"user-agent": "siem-pull"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jsonl")
    records = [parse_jsonl_line(line) for line in response.content.splitlines()]
    assert [item.fields.id for item in records] == written["inst-a"]
    with runtime.db.transaction() as session:
        exports = session.scalars(
            select(AuditRecord).where(AuditRecord.action == AuditAction.AUDIT_EXPORT.value)
        ).all()
    assert [(row.actor_id, row.institution_id, row.user_agent) for row in exports] == [
        ("auditor-a", "inst-a", "siem-pull")
    ]
    assert exports[0].ip is not None


def test_principal_outside_any_institution_exports_platform_records_only(
    runtime: Runtime, client: TestClient
) -> None:
    written = _populate(runtime)
    _sign_in(client, OPERATOR)
    response = client.get("/api/v1/audit/export", params={"format": "syslog"})
    assert response.status_code == 200
    messages = [parse_syslog(line) for line in response.text.splitlines()]
    ids = [message.structured_data[SD_ID]["id"] for message in messages]
    assert set(written[None]) <= set(ids)
    assert not set(ids) & set(written["inst-a"] + written["inst-b"])
    assert all("institution" not in message.structured_data[SD_ID] for message in messages)


def test_fhir_export_over_http_is_a_valid_bundle(runtime: Runtime, client: TestClient) -> None:
    written = _populate(runtime)
    _sign_in(client, AUDITOR_A)
    response = client.get("/api/v1/audit/export", params={"format": "fhir", "since": "2000-01-01T00:00:00"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate_json(response.content)
    assert bundle.entry is not None
    assert [entry.resource.id for entry in bundle.entry if entry.resource] == written["inst-a"]


def test_without_audit_export_permission_is_403_and_nothing_is_exported(
    runtime: Runtime, client: TestClient
) -> None:
    _populate(runtime)
    _sign_in(client, CLINICIAN_A)
    response = client.get("/api/v1/audit/export")
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")
    with runtime.db.transaction() as session:
        assert (
            session.scalars(
                select(AuditRecord).where(AuditRecord.action == AuditAction.AUDIT_EXPORT.value)
            ).all()
            == []
        )


def test_without_sign_in_is_401(client: TestClient) -> None:
    response = client.get("/api/v1/audit/export")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    "params",
    [{"format": "xml"}, {"since": "last tuesday"}, {"action": "a" * 65}],
)
def test_bad_parameters_are_422_problems(client: TestClient, params: dict[str, str]) -> None:
    _sign_in(client, AUDITOR_A)
    response = client.get("/api/v1/audit/export", params=params)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
