from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from factories.accounts import LOOPBACK, AccountsFactory
from phivault.runtime import Runtime
from phivault.web.app import create_app


@pytest.fixture
def factory(runtime: Runtime) -> AccountsFactory:
    return AccountsFactory(runtime)


@pytest.fixture
def client(runtime: Runtime) -> Iterator[TestClient]:
    with TestClient(create_app(runtime), base_url="https://testserver", client=LOOPBACK) as test_client:
        yield test_client
