"""Crypto errors reach HTTP clients as problems with stable codes, never as a 500."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from phivault.crypto.errors import KeyIntegrityError, KeyNotFound, KeyShredded, ObjectIntegrityError
from phivault.http.problems import PROBLEM_JSON, install_problem_handlers


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/raise/{what}")
    def raise_(what: str) -> None:
        errors: dict[str, Exception] = {
            "shredded": KeyShredded(),
            "object": ObjectIntegrityError(),
            "key": KeyIntegrityError(),
            "missing": KeyNotFound("no key for patient DOE^JANE"),
        }
        raise errors[what]

    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("what", "status", "code"),
    [
        ("shredded", 410, "shredded"),
        ("object", 409, "integrity_check_failed"),
        ("key", 409, "integrity_check_failed"),
        ("missing", 404, "not_found"),
    ],
)
def test_crypto_error_becomes_a_problem_with_a_stable_code(
    client: TestClient, what: str, status: int, code: str
) -> None:
    response = client.get(f"/raise/{what}")
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["code"] == code
    assert "DOE" not in response.text
