"""Every guardrail of ``phivault doctor``: a passing default, and a way to make each fail."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from phivault.clock import ManualClock
from phivault.config import guardrails
from phivault.config.guardrails import Status, evaluate, failures
from phivault.config.settings import Settings
from phivault.config.tls import generate_self_signed
from phivault.crypto.master_key import generate_master_key_file
from phivault.runtime import Runtime, build_runtime

_built: list[Runtime] = []


@pytest.fixture(autouse=True)
def _close_derived_runtimes() -> Iterator[None]:
    yield
    while _built:
        _built.pop().close()


def _runtime_with(runtime: Runtime, clock: ManualClock | None = None, **changes: object) -> Runtime:
    """A runtime over the same data with some settings changed (closed after the test)."""
    settings = Settings(**{**runtime.settings.model_dump(), **changes})
    derived = build_runtime(settings, clock=clock or runtime.clock)
    _built.append(derived)
    return derived


def _real_clock() -> ManualClock:
    return ManualClock(datetime.now(UTC))


def test_fresh_dev_install_passes_every_guardrail(runtime: Runtime) -> None:
    runtime.clock.set(datetime.now(UTC))  # type: ignore[attr-defined]
    findings = evaluate(runtime)
    assert [f.guardrail for f in findings if f.status is not Status.PASS] == []
    assert len(findings) == len(guardrails.GUARDRAILS)


def test_prod_without_configured_certificate_fails(runtime: Runtime) -> None:
    prod = _runtime_with(runtime, profile="prod")
    assert guardrails.tls_certificate(prod).status is Status.FAIL


def test_prod_with_self_signed_certificate_fails(runtime: Runtime, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    generate_self_signed(cert, key, datetime.now(UTC))
    prod = _runtime_with(runtime, _real_clock(), profile="prod", tls_cert_file=cert, tls_key_file=key)
    finding = guardrails.tls_certificate(prod)
    assert finding.status is Status.FAIL
    assert "self-signed" in finding.message


def test_expired_certificate_fails(runtime: Runtime) -> None:
    later = ManualClock(datetime.now(UTC) + timedelta(days=400))
    assert guardrails.tls_certificate(_runtime_with(runtime, later)).status is Status.FAIL


def test_certificate_near_expiry_warns(runtime: Runtime) -> None:
    soon = ManualClock(datetime.now(UTC) + timedelta(days=350))
    assert guardrails.tls_certificate(_runtime_with(runtime, soon)).status is Status.WARN


def test_world_readable_tls_key_fails(runtime: Runtime) -> None:
    runtime.settings.key_path.chmod(0o644)
    assert guardrails.tls_certificate(_runtime_with(runtime, _real_clock())).status is Status.FAIL


def test_missing_master_key_fails(runtime: Runtime) -> None:
    runtime.settings.master_key_path.unlink()
    assert guardrails.master_key(runtime).status is Status.FAIL


def test_readable_master_key_fails(runtime: Runtime) -> None:
    runtime.settings.master_key_path.chmod(0o640)
    assert guardrails.master_key(runtime).status is Status.FAIL


def test_placeholder_master_key_fails(runtime: Runtime) -> None:
    runtime.settings.master_key_path.write_bytes(base64.b64encode(bytes(32)) + b"\n")
    finding = guardrails.master_key(runtime)
    assert finding.status is Status.FAIL
    assert "placeholder" in finding.message


def test_master_key_inside_data_dir_fails_in_prod(runtime: Runtime) -> None:
    prod = _runtime_with(runtime, profile="prod")
    assert guardrails.master_key(prod).status is Status.FAIL


def test_master_key_outside_data_dir_passes_in_prod(runtime: Runtime, tmp_path: Path) -> None:
    outside = tmp_path / "secrets" / "master.key"
    generate_master_key_file(outside)
    prod = _runtime_with(runtime, profile="prod", master_key_file=outside)
    assert guardrails.master_key(prod).status is Status.PASS


def test_a_master_key_that_does_not_open_the_keyring_fails(runtime: Runtime) -> None:
    assert guardrails.keyring(runtime).status is Status.PASS  # creates the sealed keyring
    runtime.keyring.close()
    runtime.settings.master_key_path.unlink()
    generate_master_key_file(runtime.settings.master_key_path)  # a different, valid key
    finding = guardrails.keyring(_runtime_with(runtime))
    assert finding.status is Status.FAIL
    assert "master key" in finding.message


def test_group_readable_data_dir_fails(runtime: Runtime) -> None:
    os.chmod(runtime.settings.data_dir, 0o750)  # noqa: PTH101, S103  # the unsafe mode under test
    assert guardrails.data_dir_permissions(runtime).status is Status.FAIL


def test_debug_in_prod_fails(runtime: Runtime) -> None:
    assert guardrails.debug_off(_runtime_with(runtime, profile="prod", debug=True)).status is Status.FAIL
    assert guardrails.debug_off(_runtime_with(runtime, debug=True)).status is Status.WARN


def test_dev_profile_on_a_public_address_fails(runtime: Runtime) -> None:
    everywhere = "0.0.0.0"  # noqa: S104  # the exposure under test
    assert guardrails.bind_address(_runtime_with(runtime, bind=everywhere)).status is Status.FAIL
    assert (
        guardrails.bind_address(_runtime_with(runtime, profile="prod", bind=everywhere)).status is Status.PASS
    )


def test_plain_dicom_beyond_loopback_fails_in_prod(runtime: Runtime) -> None:
    everywhere = "0.0.0.0"  # noqa: S104  # the exposure under test
    plain = _runtime_with(runtime, profile="prod", bind=everywhere, dicom_tls=False)
    assert guardrails.dicom_transport(plain).status is Status.FAIL
    assert guardrails.dicom_transport(_runtime_with(runtime, bind=everywhere)).status is Status.WARN
    assert guardrails.dicom_transport(runtime).status is Status.PASS  # loopback
    with_tls = _runtime_with(runtime, profile="prod", bind=everywhere, dicom_tls=True)
    assert guardrails.dicom_transport(with_tls).status is Status.PASS
    off = _runtime_with(runtime, profile="prod", bind=everywhere, dicom_scp_enabled=False)
    assert guardrails.dicom_transport(off).status is Status.PASS


def test_admin_allow_list_empty_or_open_to_all_fails(runtime: Runtime) -> None:
    assert guardrails.admin_allow_list(_runtime_with(runtime, admin_allow_cidrs=())).status is Status.FAIL
    open_prod = _runtime_with(runtime, profile="prod", admin_allow_cidrs=("0.0.0.0/0",))
    assert guardrails.admin_allow_list(open_prod).status is Status.FAIL


def test_unreachable_database_fails(runtime: Runtime, tmp_path: Path) -> None:
    if runtime.db.is_sqlite:
        broken = f"sqlite:///{tmp_path / 'missing-dir' / 'db.sqlite3'}"
    else:
        broken = runtime.db.url.set(port=1).render_as_string(hide_password=False)
    finding = guardrails.database(_runtime_with(runtime, database_url=broken))
    assert finding.status is Status.FAIL
    assert "unreachable" in finding.message


def test_database_without_migrations_fails(settings: Settings, clock: ManualClock) -> None:
    fresh = build_runtime(settings, clock=clock)
    _built.append(fresh)
    settings.data_dir.mkdir(exist_ok=True)
    finding = guardrails.database(fresh)
    assert finding.status is Status.FAIL
    assert "not migrated" in finding.message
    assert guardrails.phi_database(fresh).status is Status.FAIL


def test_unwritable_object_store_fails(runtime: Runtime, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("x")
    broken = _runtime_with(runtime, object_store_url=not_a_dir.as_uri())
    assert guardrails.object_store(broken).status is Status.FAIL


def test_clock_before_release_fails(runtime: Runtime) -> None:
    past = ManualClock(datetime(2020, 1, 1, tzinfo=UTC))
    assert guardrails.clock(_runtime_with(runtime, past)).status is Status.FAIL


@pytest.mark.postgres
@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)  # SQLite shares our clock
def test_clock_skewed_from_database_server_fails(runtime: Runtime) -> None:
    skewed = ManualClock(datetime.now(UTC) + timedelta(minutes=10))
    finding = guardrails.clock(_runtime_with(runtime, skewed))
    assert finding.status is Status.FAIL
    assert "differs" in finding.message
    assert guardrails.clock(_runtime_with(runtime, _real_clock())).status is Status.PASS


def test_failures_lists_only_failed_guardrails(runtime: Runtime) -> None:
    broken = _runtime_with(runtime, ManualClock(datetime(2020, 1, 1, tzinfo=UTC)), debug=True, profile="prod")
    names = {finding.guardrail for finding in failures(evaluate(broken))}
    assert {"clock", "debug_off", "tls_certificate", "keyring_master_key"} <= names


def test_keys_past_the_rotation_period_warn(runtime: Runtime) -> None:
    runtime.keyring.check()  # root key version 1, created now
    with runtime.db.transaction() as session:
        runtime.keys.new_institution_key(session, "inst-a", runtime.clock.now())
    assert guardrails.key_rotation(runtime).status is Status.PASS
    later = ManualClock(runtime.clock.now() + timedelta(days=366))
    finding = guardrails.key_rotation(_runtime_with(runtime, later))
    assert finding.status is Status.WARN
    assert "root" in finding.message
    assert "inst-a" in finding.message
    assert guardrails.key_rotation(_runtime_with(runtime, later, key_rotation_days=400)).status is Status.PASS
