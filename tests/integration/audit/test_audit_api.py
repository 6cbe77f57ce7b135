"""The routes an outside auditor uses, checked with the RFC 9162 verifier."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.checkpoint import parse_and_verify
from phivault.audit.merkle import verify_consistency, verify_inclusion
from phivault.audit.service import Actor, SystemSubject, record
from phivault.runtime import Runtime
from phivault.web.app import create_app


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), base_url="https://testserver") as test_client:
        yield test_client


def _log(runtime: Runtime, count: int) -> int:
    with runtime.db.transaction() as session:
        for _ in range(count):
            record(
                session,
                AuditAction.AUDIT_READ,
                SystemSubject(Actor(ActorType.USER, "u1"), "inst-1"),
                None,
                Outcome.SUCCESS,
                now=runtime.clock.now(),
            )
    checkpoint = runtime.audit.checkpoint_now(runtime.clock.now())
    assert checkpoint is not None
    return checkpoint.size


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def test_no_checkpoint_yet_is_a_problem(client: TestClient) -> None:
    response = client.get("/api/v1/audit/checkpoint")
    assert response.status_code == 404
    assert response.json()["code"] == "no_checkpoint"


def test_an_auditor_verifies_inclusion_and_consistency(runtime: Runtime, client: TestClient) -> None:
    first = _log(runtime, 10)
    first_note = client.get("/api/v1/audit/checkpoint").text
    second = _log(runtime, 30)
    second_note = client.get("/api/v1/audit/checkpoint").text
    keys = client.get("/api/v1/audit/public-keys").json()["keys"]
    assert len(keys) == 1
    old = parse_and_verify(first_note, keys[0]["verifier_key"])
    new = parse_and_verify(second_note, keys[0]["verifier_key"])
    assert (old.size, new.size) == (first, second)

    proof = client.get("/api/v1/audit/proofs/consistency", params={"from": first, "to": second}).json()
    verify_consistency(first, second, old.root_hash, new.root_hash, [_b64(h) for h in proof["hashes"]])

    for index in (0, 5, second - 1):
        body = client.get("/api/v1/audit/proofs/inclusion", params={"index": index, "size": second}).json()
        verify_inclusion(
            _b64(body["leaf_hash"]), index, second, [_b64(h) for h in body["hashes"]], new.root_hash
        )


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/audit/proofs/inclusion", {"index": "5", "size": "5"}),
        ("/api/v1/audit/proofs/inclusion", {"index": "0", "size": "99999"}),
        ("/api/v1/audit/proofs/consistency", {"from": "9", "to": "3"}),
        ("/api/v1/audit/proofs/consistency", {"from": "1", "to": "99999"}),
    ],
)
def test_impossible_proof_requests_are_400(
    runtime: Runtime, client: TestClient, path: str, params: dict[str, str]
) -> None:
    _log(runtime, 5)
    response = client.get(path, params=params)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_proof_request"


@pytest.mark.parametrize("params", [{"index": "x", "size": "1"}, {"index": "-1", "size": "1"}, {"size": "1"}])
def test_malformed_parameters_are_422(client: TestClient, params: dict[str, str]) -> None:
    response = client.get("/api/v1/audit/proofs/inclusion", params=params)
    assert response.status_code == 422
    assert response.json()["code"] == "validation_error"
