from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from factories.accounts import LOOPBACK, AccountsFactory
from factories.devices import DeviceKey, DeviceSession, issue_code
from phivault.runtime import Runtime
from phivault.web.app import create_app


@pytest.fixture
def factory(runtime: Runtime) -> AccountsFactory:
    return AccountsFactory(runtime)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK) as test_client:
        yield test_client


@pytest.fixture
def institution(factory: AccountsFactory) -> str:
    return factory.institution("Home Hospital").id


@pytest.fixture
def new_key(runtime: Runtime) -> Callable[..., DeviceKey]:
    """Keys whose proofs carry the runtime's (manual) clock as iat."""

    def make(algorithm: str = "EdDSA") -> DeviceKey:
        return DeviceKey(algorithm, clock=lambda: runtime.clock.now().timestamp())

    return make


@pytest.fixture
def new_device(
    runtime: Runtime, client: TestClient, new_key: Callable[..., DeviceKey]
) -> Callable[..., DeviceSession]:
    """Activated devices of an institution, through the API."""

    def make(institution_id: str, algorithm: str = "EdDSA") -> DeviceSession:
        session = DeviceSession(client, new_key(algorithm))
        response = session.activate(issue_code(runtime, institution_id))
        assert response.status_code == 200, response.text
        return session

    return make


@pytest.fixture
def device(institution: str, new_device: Callable[..., DeviceSession]) -> DeviceSession:
    return new_device(institution)
