"""Every setting is described in docs/configuration.md (issue 2: docs explain every setting)."""

from __future__ import annotations

from pathlib import Path

from phivault.config.settings import Settings

DOCS = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = DOCS.read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields if f"PHIVAULT_{name.upper()}" not in text]
    assert missing == []
