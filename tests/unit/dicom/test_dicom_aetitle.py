"""AE titles per PS3.5 §6.2, for DICOM nodes and the SCP's own title setting."""

from __future__ import annotations

import pytest

from phivault.config.settings import SettingsError, load_settings
from phivault.dicom.aetitle import ae_title_problem, normalise_ae_title


@pytest.mark.parametrize("title", ["A", "US_ROOM_3", "X" * 16, " PADDED  ", "with space", "a-b.c:d"])
def test_valid_ae_titles(title: str) -> None:
    assert ae_title_problem(title) is None
    assert normalise_ae_title(title) == title.strip(" ")


@pytest.mark.parametrize(
    ("title", "rule"),
    [
        ("", "1 to 16"),
        ("X" * 17, "1 to 16"),
        ("BACK\\SLASH", "backslash"),
        ("TAB\tX", "control"),
        ("NUL\x00", "control"),
        ("ÄRZTE", "printable ASCII"),
        ("    ", "all spaces"),
    ],
)
def test_invalid_ae_titles_name_the_rule(title: str, rule: str) -> None:
    problem = ae_title_problem(title)
    assert problem is not None
    assert rule in problem
    assert "PS3.5" in problem


def test_the_scp_ae_title_setting_is_checked_and_trimmed() -> None:
    assert load_settings(dicom_ae_title=" PHIVAULT2 ").dicom_ae_title == "PHIVAULT2"
    with pytest.raises(SettingsError) as caught:
        load_settings(dicom_ae_title="BAD\\TITLE")
    assert caught.value.setting == "PHIVAULT_DICOM_AE_TITLE"


def test_dicom_tls_files_default_to_the_https_ones_and_come_in_pairs() -> None:
    settings = load_settings()
    assert (settings.dicom_cert_path, settings.dicom_key_path) == (settings.cert_path, settings.key_path)
    with pytest.raises(SettingsError, match="DICOM_TLS_CERT_FILE"):
        load_settings(dicom_tls_cert_file="/etc/cert.pem")
