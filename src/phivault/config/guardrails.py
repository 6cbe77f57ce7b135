"""Compliance guardrails: the checks ``phivault doctor`` reports and ``serve`` enforces
in the prod profile. Each guardrail returns one ``Finding``; docs/operations.md lists
them with the way to fix each.
"""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from phivault.config.tls import TLSMaterialError, inspect_certificate
from phivault.crypto.keyring.errors import KeyringError
from phivault.crypto.master_key import MasterKeyError, read_master_key
from phivault.db.migrate import Tree, is_current
from phivault.runtime import Runtime
from phivault.storage.errors import StorageError

# A clock before this is certainly wrong: the software did not exist yet.
EARLIEST_SANE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
CERT_EXPIRY_WARNING = timedelta(days=30)


class Status(StrEnum):
    PASS = "pass"  # noqa: S105  # nosec B105  # a status, not a password
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    guardrail: str
    status: Status
    message: str


Guardrail = Callable[[Runtime], Finding]


def tls_certificate(runtime: Runtime) -> Finding:  # noqa: PLR0911  # one finding per condition
    name = "tls_certificate"
    settings = runtime.settings
    if settings.profile == "prod" and settings.uses_generated_tls:
        return Finding(name, Status.FAIL, "prod needs PHIVAULT_TLS_CERT_FILE and _KEY_FILE")
    try:
        facts = inspect_certificate(settings.cert_path)
    except TLSMaterialError as exc:
        return Finding(name, Status.FAIL, str(exc))
    if not settings.key_path.is_file():
        return Finding(name, Status.FAIL, f"TLS key {settings.key_path} is missing")
    if stat.S_IMODE(settings.key_path.stat().st_mode) & 0o077:
        return Finding(name, Status.FAIL, f"TLS key {settings.key_path} is readable by others")
    now = runtime.clock.now()
    if not facts.not_valid_before <= now <= facts.not_valid_after:
        return Finding(name, Status.FAIL, f"certificate is not valid now ({facts.subject})")
    if settings.profile == "prod" and facts.self_signed:
        return Finding(name, Status.FAIL, "certificate is self-signed; prod needs a CA-issued one")
    if facts.not_valid_after - now < CERT_EXPIRY_WARNING:
        return Finding(name, Status.WARN, f"certificate expires {facts.not_valid_after:%Y-%m-%d}")
    kind = "self-signed (dev)" if facts.self_signed else "CA-issued"
    return Finding(name, Status.PASS, f"{kind} certificate valid until {facts.not_valid_after:%Y-%m-%d}")


def master_key(runtime: Runtime) -> Finding:
    name = "keyring_master_key"
    settings = runtime.settings
    if not settings.keyring_url.startswith("local:"):
        return Finding(name, Status.PASS, "keyring is not local; no master key file used")
    try:
        read_master_key(settings.master_key_path)
    except MasterKeyError as exc:
        return Finding(name, Status.FAIL, str(exc))
    inside = settings.master_key_path.absolute().is_relative_to(settings.data_dir)
    if settings.profile == "prod" and inside:
        return Finding(
            name,
            Status.FAIL,
            "master key lives inside the data directory (the dev default); move it out "
            "and set PHIVAULT_MASTER_KEY_FILE",
        )
    where = "inside the data directory (dev)" if inside else "outside the data directory"
    return Finding(name, Status.PASS, f"master key readable by owner only, {where}")


def keyring(runtime: Runtime) -> Finding:
    name = "keyring"
    try:
        runtime.keyring.check()
    except KeyringError as exc:
        return Finding(name, Status.FAIL, str(exc))
    return Finding(name, Status.PASS, runtime.keyring.describe())


def key_rotation(runtime: Runtime) -> Finding:
    """Warn when the current root or an institution's current key is past its rotation period."""
    from phivault.crypto.rotation import key_status  # noqa: PLC0415  # doctor only

    name = "key_rotation"
    days = runtime.settings.key_rotation_days
    try:
        with runtime.db.transaction() as session:
            report = key_status(runtime.keys, session, now=runtime.clock.now(), rotation_days=days)
    except (KeyringError, SQLAlchemyError) as exc:
        return Finding(name, Status.WARN, f"cannot read key versions: {type(exc).__name__}")
    if report.overdue:
        shown = ", ".join(report.overdue[:5]) + (" …" if len(report.overdue) > 5 else "")  # noqa: PLR2004
        return Finding(
            name,
            Status.WARN,
            f"keys older than {days} days (PHIVAULT_KEY_ROTATION_DAYS): {shown}; run phivault keys rotate",
        )
    return Finding(name, Status.PASS, f"root and institution keys younger than {days} days")


def data_dir_permissions(runtime: Runtime) -> Finding:
    name = "data_dir_permissions"
    data_dir = runtime.settings.data_dir
    try:
        mode = stat.S_IMODE(data_dir.stat().st_mode)
    except OSError as exc:
        return Finding(name, Status.FAIL, f"data directory {data_dir}: {exc.strerror}")
    if mode & 0o077:
        return Finding(name, Status.FAIL, f"data directory {data_dir} has mode {mode:o}; chmod 700")
    return Finding(name, Status.PASS, f"data directory {data_dir} has mode 700")


