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
from pydicom import uid as dicom_uid

from factories.accounts import CLI, AccountsFactory, Member, bearer
from factories.devices import activated_device
from factories.dicom_factory import make_instance, to_bytes
from phivault.accounts.permissions import ROLE_PERMISSIONS, Permission, Role
from phivault.accounts.principal import Principal
from phivault.audit.service import NO_CONTEXT
from phivault.dicom.nodes import DicomNodes
from phivault.exams.exports import DestinationSpec
from phivault.exams.types import IngestChannel, IngestOrigin
from phivault.runtime import Runtime

HTTP_METHODS = ("get", "put", "post", "delete", "patch")
_ANY_ID = "00000000-0000-4000-8000-000000000000"
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
    ("post", "/api/v1/devices/activate"),  # the activation code and the proof are the credential
    ("post", "/api/v1/devices/token"),  # the proof of the registered key is the credential
    # share links: the token in the path is the credential (an unknown one answers 404)
    ("get", "/share/{token}"),
    ("post", "/share/{token}"),
    ("get", "/share/{token}/instances/{number}"),
    ("get", "/share/{token}/instances/{number}/rendered"),
}
SECRET_IN_PATH = "/share/"


# Operations whose path parameter names no stored object: STOW-RS's study is the study the
# request's instances must belong to (PS3.18 §10.5), whoever else stored instances of it.
NAMES_NO_OBJECT = {("post", "/dicomweb/studies/{study}")}


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str
    access: str
    body: Any

    @property
    def names_an_object(self) -> bool:
        return "{" in self.path and (self.method, self.path) not in NAMES_NO_OBJECT

    @property
    def has_own_matrix(self) -> bool:
        """The read path answers 404 for exams that do not exist: its routes run on real
        exams in tests/integration/exams/test_read_matrix.py.
        """
        return self.path.startswith("/api/v1/exams") or (
            self.method == "get" and self.path.startswith("/dicomweb/")
        )

    def allows(self, role: Role) -> bool:
        if self.access == "device":
            return False  # devices present DPoP proofs (tests/devices); user tokens are refused
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
    dicom_node: str
    device: str = ""
    pacs_destination: str = ""
    quarantined: str = ""

    def principal(self, where: str, role: Role) -> tuple[Member, str, str]:
        member = self.members[(where, role)]
        token, session_id = self.factory.session_for(member, mfa=True)
        return member, token, session_id

    def url(self, operation: Operation, own_session: str) -> str:
        values = {
            "user_id": self.target.user_id,
            "institution_id": self.home,
            "session_id": own_session,
            "node_id": self.dicom_node,
            "destination_id": self.pacs_destination,
            "quarantine_id": self.quarantined,
            "number": "1",
            "device_id": self.device,
            "study": "1.2.826.0.1.3680043.10.1444.99",
        }
        # Objects no user reaches (a device's upload, a device): any well-formed id will do.
        return re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], _ANY_ID), operation.path)


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


def _anonymous_expectation(operation: Operation) -> str:
    if operation.access != "public":
        return "unauthorized"
    # a public route whose path holds a secret (a share token): any other token is unknown
    return "not_found" if operation.path.startswith(SECRET_IN_PATH) else "allowed"


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
    node = DicomNodes(runtime.db, runtime.clock).add(CLI, institution_id=home, ae_title="HOME_US")
    admin = members[("home", Role.INSTITUTION_ADMIN)]
    destination = runtime.pacs_destinations.create(
        Principal.for_user(admin.user_id, home, Role.INSTITUTION_ADMIN, None),
        DestinationSpec("Home PACS", "HOME_PACS", "127.0.0.1", 11112, "PHIVAULT"),
        context=NO_CONTEXT,
    )
    return World(
        factory,
        home,
        away,
        members,
        target,
        target_session,
        node.id,
        activated_device(runtime, home),
        destination.id,
        _quarantined(runtime, home),
    )


def _quarantined(runtime: Runtime, institution_id: str) -> str:
    """A quarantined instance of ``institution_id`` (burned-in text, no pixel rule)."""
    dataset, _ = make_instance(
        sop_class=dicom_uid.SecondaryCaptureImageStorage, modality="OT", burned_in="YES"
    )
    origin = IngestOrigin(institution_id, CLI, IngestChannel.DIMSE)
    return runtime.ingest.ingest(to_bytes(dataset), origin).instance_id


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
            _anonymous_expectation(operation),
        )
        if operation.access == "public" or operation.has_own_matrix:
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
