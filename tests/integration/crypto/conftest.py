"""Fixtures of the key hierarchy tests."""

from __future__ import annotations

import pytest

from phivault.runtime import Runtime
from servers.crypto_kit import Kit


@pytest.fixture
def kit(runtime: Runtime) -> Kit:
    return Kit(runtime)