def debug_off(runtime: Runtime) -> Finding:
    name = "debug_off"
    if runtime.settings.debug:
        status = Status.FAIL if runtime.settings.profile == "prod" else Status.WARN
        return Finding(name, status, "PHIVAULT_DEBUG is on; it must be off in prod")
    return Finding(name, Status.PASS, "debug is off")


def bind_address(runtime: Runtime) -> Finding:
    name = "bind_address"
    settings = runtime.settings
    address = ipaddress.ip_address(settings.bind)
    if settings.profile == "dev" and not address.is_loopback:
        return Finding(
            name,
            Status.FAIL,
            f"the dev profile (self-signed TLS, generated keys) must not listen on {address}; "
            "bind 127.0.0.1 or use the prod profile",
        )
    return Finding(name, Status.PASS, f"listening on {address}")


def dicom_transport(runtime: Runtime) -> Finding:
    """The C-STORE SCP listens on ``PHIVAULT_BIND`` too; plain DIMSE carries PHI in clear."""
    name = "dicom_transport"
    settings = runtime.settings
    if not settings.dicom_scp_enabled:
        return Finding(name, Status.PASS, "the DICOM receiver is off")
    if settings.dicom_tls:
        return Finding(name, Status.PASS, f"the DICOM receiver on port {settings.dicom_port} uses TLS")
    if ipaddress.ip_address(settings.bind).is_loopback:
        return Finding(name, Status.PASS, "the DICOM receiver without TLS listens on loopback only")
    status = Status.FAIL if settings.profile == "prod" else Status.WARN
    return Finding(
        name,
        status,
        f"the DICOM receiver would take PHI in clear on {settings.bind}:{settings.dicom_port}; "
        "set PHIVAULT_DICOM_TLS=true, or bind to loopback behind a TLS tunnel, "
        "or PHIVAULT_DICOM_SCP_ENABLED=false",
    )


def admin_allow_list(runtime: Runtime) -> Finding:
    name = "admin_allow_cidrs"
    networks = runtime.settings.admin_allow_cidrs
    if not networks:
        return Finding(name, Status.FAIL, "PHIVAULT_ADMIN_ALLOW_CIDRS is empty: no admin could connect")
    open_to_all = [str(net) for net in networks if net.prefixlen == 0]
    if open_to_all and runtime.settings.profile == "prod":
        return Finding(
            name, Status.FAIL, f"admin routes are open to every address ({', '.join(open_to_all)})"
        )
    return Finding(name, Status.PASS, "admin routes allowed from " + ", ".join(map(str, networks)))


def _database(runtime: Runtime, tree: Tree) -> Finding:
    name = "database" if tree == "main" else "phi_database"
    db = runtime.db if tree == "main" else runtime.phi_db
    try:
        db.ping()
        current = is_current(db, tree)
    except SQLAlchemyError as exc:
        return Finding(name, Status.FAIL, f"{db.safe_url()} unreachable: {type(exc).__name__}")
    if not current:
        return Finding(name, Status.FAIL, f"{db.safe_url()} schema is not migrated; run phivault init")
    return Finding(name, Status.PASS, f"{db.safe_url()} reachable, schema current")


def database(runtime: Runtime) -> Finding:
    return _database(runtime, "main")


def phi_database(runtime: Runtime) -> Finding:
    return _database(runtime, "phi")


def object_store(runtime: Runtime) -> Finding:
    name = "object_store"
    try:
        runtime.store.probe()
    except StorageError as exc:
        return Finding(name, Status.FAIL, f"{runtime.store.url} not writable: {exc}")
    return Finding(name, Status.PASS, f"{runtime.store.url} writable")


def clock(runtime: Runtime) -> Finding:
    name = "clock"
    now = runtime.clock.now()
    if now < EARLIEST_SANE_TIME:
        return Finding(name, Status.FAIL, f"system clock reads {now:%Y-%m-%d}, before this release")
    if runtime.db.is_sqlite:
        return Finding(name, Status.PASS, "clock is plausible (embedded database shares it)")
    try:
        with runtime.db.engine.connect() as connection:
            server_now = connection.execute(text("SELECT CURRENT_TIMESTAMP")).scalar_one()
    except SQLAlchemyError:
        return Finding(name, Status.WARN, "could not compare with the database server clock")
    skew = abs((now - server_now).total_seconds())
    if skew > runtime.settings.max_clock_skew_seconds:
        return Finding(name, Status.FAIL, f"clock differs from the database server by {skew:.1f} s")
    return Finding(name, Status.PASS, f"clock within {skew:.2f} s of the database server")


GUARDRAILS: tuple[Guardrail, ...] = (
    tls_certificate,
    master_key,
    keyring,
    key_rotation,
    data_dir_permissions,
    debug_off,
    bind_address,
    dicom_transport,
    admin_allow_list,
    database,
    phi_database,
    object_store,
    clock,
)


def evaluate(runtime: Runtime) -> list[Finding]:
    """Run every guardrail; one failing never stops the others from running."""
    return [guardrail(runtime) for guardrail in GUARDRAILS]


def failures(findings: list[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.status is Status.FAIL]
