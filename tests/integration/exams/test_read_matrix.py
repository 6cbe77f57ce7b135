"""The read path's access matrix: every role, in its own institution and in another one, on
every route of QIDO-RS, WADO-RS and the exam API gets the expected status, and no PHI in any answer
to a principal without ``phi:read``.

Each column is a place the caller stands; a share-link column joins when share links land
(issue 8, item 4). A new route of these routers fails ``test_the_matrix_covers_every_route``
until it is added to ``ROUTES``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
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
from phivault.exams.models import Study
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
)

PLACES = ("own", "other")  # share links: a third place (issue 8, item 4)


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
    }
    client = TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK)
    return World(runtime, client, study, values, principals, hold)


def _url(world: World, route: Route) -> str:
    return re.sub(r"\{(\w+)\}", lambda match: world.values[match[1]], route.path)


def test_every_role_in_every_place_gets_the_expected_status(world: World) -> None:
    failures: list[str] = []
    leaks: list[str] = []
    with world.client as client:
        for route in ROUTES:
            anonymous = client.request(route.method, _url(world, route), json=route.body)
            if anonymous.status_code != 401 or "www-authenticate" not in anonymous.headers:
                failures.append(f"{route.method} {route.path} anonymous: {anonymous.status_code}")
            for (role, place), headers in world.principals.items():
                if role is Role.OPERATOR and place == "other":
                    continue  # operators belong to no institution
                world.hold()
                response = client.request(route.method, _url(world, route), headers=headers, json=route.body)
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
    declared = _declared(qido.router) | _declared(wado.router) | _declared(exams_api.router)
    assert declared == {(route.method, route.path) for route in ROUTES}


def test_other_institutions_see_nothing_of_ours_in_searches(world: World) -> None:
    headers = world.principals[(Role.CLINICIAN, "other")]
    with world.client as client:
        studies = client.get("/dicomweb/studies", headers=headers).json()
        exams = client.get("/api/v1/exams?archived=true", headers=headers).json()["items"]
    assert world.values["study"] not in str(studies)
    assert world.study.study_id not in {item["id"] for item in exams}
    assert len(studies) == len(exams) == 1
