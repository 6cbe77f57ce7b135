"""Material the dev profile makes for itself on first start: a self-signed TLS
certificate and a local keyring master key, both inside the data directory.

The prod profile never makes either: an operator supplies them, and ``phivault doctor``
refuses generated ones (see ``guardrails``).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from phivault.config.settings import Settings
from phivault.config.tls import generate_self_signed
from phivault.crypto.master_key import generate_master_key_file


@contextmanager
def _only_one_maker(directory: Path) -> Iterator[None]:
    """Replicas starting together on one data directory: one makes the material, the others
    then find it (two makers could leave one's TLS key beside the other's certificate, or
    read a master key file half written).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / ".generate.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_dev_material(settings: Settings) -> list[str]:
    """Create what is missing; return a description of each thing created."""
    if settings.profile != "dev":
        return []
    created: list[str] = []
    if settings.uses_generated_tls and not settings.cert_path.exists():
        with _only_one_maker(settings.cert_path.parent):
            if not settings.cert_path.exists():
                generate_self_signed(settings.cert_path, settings.key_path, datetime.now(UTC))
                created.append(f"self-signed TLS certificate {settings.cert_path}")
    if settings.keyring_url.startswith("local:") and not settings.master_key_path.exists():
        with _only_one_maker(settings.master_key_path.parent):
            if not settings.master_key_path.exists():
                generate_master_key_file(settings.master_key_path)
                created.append(f"keyring master key {settings.master_key_path}")
    return created
