"""Every error path answers RFC 9457 problem+json with a stable code, never a traceback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError

from phivault.http.problems import Problem, install_problem_handlers
from phivault.storage.errors import ObjectNotFound, StorageFull, StorageUnavailable


class Credentials(BaseModel):
    email: str
    password: str


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/echo")
    def echo(body: Credentials) -> dict[str, str]:
        return {"email": body.email}

    @app.get("/raise/{what}")
    def raise_(what: str) -> None:
        errors: dict[str, Exception] = {
            "database": OperationalError("SELECT 1", {}, Exception("connection refused")),
            "store": StorageUnavailable(),
            "full": StorageFull(),
            "missing": ObjectNotFound(),
            "problem": Problem(409, "already_exists", "an exam with this UID exists"),
            "bug": RuntimeError("DOE^JANE secret detail"),
        }
        raise errors[what]

    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("what", "status", "code"),
    [
        ("database", 503, "database_unavailable"),
        ("store", 503, "object_store_unavailable"),
        ("full", 507, "storage_full"),
        ("missing", 404, "not_found"),
        ("problem", 409, "already_exists"),
        ("bug", 500, "internal_error"),
    ],
)
def test_errors_map_to_problems(client: TestClient, what: str, status: int, code: str) -> None:
    response = client.get(f"/raise/{what}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == code
    assert body["status"] == status
    assert "DOE^JANE" not in response.text
    assert "Traceback" not in response.text


def test_unavailable_dependencies_ask_clients_to_retry(client: TestClient) -> None:
    assert client.get("/raise/database").headers["retry-after"] == "5"


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/echo", content=b'{"email": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_body"


def test_invalid_body_is_422_without_echoing_input(client: TestClient) -> None:
    response = client.post("/echo", json={"email": "a@example.org", "password": ["hunter2-secret"]})
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "validation_error"
    assert body["errors"][0]["loc"] == ["body", "password"]
    assert "hunter2-secret" not in response.text


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    assert client.get("/nope").json()["code"] == "not_found"
    assert client.put("/echo").json()["code"] == "method_not_allowed"
