from __future__ import annotations

from pathlib import Path

import pytest

from phivault.config.settings import SettingsError, load_settings


def test_unset_paths_derive_from_the_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "d")
    assert settings.database_url == f"sqlite:///{tmp_path / 'd' / 'phivault.sqlite3'}"
    assert settings.phi_database_url == f"sqlite:///{tmp_path / 'd' / 'phi.sqlite3'}"
    assert settings.object_store_url == (tmp_path / "d" / "objects").as_uri()
    assert settings.master_key_path == tmp_path / "d" / "master.key"
    assert settings.uses_generated_tls
    assert settings.cert_path == tmp_path / "d" / "tls" / "cert.pem"


def test_relative_data_dir_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(data_dir="rel").data_dir == tmp_path / "rel"


def test_environment_overrides_the_toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "phivault.toml"
    config.write_text('port = 9443\nregion = "eu-west"\n')
    monkeypatch.setenv("PHIVAULT_CONFIG", str(config))
    monkeypatch.setenv("PHIVAULT_PORT", "10443")
    settings = load_settings()
    assert settings.port == 10443
    assert settings.region == "eu-west"


def test_explicit_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIVAULT_PORT", "10443")
    assert load_settings(port=11443).port == 11443


def test_admin_cidrs_accept_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIVAULT_ADMIN_ALLOW_CIDRS", "10.1.0.0/16, 2001:db8::/32")
    assert [str(net) for net in load_settings().admin_allow_cidrs] == ["10.1.0.0/16", "2001:db8::/32"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PHIVAULT_PORT", "not-a-port"),
        ("PHIVAULT_PORT", "70000"),
        ("PHIVAULT_PROFILE", "staging"),
        ("PHIVAULT_BIND", "example.org"),
        ("PHIVAULT_ADMIN_ALLOW_CIDRS", "10.0.0.1/8"),
        ("PHIVAULT_REGION", "EU West"),
        ("PHIVAULT_LOG_LEVEL", "verbose"),
        ("PHIVAULT_JOB_LEASE_SECONDS", "1"),
    ],
)
def test_invalid_value_names_its_setting(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.setting == variable
    assert "\n" not in str(caught.value)


def test_unknown_environment_variables_with_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # PHIVAULT_CONFIG itself and variables of other tools must not break start-up.
    monkeypatch.setenv("PHIVAULT_SOMETHING_ELSE", "x")
    load_settings()


def test_tls_files_must_be_set_together(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(tls_cert_file=tmp_path / "cert.pem")
    assert "PHIVAULT_TLS_CERT_FILE" in caught.value.reason


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("port = ", "not valid TOML"),
        ("colour = 'blue'\n", "unknown setting 'colour'"),
        ("port = 'x'\n", ""),
    ],
)
def test_bad_config_file_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, expected: str
) -> None:
    config = tmp_path / "phivault.toml"
    if content is not None:
        config.write_text(content)
    monkeypatch.setenv("PHIVAULT_CONFIG", str(config))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert expected in caught.value.reason
    assert caught.value.setting in ("PHIVAULT_CONFIG", "PHIVAULT_PORT")
    assert "\n" not in str(caught.value)
