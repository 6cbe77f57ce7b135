"""Every route of the OpenAPI document, called unauthenticated, as every role, and as the
same role of another institution: the answer matches the access the route declares.

Nothing here names a route: each operation's ``x-phivault-permission`` (``public``,
``authenticated`` or a permission) decides what to expect, and the body sent is the
example its request schema carries. A new route is covered by being added.

- unauthenticated: 401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` (public: never);
- a role without the permission: 403 ``forbidden``;
- a role with it, home institution: neither of those, nor 404;
- a role with it, other institution, on a route naming an object: 404 ``not_found``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from factories.accounts import AccountsFactory, Member, bearer
from phivault.accounts.permissions import ROLE_PERMISSIONS, Permission, Role
from phivault.runtime import Runtime

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
DENIALS = {"unauthorized", "forbidden", "not_found", "ip_not_allowed", "password_change_required"}
PUBLIC_OPERATIONS = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/api/v1/audit/checkpoint"),
    ("get", "/api/v1/audit/public-keys"),
    ("get", "/api/v1/audit/proofs/inclusion"),
    ("get", "/api/v1/audit/proofs/consistency"),
    ("post", "/api/v1/auth/login"),
    ("post", "/api/v1/auth/mfa/verify"),
    ("post", "/api/v1/auth/refresh"),
    ("post", "/api/v1/auth/password-reset"),
    ("post", "/api/v1/auth/password-reset/confirm"),
}


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    access: str
    body: Any

    @property
    def names_an_object(self) -> bool:
        return "{" in self.path

    def allows(self, role: Role) -> bool:
        if self.access in ("public", "authenticated"):
            return True
        return all(Permission(p) in ROLE_PERMISSIONS[role] for p in self.access.split(","))


@dataclass
class World:
    """Two institutions with one member of every role each, and a target user at home."""

    factory: AccountsFactory
    home: str
    away: str
    members: dict[tuple[str, Role], Member]
    target: Member
    target_session: str

    def principal(self, where: str, role: Role) -> tuple[Member, str, str]:
        member = self.members[(where, role)]
        token, session_id = self.factory.session_for(member, mfa=True)
        return member, token, session_id

    def url(self, operation: Operation, own_session: str) -> str:
        values = {"user_id": self.target.user_id, "institution_id": self.home, "session_id": own_session}
        return re.sub(r"\{(\w+)\}", lambda m: values[m[1]], operation.path)


def _operations(spec: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            body = None
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if content is not None:
                schema = _resolve(spec, content["schema"])
                assert schema.get("examples"), f"{method.upper()} {path}: its request schema has no example"
                body = schema["examples"][0]
            found.append(Operation(method, path, operation.get("x-phivault-permission", "undeclared"), body))
    return found


def _expected_away(operation: Operation, role: Role) -> str:
    """A principal of another institution: 404 wherever the route names home's object."""
    if not operation.allows(role):
        return "forbidden"
    return "not_found" if operation.names_an_object else "allowed"


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


@pytest.fixture
def world(runtime: Runtime, factory: AccountsFactory) -> World:
    home, away = factory.institution("Home Hospital").id, factory.institution("Away Clinic").id
    members: dict[tuple[str, Role], Member] = {}
    for where, institution_id in (("home", home), ("away", away)):
        for role in Role:
            if role is not Role.OPERATOR:
                members[(where, role)] = factory.member(role, institution_id, mfa=True)
    members[("home", Role.OPERATOR)] = factory.member(Role.OPERATOR, None, mfa=True)
    target = factory.member(Role.CLINICIAN, home, mfa=True)
    _, target_session = factory.session_for(target)
    del runtime
    return World(factory, home, away, members, target, target_session)


def test_every_route_declares_its_access(client: TestClient) -> None:
    operations = _operations(client.get("/api/openapi.json").json())
    assert len(operations) > 30
    undeclared = [
        f"{o.method.upper()} {o.path}" for o in operations if o.access in ("undeclared", "conflict")
    ]
    assert not undeclared, f"routes without (or with conflicting) access declarations: {undeclared}"
    public = {(o.method, o.path) for o in operations if o.access == "public"}
    assert public == PUBLIC_OPERATIONS, "a route became public (or stopped being): update PUBLIC_OPERATIONS"


def test_every_route_answers_every_role_as_declared(client: TestClient, world: World) -> None:
    operations = _operations(client.get("/api/openapi.json").json())
    failures: list[str] = []

    def check(operation: Operation, who: str, headers: dict[str, str], url: str, expected: str) -> None:
        response = client.request(operation.method.upper(), url, headers=headers, json=operation.body)
        code = (
            response.json().get("code")
            if response.headers.get("content-type") == "application/problem+json"
            else None
        )
        if expected == "allowed":
            ok = code not in DENIALS and response.status_code != 500
        elif expected == "unauthorized":
            ok = (response.status_code, code) == (
                401,
                "unauthorized",
            ) and "www-authenticate" in response.headers
        else:
            ok = code == expected and response.status_code == {"forbidden": 403, "not_found": 404}[expected]
        if not ok:
            failures.append(
                f"{operation.method.upper()} {operation.path} as {who}: want {expected}, got "
                f"{response.status_code} {code}"
            )

    for operation in operations:
        anonymous_url = world.url(operation, world.target_session)
        check(
            operation,
            "anonymous",
            {},
            anonymous_url,
            "allowed" if operation.access == "public" else "unauthorized",
        )
        if operation.access == "public":
            continue
        for role in Role:
            _, token, session_id = world.principal("home", role)
            expected = "allowed" if operation.allows(role) else "forbidden"
            check(operation, role.value, bearer(token), world.url(operation, session_id), expected)
            if role is Role.OPERATOR:
                continue  # operators belong to no institution: there is no other one to be in
            _, token, _ = world.principal("away", role)
            expected = _expected_away(operation, role)
            # the away principal names home's objects (and the home target's session)
            check(
                operation,
                f"{role.value} of another institution",
                bearer(token),
                world.url(operation, world.target_session),
                expected,
            )
    assert not failures, "\n".join(failures)


def test_roles_hold_the_permissions_the_design_gives_them() -> None:
    for role, permissions in ROLE_PERMISSIONS.items():
        if role is Role.OPERATOR:
            assert not any(p.value.startswith("phi:") for p in permissions)
    clinician = ROLE_PERMISSIONS[Role.CLINICIAN]
    assert {Permission.EXAM_READ, Permission.PHI_READ, Permission.EXAM_CREATE} <= clinician
    assert ROLE_PERMISSIONS[Role.DEVICE] == frozenset({Permission.EXAM_CREATE})
    assert ROLE_PERMISSIONS[Role.AUDITOR] == frozenset({Permission.AUDIT_READ, Permission.AUDIT_EXPORT})
