"""Material the dev profile makes for itself on first start: a self-signed TLS
certificate and a local keyring master key, both inside the data directory.

The prod profile never makes either: an operator supplies them, and ``phivault doctor``
refuses generated ones (see ``guardrails``).
"""

from __future__ import annotations

from datetime import UTC, datetime

from phivault.config.settings import Settings
from phivault.config.tls import generate_self_signed
from phivault.crypto.master_key import generate_master_key_file


def ensure_dev_material(settings: Settings) -> list[str]:
    """Create what is missing; return a description of each thing created."""
    if settings.profile != "dev":
        return []
    created: list[str] = []
    if settings.uses_generated_tls and not settings.cert_path.exists():
        generate_self_signed(settings.cert_path, settings.key_path, datetime.now(UTC))
        created.append(f"self-signed TLS certificate {settings.cert_path}")
    if settings.keyring_url.startswith("local:") and not settings.master_key_path.exists():
        generate_master_key_file(settings.master_key_path)
        created.append(f"keyring master key {settings.master_key_path}")
    return created
