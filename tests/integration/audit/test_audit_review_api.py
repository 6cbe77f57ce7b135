"""``GET /api/v1/audit/events``: review of the log by institution admins and auditors (their
institution only) and operators (platform records only), newest first, filtered, paginated
with an opaque cursor, malformed filters answered 400, and every read itself audited.

As in the export tests, the signed-in principal is supplied by overriding the
``CurrentPrincipal`` dependency; ``require(Permission.AUDIT_READ)`` and the scoping run for real.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from phivault.accounts.permissions import Permission, Role
from phivault.accounts.principal import Principal
from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.models import AuditRecord
from phivault.audit.service import Actor, SystemSubject, Target, record
from phivault.clock import ManualClock
from phivault.http import deps
from phivault.runtime import Runtime
from phivault.web.app import create_app

ADMIN_A = Principal.for_user("admin-a", "inst-a", Role.INSTITUTION_ADMIN, None)
AUDITOR_B = Principal.for_user("auditor-b", "inst-b", Role.AUDITOR, None)
CLINICIAN_A = Principal.for_user("clinician-a", "inst-a", Role.CLINICIAN, None)
OPERATOR = Principal(
    Actor(ActorType.USER, "operator-1"), None, Role.OPERATOR, frozenset({Permission.AUDIT_READ}), None
)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), base_url="https://testserver") as test_client:
        yield test_client


def _sign_in(client: TestClient, principal: Principal) -> None:
    client.app.dependency_overrides[deps._authenticated_principal] = lambda: principal  # type: ignore[attr-defined]


def _write(runtime: Runtime, clock: ManualClock) -> dict[str | None, list[str]]:
    """Five records for inst-a (one a failure), two for inst-b, one platform record."""
    written: dict[str | None, list[str]] = {"inst-a": [], "inst-b": [], None: []}
    a: str | None = "inst-a"
    b: str | None = "inst-b"
    plan = [(a, "exam-1", Outcome.SUCCESS)] * 4 + [(a, "exam-2", Outcome.FAILURE)]
    plan += [(b, "exam-9", Outcome.SUCCESS)] * 2 + [(None, "key-1", Outcome.SUCCESS)]
    for institution, object_id, outcome in plan:
        clock.advance(timedelta(seconds=1))
        with runtime.db.transaction() as session:
            subject = SystemSubject(Actor(ActorType.USER, f"user-{institution}"), institution)
            written[institution].append(
                record(
                    session,
                    AuditAction.KEY_ROTATE,
                    subject,
                    Target("exam", object_id),
                    outcome,
                    now=clock.now(),
                )
            )
    return written


def test_an_admin_pages_through_own_institution_newest_first(
    runtime: Runtime, clock: ManualClock, client: TestClient
) -> None:
    written = _write(runtime, clock)
    _sign_in(client, ADMIN_A)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, str] = {"limit": "2", "action": "key.rotate"} | (
            {"cursor": cursor} if cursor else {}
        )
        page = client.get("/api/v1/audit/events", params=params).json()
        seen += [event["id"] for event in page["events"]]
        assert all(event["institution_id"] == "inst-a" for event in page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(written["inst-a"]))


def test_filters_narrow_the_page(runtime: Runtime, clock: ManualClock, client: TestClient) -> None:
    written = _write(runtime, clock)
    _sign_in(client, ADMIN_A)
    failures = client.get("/api/v1/audit/events", params={"outcome": "failure"}).json()["events"]
    assert [event["id"] for event in failures] == [written["inst-a"][-1]]
    by_object = client.get(
        "/api/v1/audit/events", params={"object_type": "exam", "object_id": "exam-1"}
    ).json()
    assert len(by_object["events"]) == 4


def test_other_tenants_and_platform_records_stay_invisible(
    runtime: Runtime, clock: ManualClock, client: TestClient
) -> None:
    written = _write(runtime, clock)
    _sign_in(client, AUDITOR_B)
    ids = {
        event["id"]
        for event in client.get("/api/v1/audit/events", params={"action": "key.rotate"}).json()["events"]
    }
    assert ids == set(written["inst-b"])
    _sign_in(client, OPERATOR)
    ids = {
        event["id"]
        for event in client.get("/api/v1/audit/events", params={"action": "key.rotate"}).json()["events"]
    }
    assert ids == set(written[None])


def test_every_read_is_audited(runtime: Runtime, clock: ManualClock, client: TestClient) -> None:
    _write(runtime, clock)
    _sign_in(client, ADMIN_A)
    client.get("/api/v1/audit/events", headers={"user-agent": "review-ui"})
    with runtime.db.transaction() as session:
        reads = session.scalars(
            select(AuditRecord).where(AuditRecord.action == AuditAction.AUDIT_READ.value)
        ).all()
    assert [(read.actor_id, read.institution_id, read.user_agent) for read in reads] == [
        ("admin-a", "inst-a", "review-ui")
    ]


def test_without_audit_read_the_answer_is_403_and_nothing_is_read(
    runtime: Runtime, clock: ManualClock, client: TestClient
) -> None:
    _write(runtime, clock)
    _sign_in(client, CLINICIAN_A)
    response = client.get("/api/v1/audit/events")
    assert response.status_code == 403
    with runtime.db.transaction() as session:
        assert (
            session.scalar(select(func.count()).where(AuditRecord.action == AuditAction.AUDIT_READ.value))
            == 0
        )


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"cursor": "not-a-cursor"}, 400, "invalid_filter"),
        ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, 400, "invalid_filter"),
        ({"outcome": "maybe"}, 400, "invalid_filter"),
        ({"limit": "0"}, 422, "validation_error"),
        ({"since": "yesterday"}, 422, "validation_error"),
    ],
)
def test_malformed_filters_are_problems(
    client: TestClient, params: dict[str, str], status: int, code: str
) -> None:
    _sign_in(client, ADMIN_A)
    response = client.get("/api/v1/audit/events", params=params)
    assert response.status_code == status
    assert response.json()["code"] == code
