"""SIEM forwarding settings: off by default, refused early when unusable, each error naming
the setting an operator has to fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from phivault.config.settings import SettingsError, load_settings
from phivault.runtime import build_runtime


def test_siem_forwarding_is_off_by_default(tmp_path: Path) -> None:
    runtime = build_runtime(load_settings(data_dir=tmp_path / "d"))
    try:
        assert runtime.siem is None
    finally:
        runtime.close()


@pytest.mark.parametrize(
    "url", ["syslog://siem.example:514", "tcp://siem.example", "syslog+tls://siem.example/path", "x"]
)
def test_siem_url_other_than_syslog_over_tls_names_the_setting(tmp_path: Path, url: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(data_dir=tmp_path / "d", siem_url=url)
    assert caught.value.setting == "PHIVAULT_SIEM_URL"


def test_siem_port_out_of_range_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        build_runtime(load_settings(data_dir=tmp_path / "d", siem_url="syslog+tls://siem.example:70000"))
    assert caught.value.setting == "PHIVAULT_SIEM_URL"


def test_missing_siem_ca_file_names_the_setting(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path / "d", siem_url="syslog+tls://siem.example", siem_ca_file=tmp_path / "missing.pem"
    )
    with pytest.raises(SettingsError) as caught:
        build_runtime(settings)
    assert caught.value.setting == "PHIVAULT_SIEM_CA_FILE"


def test_client_certificate_without_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(data_dir=tmp_path / "d", siem_client_cert_file=tmp_path / "c.pem")
    assert "PHIVAULT_SIEM_CLIENT_KEY_FILE" in caught.value.reason
