"""DICOM node management by institution admins, on SQLite and PostgreSQL: scoped to the
admin's institution, AE titles checked against PS3.5 and unique, every change audited.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from factories.accounts import AccountsFactory, bearer, problem
from factories.devices import activated_device
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction
from phivault.audit.models import AuditRecord
from phivault.devices.models import Device
from phivault.runtime import Runtime

NODES = "/api/v1/dicom/nodes"


def _admin(factory: AccountsFactory) -> tuple[str, dict[str, str]]:
    institution = factory.institution().id
    token, _ = factory.session_for(factory.member(Role.INSTITUTION_ADMIN, institution, mfa=True))
    return institution, bearer(token)


def test_an_admin_adds_lists_and_removes_nodes_of_their_institution_only(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home, admin = _admin(factory)
    _, other_admin = _admin(factory)
    created = client.post(NODES, json={"ae_title": " US_ROOM_3 ", "description": "room 3"}, headers=admin)
    assert created.status_code == 201, created.text
    node = created.json()
    assert (node["ae_title"], node["institution_id"], node["description"]) == ("US_ROOM_3", home, "room 3")
    client.post(NODES, json={"ae_title": "CT_1"}, headers=other_admin)

    assert [n["ae_title"] for n in client.get(NODES, headers=admin).json()["nodes"]] == ["US_ROOM_3"]
    assert [n["ae_title"] for n in client.get(NODES, headers=other_admin).json()["nodes"]] == ["CT_1"]

    stranger = client.delete(f"{NODES}/{node['id']}", headers=other_admin)
    assert (stranger.status_code, problem(stranger)["code"]) == (404, "not_found")
    assert client.delete(f"{NODES}/{node['id']}", headers=admin).status_code == 204
    assert client.get(NODES, headers=admin).json()["nodes"] == []
    gone = client.delete(f"{NODES}/{node['id']}", headers=admin)
    assert gone.status_code == 404
    with runtime.db.transaction() as session:
        actions = session.scalars(
            select(AuditRecord.action).where(AuditRecord.object_id == node["id"]).order_by(AuditRecord.seq)
        ).all()
    assert actions == [AuditAction.DICOM_NODE_CREATE.value, AuditAction.DICOM_NODE_DELETE.value]


@pytest.mark.parametrize(
    "ae_title",
    ["", "A" * 17, "US\\ROOM", "    ", "US\tROOM", "US\nROOM", "ÜLTRASCHALL"],
)
def test_an_ae_title_that_breaks_ps3_5_is_a_400(
    client: TestClient, factory: AccountsFactory, ae_title: str
) -> None:
    _, admin = _admin(factory)
    response = client.post(NODES, json={"ae_title": ae_title}, headers=admin)
    assert response.status_code == 400, response.text
    assert problem(response)["code"] == "invalid_ae_title"
    assert "PS3.5" in problem(response)["detail"]


def test_an_ae_title_is_unique_across_institutions(client: TestClient, factory: AccountsFactory) -> None:
    _, admin = _admin(factory)
    _, other_admin = _admin(factory)
    assert client.post(NODES, json={"ae_title": "SHARED"}, headers=admin).status_code == 201
    taken = client.post(NODES, json={"ae_title": "SHARED  "}, headers=other_admin)
    assert (taken.status_code, problem(taken)["code"]) == (409, "ae_title_taken")


def test_nodes_are_managed_by_admins_only(client: TestClient, factory: AccountsFactory) -> None:
    institution = factory.institution().id
    token, _ = factory.session_for(factory.member(Role.CLINICIAN, institution))
    refused = client.post(NODES, json={"ae_title": "US1"}, headers=bearer(token))
    assert (refused.status_code, problem(refused)["code"]) == (403, "forbidden")


def test_a_node_maps_to_an_active_device_of_the_admins_institution_only(
    client: TestClient, factory: AccountsFactory, runtime: Runtime
) -> None:
    home, admin = _admin(factory)
    away, _ = _admin(factory)
    own, foreign = activated_device(runtime, home), activated_device(runtime, away)
    created = client.post(NODES, json={"ae_title": "US_1", "device_id": own}, headers=admin)
    assert (created.status_code, created.json()["device_id"]) == (201, own)
    refused = client.post(NODES, json={"ae_title": "US_2", "device_id": foreign}, headers=admin)
    assert (refused.status_code, problem(refused)["code"]) == (404, "not_found")
    with runtime.db.transaction() as session:
        device = session.get(Device, own)
        assert device is not None
        device.revoked_at = runtime.clock.now()
    revoked = client.post(NODES, json={"ae_title": "US_3", "device_id": own}, headers=admin)
    assert revoked.status_code == 404
