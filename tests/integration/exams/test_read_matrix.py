"""The read path's access matrix: every role, in its own institution and in another one, on
every route of QIDO-RS, WADO-RS and the exam API gets the expected status, and no PHI in any answer
to a principal without ``phi:read``.

Each column is a place the caller stands; the share-link column is the holder of a link,
without credentials: the API answers it 401, the link's own routes answer it with no PHI.
A new route of these routers fails ``test_the_matrix_covers_every_route`` until it is added
to ``ROUTES`` (or ``SHARE_ROUTES``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from factories.accounts import LOOPBACK, bearer
from factories.exams import ExamsFactory, IngestedStudy, principal
from phivault.accounts.permissions import ROLE_PERMISSIONS, Permission, Role
from phivault.audit.service import NO_CONTEXT
from phivault.dicom import qido, wado
from phivault.exams import api as exams_api
from phivault.exams import export_api, share_api
from phivault.exams.exports import DestinationSpec
from phivault.exams.models import Study
from phivault.exams.outbound_models import ShareMode
from phivault.exams.shares import ShareRequest
from phivault.runtime import Runtime
from phivault.web.app import create_app

INSTANCE = "/dicomweb/studies/{study}/series/{series}/instances/{instance}"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    permission: Permission
    own: int  # the status for a principal with the permission, in the owning institution
    names_object: bool = True  # another institution: 404 (else 200 and nothing of ours)
    body: dict[str, str] | None = None


ROUTES = (
    Route("GET", "/dicomweb/studies", Permission.EXAM_READ, 200, names_object=False),
    Route("GET", "/dicomweb/series", Permission.EXAM_READ, 200, names_object=False),
    Route("GET", "/dicomweb/instances", Permission.EXAM_READ, 200, names_object=False),
    Route("GET", "/dicomweb/studies/{study}/series", Permission.EXAM_READ, 200),
    Route("GET", "/dicomweb/studies/{study}/instances", Permission.EXAM_READ, 200),
    Route("GET", "/dicomweb/studies/{study}/series/{series}/instances", Permission.EXAM_READ, 200),
    Route("GET", "/dicomweb/studies/{study}", Permission.EXAM_READ, 200),
    Route("GET", "/dicomweb/studies/{study}/series/{series}", Permission.EXAM_READ, 200),
    Route("GET", INSTANCE, Permission.EXAM_READ, 200),
    Route("GET", "/dicomweb/studies/{study}/metadata", Permission.EXAM_READ, 200),
    Route("GET", "/dicomweb/studies/{study}/series/{series}/metadata", Permission.EXAM_READ, 200),
    Route("GET", INSTANCE + "/metadata", Permission.EXAM_READ, 200),
    Route("GET", INSTANCE + "/frames/{frames}", Permission.EXAM_READ, 200),
    Route("GET", INSTANCE + "/rendered", Permission.EXAM_READ, 200),
    Route("GET", INSTANCE + "/frames/{frames}/rendered", Permission.EXAM_READ, 200),
    Route("GET", "/api/v1/exams", Permission.EXAM_READ, 200, names_object=False),
    Route("GET", "/api/v1/exams/{exam_id}", Permission.EXAM_READ, 200),
    Route("POST", "/api/v1/exams/{exam_id}/archive", Permission.EXAM_ARCHIVE, 200),
    Route("DELETE", "/api/v1/exams/{exam_id}/archive", Permission.EXAM_ARCHIVE, 200),
    Route("PUT", "/api/v1/exams/{exam_id}/legal-hold", Permission.EXAM_HOLD, 200),
    Route("DELETE", "/api/v1/exams/{exam_id}/legal-hold", Permission.EXAM_HOLD, 200),
    # The exam is under legal hold while this runs: 409 proves the permission and the scope.
    Route("DELETE", "/api/v1/exams/{exam_id}", Permission.EXAM_DELETE, 409),
    Route("GET", "/api/v1/exams/{exam_id}/comments", Permission.EXAM_READ, 200),
    Route("POST", "/api/v1/exams/{exam_id}/comments", Permission.EXAM_COMMENT, 201, body={"body": "ok"}),
    # The comment is another clinician's: 403 not_comment_author proves the rest passed.
    Route(
        "PATCH",
        "/api/v1/exams/{exam_id}/comments/{comment_id}",
        Permission.EXAM_COMMENT,
        403,
        body={"body": "x"},
    ),
    Route("DELETE", "/api/v1/exams/{exam_id}/comments/{comment_id}", Permission.EXAM_COMMENT, 403),
    Route(
        "POST", "/api/v1/exams/{exam_id}/shares", Permission.EXAM_SHARE, 201, body={"expires_at": "{expires}"}
    ),
    Route("GET", "/api/v1/exams/{exam_id}/shares", Permission.EXAM_SHARE, 200),
    Route("DELETE", "/api/v1/exams/{exam_id}/shares/{share_id}", Permission.EXAM_SHARE, 200),
    # An export to the destination is under way: asking again answers it (202).
    Route(
        "POST",
        "/api/v1/exams/{exam_id}/exports",
        Permission.EXAM_EXPORT,
        202,
        body={"destination_id": "{destination_id}"},
    ),
    Route("GET", "/api/v1/exams/{exam_id}/exports", Permission.EXAM_EXPORT, 200),
    Route("GET", "/api/v1/exams/{exam_id}/exports/{export_id}", Permission.EXAM_EXPORT, 200),
    # The export has not failed: 409 export_not_failed proves the permission and the scope.
    Route("POST", "/api/v1/exams/{exam_id}/exports/{export_id}/retry", Permission.EXAM_EXPORT, 409),
)
# The share-link column: a download link of the exam, opened without credentials.
SHARE_ROUTES = (
    "/share/{token}",
    "/share/{token}/instances/{number}",
    "/share/{token}/instances/{number}/rendered",
)

PLACES = ("own", "other")  # and the share-link column (test_a_share_link_opens_its_routes_only)


def expected(route: Route, role: Role, place: str) -> int:
    if route.permission not in ROLE_PERMISSIONS[role]:
        return 403
    if place == "own":
        return route.own
    return 404 if route.names_object else 200


@dataclass
class World:
    runtime: Runtime
    client: TestClient
    study: IngestedStudy
    values: dict[str, str]
    principals: dict[tuple[Role, str], dict[str, str]]
    hold: Callable[[], None]


@pytest.fixture
def world(runtime: Runtime) -> World:
    exams = ExamsFactory(runtime)
    home, away = exams.accounts.institution().id, exams.accounts.institution().id
    study = exams.study(home, instances=1, frames=2)
    # The other institution's own exam carries no planted PHI: what its members may see of it
    # cannot be mistaken for ours.
    exams.study(away, study_uid="1.2.826.0.1.3680043.10.1444.70", instances=1, plant_phi=False)
    principals: dict[tuple[Role, str], dict[str, str]] = {}
    for role in Role:
        for place, institution in (("own", home), ("other", away)):
            member = exams.accounts.member(role, None if role is Role.OPERATOR else institution, mfa=True)
            principals[(role, place)] = bearer(exams.accounts.session_for(member, mfa=True)[0])
    author = principal(exams.accounts.member(Role.CLINICIAN, home, mfa=True))
    comment = runtime.exams.add_comment(author, study.study_id, "the author's", context=NO_CONTEXT)
    receipt = study.receipts[0]
    now = runtime.clock.now()
    share = runtime.shares.create(
        author,
        study.study_id,
        ShareRequest(now + timedelta(days=2), ShareMode.DOWNLOAD),
        context=NO_CONTEXT,
    )
    admin = principal(exams.accounts.member(Role.INSTITUTION_ADMIN, home, mfa=True))
    destination = runtime.pacs_destinations.create(
        admin, DestinationSpec("Home PACS", "HOME_PACS", "127.0.0.1", 11112, "PHIVAULT"), context=NO_CONTEXT
    )
    export = runtime.exports.create(author, study.study_id, destination.id, context=NO_CONTEXT)
    assert share.token is not None

    def hold() -> None:
        with runtime.db.transaction() as session:
            row = session.get(Study, study.study_id)
            assert row is not None
            row.legal_hold_at = runtime.clock.now()

    values = {
        "study": receipt.study_instance_uid,
        "series": receipt.series_instance_uid,
        "instance": receipt.sop_instance_uid,
        "frames": "1",
        "exam_id": study.study_id,
        "comment_id": comment.id,
        "share_id": share.share.id,
        "expires": (now + timedelta(days=1)).isoformat(),
        "destination_id": destination.id,
        "export_id": export.id,
        "token": share.token,
        "number": "1",
    }
    client = TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK)
    return World(runtime, client, study, values, principals, hold)


def _fill(world: World, text: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: world.values[match[1]], text)


def _url(world: World, route: Route) -> str:
    return _fill(world, route.path)


def _body(world: World, route: Route) -> dict[str, str] | None:
    return None if route.body is None else {key: _fill(world, value) for key, value in route.body.items()}


def test_every_role_in_every_place_gets_the_expected_status(world: World) -> None:
    failures: list[str] = []
    leaks: list[str] = []
    with world.client as client:
        for route in ROUTES:
            anonymous = client.request(route.method, _url(world, route), json=_body(world, route))
            if anonymous.status_code != 401 or "www-authenticate" not in anonymous.headers:
                failures.append(f"{route.method} {route.path} anonymous: {anonymous.status_code}")
            for (role, place), headers in world.principals.items():
                if role is Role.OPERATOR and place == "other":
                    continue  # operators belong to no institution
                world.hold()
                response = client.request(
                    route.method, _url(world, route), headers=headers, json=_body(world, route)
                )
                want = expected(route, role, place)
                if response.status_code != want:
                    failures.append(
                        f"{route.method} {route.path} as {role.value} ({place}): "
                        f"want {want}, got {response.status_code} {response.text[:120]}"
                    )
                if Permission.PHI_READ not in ROLE_PERMISSIONS[role] or place != "own":
                    found = [value for value in world.study.planted if value.encode() in response.content]
                    if found:
                        leaks.append(f"{route.method} {route.path} as {role.value} ({place}): {found[:3]}")
    assert not failures, "\n".join(failures)
    assert not leaks, "PHI reached principals without phi:read:\n" + "\n".join(leaks)


def _declared(router: Any) -> set[tuple[str, str]]:  # noqa: ANN401  # an APIRouter
    return {
        (method, route.path)
        for route in router.routes
        if isinstance(route, APIRoute)
        for method in route.methods or ()
    }


def test_the_matrix_covers_every_route() -> None:
    declared = (
        _declared(qido.router)
        | _declared(wado.router)
        | _declared(exams_api.router)
        | _declared(share_api.router)
        | _declared(export_api.router)
    )
    assert declared == {(route.method, route.path) for route in ROUTES}
    public = {path for method, path in _declared(share_api.public_router) if method == "GET"}
    assert public == set(SHARE_ROUTES)


def test_a_share_link_opens_its_routes_only_and_carries_no_phi(world: World) -> None:
    failures: list[str] = []
    leaks: list[str] = []
    with world.client as client:
        for route in ROUTES:  # the link is no credential for the API
            response = client.request(route.method, _url(world, route), json=_body(world, route))
            if response.status_code != 401:
                failures.append(f"{route.method} {route.path} with a share link: {response.status_code}")
        for path in SHARE_ROUTES:
            response = client.get(_fill(world, path))
            if response.status_code != 200:
                failures.append(f"GET {path}: {response.status_code} {response.text[:120]}")
            found = [
                value for value in world.study.planted if value.lower().encode() in response.content.lower()
            ]
            if found:
                leaks.append(f"GET {path}: {found[:3]}")
    assert not failures, "\n".join(failures)
    assert not leaks, "PHI reached the holder of a share link:\n" + "\n".join(leaks)


def test_other_institutions_see_nothing_of_ours_in_searches(world: World) -> None:
    headers = world.principals[(Role.CLINICIAN, "other")]
    with world.client as client:
        studies = client.get("/dicomweb/studies", headers=headers).json()
        exams = client.get("/api/v1/exams?archived=true", headers=headers).json()["items"]
    assert world.values["study"] not in str(studies)
    assert world.study.study_id not in {item["id"] for item in exams}
    assert len(studies) == len(exams) == 1
