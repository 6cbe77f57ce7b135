"""``phivault``: run and operate a phivault deployment.

Exit codes: 0 success, 1 the operation failed (a guardrail, an unreachable service),
2 bad usage or an invalid setting.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from phivault import __version__
from phivault.accounts.errors import AccountsError, InvalidInput
from phivault.accounts.permissions import Role
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.errors import AuditError
from phivault.audit.export import ExportFilter, ExportFormat, Observer, export_log
from phivault.audit.service import Actor, SystemSubject
from phivault.audit.service import record as audit_record
from phivault.audit.verify import verify_log
from phivault.config.guardrails import Finding, Status, evaluate, failures
from phivault.config.settings import Settings, SettingsError, load_settings
from phivault.config.tls import TLSMaterialError
from phivault.crypto.errors import KeyNotFound, RotationInProgress
from phivault.crypto.keyring.errors import KeyringError
from phivault.crypto.rotation import (
    ROOT_SETTLE,
    KeyStatusReport,
    RotationProgress,
    key_status,
    run_rotation_batch,
    start_rotation,
)
from phivault.devices.errors import DevicesError
from phivault.dicom.errors import DicomNodeError
from phivault.dicom.nodes import DicomNodes, NodeInfo
from phivault.runtime import Runtime, build_runtime, initialise, umask_owner_only

app = typer.Typer(
    name="phivault",
    help="Run and operate phivault, the cloud for medical-device exams.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    # One line, never wrapped: scripts grep it.
    typer.echo(f"phivault: error: {message}", err=True)
    raise typer.Exit(code)


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _runtime(**overrides: object) -> Runtime:
    umask_owner_only()
    try:
        settings = load_settings(**overrides)
        runtime = build_runtime(settings)
    except SettingsError as exc:
        fail(f"invalid setting {exc.setting}: {exc.reason}", code=2)
    _configure_logging(settings)
    return runtime


def _initialise(runtime: Runtime) -> list[str]:
    try:
        return initialise(runtime)
    except SQLAlchemyError as exc:
        fail(f"cannot prepare the database: {type(exc).__name__}: {exc.args[0] if exc.args else ''}")
    except OSError as exc:
        fail(f"cannot prepare the data directory: {exc}")


def _print_findings(findings: list[Finding]) -> None:
    table = Table(title="phivault doctor", show_lines=False)
    table.add_column("guardrail")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    colours = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "red"}
    for finding in findings:
        table.add_row(finding.guardrail, f"[{colours[finding.status]}]{finding.status}[/]", finding.message)
    out.print(table)


def _version(value: bool) -> None:  # noqa: FBT001  # typer callback signature
    if value:
        out.print(f"phivault {__version__}")
        raise typer.Exit


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    del version


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [PHIVAULT_BIND].")] = None,
    port: Annotated[int | None, typer.Option(help="HTTPS port [PHIVAULT_PORT].")] = None,
    dicom_port: Annotated[int | None, typer.Option(help="DICOM port [PHIVAULT_DICOM_PORT].")] = None,
) -> None:
    """Serve the API and portal over HTTPS (and run background jobs)."""
    runtime = _runtime(bind=host, port=port, dicom_port=dicom_port)
    settings = runtime.settings
    _initialise(runtime)
    findings = evaluate(runtime)
    for finding in findings:
        if finding.status is not Status.PASS:
            err.print(
                f"phivault: {finding.status}: {finding.guardrail}: {finding.message}",
                markup=False,
                highlight=False,
            )
    failed = failures(findings)
    if failed and settings.profile == "prod":
        fail("refusing to start in prod while guardrails fail: " + ", ".join(f.guardrail for f in failed))
    # Whatever the profile: without a working keyring nothing encrypted can be read or written.
    try:
        runtime.keyring.check()
    except KeyringError as exc:
        fail(f"the keyring cannot be used, refusing to start: {exc}")
    _bootstrap_operator(runtime)
    from phivault.dicom.scp import ScpStartError  # noqa: PLC0415  # pynetdicom only for serve
    from phivault.web.server import run_server  # noqa: PLC0415  # uvicorn only for serve

    try:
        run_server(runtime, settings.bind, settings.port)
    except (TLSMaterialError, ScpStartError) as exc:
        fail(str(exc))
    finally:
        runtime.close()


@app.command()
def init(json_output: JsonFlag = False) -> None:
    """Create the data directory, dev keys and certificate, and migrate the databases."""
    runtime = _runtime()
    created = _initialise(runtime)
    if json_output:
        out.print_json(json.dumps({"data_dir": str(runtime.settings.data_dir), "created": created}))
    else:
        for item in created:
            out.print(f"created {item}", markup=False, highlight=False)
        out.print(
            f"phivault data directory ready: {runtime.settings.data_dir}", markup=False, highlight=False
        )


@app.command()
def doctor(json_output: JsonFlag = False) -> None:
    """Evaluate every compliance guardrail; exit 1 if any fails."""
    runtime = _runtime()
    findings = evaluate(runtime)
    runtime.close()
    if json_output:
        report = {
            "ok": not failures(findings),
            "profile": runtime.settings.profile,
            "findings": [asdict(finding) for finding in findings],
        }
        out.print_json(json.dumps(report))
    else:
        _print_findings(findings)
    if failures(findings):
        raise typer.Exit(1)


@app.command()
def worker() -> None:
    """Run background jobs until SIGTERM or Ctrl-C (in addition to, or instead of, serve's)."""
    runtime = _runtime()
    _initialise(runtime)
    stop = threading.Event()

    def request_stop(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        runtime.new_worker().run_forever(stop)
    finally:
        runtime.close()


audit_app = typer.Typer(help="Check and export the tamper-evident audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(json_output: JsonFlag = False) -> None:
    """Recompute the audit log from its records; check every checkpoint; exit 1 on tampering."""
    runtime = _runtime()
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), console=err, transient=True
        ) as progress:
            progress.add_task("verifying the audit log", total=None)
            report = verify_log(runtime.db)
        with runtime.db.transaction() as session:
            audit_record(
                session,
                AuditAction.AUDIT_VERIFY,
                SystemSubject(Actor.system("phivault-cli")),
                None,
                Outcome.SUCCESS if report.ok else Outcome.FAILURE,
                now=runtime.clock.now(),
            )
    except SQLAlchemyError as exc:
        fail(f"cannot read the audit log: {type(exc).__name__}")
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps(asdict(report), default=str))
    else:
        verdict = "[green]intact[/]" if report.ok else "[red]TAMPERED[/]"
        out.print(
            f"audit log {verdict}: {report.tree_size} leaves, {report.records_checked} records and "
            f"{report.checkpoints_checked} signed checkpoints checked, {report.pending_records} pending"
        )
        if report.first_bad_index is not None:
            out.print(f"first bad leaf index: {report.first_bad_index}")
        for problem in report.problems[:20]:
            out.print(f"  - {problem}", markup=False, highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def _parse_moment(option: str, value: str | None) -> datetime | None:
    """An ISO 8601 date or date-time; without an offset it is read as UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: not an ISO 8601 date or date-time: {value!r}", code=2)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _write_atomically(path: Path, chunks: Iterator[bytes]) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it: a reader sees
    the old file or the whole new one, never a partial export.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temporary).replace(path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@audit_app.command("prune")
def audit_prune(
    before: Annotated[
        str, typer.Option(help="Delete records older than this ISO 8601 time (UTC if no offset).")
    ],
    json_output: JsonFlag = False,
) -> None:
    """Delete audit records older than the retention lock; the tree stays verifiable."""
    moment = _parse_moment("--before", before)
    if moment is None:
        fail("--before is required", code=2)
    runtime = _runtime()
    try:
        retention = timedelta(days=runtime.settings.audit_retention_days)
        deleted = runtime.audit.prune(
            SystemSubject(Actor.system("phivault-cli")),
            before=moment,
            retention=retention,
            now=runtime.clock.now(),
        )
    except AuditError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        fail(f"cannot prune the audit log: {type(exc).__name__}")
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps({"deleted": deleted, "before": moment.isoformat()}))
    else:
        out.print(f"deleted {deleted} audit records older than {moment:%Y-%m-%d %H:%M:%S %Z}")


@audit_app.command("export")
def audit_export(  # noqa: PLR0913, PLR0917  # one option per filter
    export_format: Annotated[
        ExportFormat,
        typer.Option("--format", help="jsonl, fhir (R4 Bundle of AuditEvent) or syslog (RFC 5424)."),
    ] = ExportFormat.JSONL,
    institution: Annotated[str | None, typer.Option(help="Only this institution's records.")] = None,
    platform: Annotated[
        bool, typer.Option("--platform", help="Only records outside any institution.")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="From this ISO 8601 time (inclusive; UTC if no offset).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Up to this ISO 8601 time (exclusive).")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. audit.export.")] = None,
    actor: Annotated[str | None, typer.Option(help="Only records by this actor id.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write to this file (atomically) instead of stdout.")
    ] = None,
) -> None:
    """Export integrated audit records in leaf order; the export itself is audited."""
    if institution is not None and platform:
        fail("--institution and --platform exclude each other", code=2)
    filters = ExportFilter(
        institution_id=institution,
        platform_only=platform,
        since=_parse_moment("--since", since),
        until=_parse_moment("--until", until),
        action=action,
        actor_id=actor,
    )
    runtime = _runtime()
    try:
        # Bring the tree up to date first (as a worker would), so the export is current
        # even where no worker runs; integrating is safe beside running workers.
        while runtime.audit.integrate_pending(runtime.clock.now()):
            pass
        total = runtime.audit.tree_size()
        if output is None:
            chunks = export_log(
                runtime.db,
                export_format,
                filters,
                SystemSubject(Actor.system("phivault-cli")),
                Observer.local(runtime.settings.audit_origin),
                now=runtime.clock.now(),
            )
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err
        ) as progress:
            task = progress.add_task("exporting the audit log (leaves)", total=total)
            chunks = export_log(
                runtime.db,
                export_format,
                filters,
                SystemSubject(Actor.system("phivault-cli")),
                Observer.local(runtime.settings.audit_origin),
                now=runtime.clock.now(),
                progress=lambda done: progress.update(task, completed=done),
            )
            _write_atomically(output, chunks)
            progress.update(task, completed=total)
    except SQLAlchemyError as exc:
        fail(f"cannot read the audit log: {type(exc).__name__}")
    except OSError as exc:
        fail(f"cannot write the export: {exc.strerror or type(exc).__name__}")
    finally:
        runtime.close()


ingest_app = typer.Typer(help="Operate the ingest pipeline.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")


@ingest_app.command("sweep")
def ingest_sweep(
    grace_seconds: Annotated[
        int | None,
        typer.Option(
            "--grace-seconds",
            min=0,
            help="Remove what is older than this (default: PHIVAULT_INGEST_ORPHAN_GRACE_SECONDS). "
            "0 only when no ingest is running, e.g. after a crash with every server stopped.",
        ),
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Remove objects and PHI rows an interrupted ingest left unreferenced.

    The worker does this every PHIVAULT_INGEST_SWEEP_INTERVAL_SECONDS.
    """
    runtime = _runtime()
    try:
        grace = None if grace_seconds is None else timedelta(seconds=grace_seconds)
        report = runtime.sweeper.sweep(grace)
    except SQLAlchemyError as exc:
        fail(f"cannot read the databases (run phivault init?): {type(exc).__name__}")
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps(asdict(report)))
    else:
        out.print(
            f"objects deleted: {report.objects_deleted}, noted for a later sweep: {report.objects_noted}; "
            f"PHI rows deleted: {report.phi_instances_deleted} instances, "
            f"{report.phi_studies_deleted} studies, {report.phi_patients_deleted} patients",
            markup=False,
            highlight=False,
        )


keys_app = typer.Typer(help="Show and rotate the encryption keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("status")
def keys_status(json_output: JsonFlag = False) -> None:
    """Show root and institution key versions, their ages, what each wraps, and rotations."""
    runtime = _runtime()
    try:
        with runtime.db.transaction() as session:
            report = key_status(
                runtime.keys,
                session,
                now=runtime.clock.now(),
                rotation_days=runtime.settings.key_rotation_days,
            )
    except KeyringError as exc:
        fail(f"the keyring cannot be used: {exc}")
    except SQLAlchemyError as exc:
        fail(f"cannot read the key tables (run phivault init?): {type(exc).__name__}")
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps(asdict(report), default=str))
    else:
        _print_key_status(report)


def _print_key_status(report: KeyStatusReport) -> None:
    out.print(f"keyring: {report.keyring}", markup=False, highlight=False)
    roots = Table(title=f"root key {report.root_key_id}")
    for column in ("version", "created", "age (days)", "state", "wraps"):
        roots.add_column(column)
    for v in report.root_versions:
        state = "current" if v.current else "retired" if v.retired else "previous"
        created = "-" if v.created_at is None else f"{v.created_at:%Y-%m-%d}"
        roots.add_row(
            str(v.version), created, str(v.age_days if v.age_days is not None else "-"), state, str(v.wraps)
        )
    out.print(roots)
    institutions = Table(title="institution keys")
    for column in ("institution", "version", "state", "created", "age (days)", "root version", "wraps"):
        institutions.add_column(column)
    for key in report.institution_keys:
        institutions.add_row(
            key.institution_id,
            str(key.version),
            key.status,
            f"{key.created_at:%Y-%m-%d}",
            str(key.age_days),
            str(key.root_version),
            str(key.wraps),
        )
    out.print(institutions)
    out.print(f"patient keys: {report.patient_keys} ({report.shredded_patient_keys} shredded)")
    for rotation in report.rotations:
        if not rotation.done:
            scope = rotation.institution_id or "root"
            out.print(
                f"rotation of {scope} v{rotation.from_version} -> v{rotation.to_version}: {rotation.status}, "
                f"{rotation.rewrapped}/{rotation.total} re-wrapped",
                markup=False,
                highlight=False,
            )
    if report.overdue:
        out.print(
            f"[yellow]older than {report.rotation_days} days:[/] " + ", ".join(report.overdue),
            highlight=False,
        )


@keys_app.command("rotate")
def keys_rotate(
    institution: Annotated[
        str | None,
        typer.Option("--institution", help="Rotate this institution's key instead of the root key."),
    ] = None,
    background: Annotated[
        bool, typer.Option("--background", help="Only queue the re-wrap job; a worker finishes it.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Make a new key version current and re-wrap the keys below it (resumes an unfinished one)."""
    runtime = _runtime()
    subject = SystemSubject(Actor.system("phivault-cli"))
    try:
        runtime.keyring.check()
        with runtime.db.transaction() as session:
            progress = start_rotation(
                runtime.keys, session, institution_id=institution, actor=subject, now=runtime.clock.now()
            )
        if not background:
            progress = _drive_rotation(runtime, progress, quiet=json_output)
    except KeyNotFound:
        fail(f"institution {institution} has no key to rotate")
    except RotationInProgress:
        fail("another rotation of this key started at the same moment; run the command again to resume it")
    except KeyringError as exc:
        fail(f"the keyring cannot be used: {exc}")
    except SQLAlchemyError as exc:
        fail(f"cannot update the key tables (run phivault init?): {type(exc).__name__}")
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps({**asdict(progress), "done": progress.done}, default=str))
        return
    scope = f"institution {institution}" if institution else "root"
    out.print(
        f"{scope} key v{progress.from_version} -> v{progress.to_version}: {progress.status}, "
        f"{progress.rewrapped}/{progress.total} keys re-wrapped",
        markup=False,
        highlight=False,
    )
    if progress.status == "settling":
        out.print(
            f"old root versions are retired by a worker (phivault serve or worker) after "
            f"{int(ROOT_SETTLE.total_seconds() // 60)} minutes, or by running this command again then"
        )
    elif progress.done and institution is None and progress.retired_version is None:
        out.print("no root version was retired: older versions still wrap keys (see phivault keys status)")


def _drive_rotation(runtime: Runtime, progress: RotationProgress, *, quiet: bool) -> RotationProgress:
    """Run the rotation's batches here until done (or, for the root, until it settles)."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=True,
        disable=quiet,
    ) as bar:
        task = bar.add_task("re-wrapping keys", total=max(progress.total, 1), completed=progress.rewrapped)
        while not progress.done and progress.status != "settling":
            with runtime.db.transaction() as session:
                progress = run_rotation_batch(runtime.keys, session, progress.id, now=runtime.clock.now())
            bar.update(task, completed=progress.rewrapped)
        if (
            progress.status == "settling"
            and progress.settle_until
            and runtime.clock.now() >= progress.settle_until
        ):
            with runtime.db.transaction() as session:
                progress = run_rotation_batch(runtime.keys, session, progress.id, now=runtime.clock.now())
    return progress


def _bootstrap_operator(runtime: Runtime) -> None:
    """On an empty database, create the platform operator and show its one-time password.

    Printed once, to the terminal (stderr), never logged (DESIGN.md §7).
    """
    try:
        created = runtime.accounts.ensure_bootstrap_operator()
    except SQLAlchemyError as exc:
        fail(f"cannot create the platform operator: {type(exc).__name__}")
    if created is None:
        return
    email, password = created
    typer.echo(
        f"phivault: created the platform operator {email}\n"
        f"phivault: one-time password (shown only now; change it at first sign-in): {password}",
        err=True,
    )


institution_app = typer.Typer(help="Create and list institutions (tenants).", no_args_is_help=True)
app.add_typer(institution_app, name="institution")
user_app = typer.Typer(help="Create, disable and list users.", no_args_is_help=True)
app.add_typer(user_app, name="user")

_CLI_SUBJECT = SystemSubject(Actor.system("phivault-cli"))


def _accounts_runtime() -> Runtime:
    runtime = _runtime()
    _initialise(runtime)
    return runtime


def _accounts_failed(exc: AccountsError) -> NoReturn:
    reasons = exc.extensions.get("reasons")
    suffix = f" ({', '.join(reasons)})" if isinstance(reasons, list) else ""
    fail(f"{exc.code}: {exc.detail}{suffix}", code=2 if isinstance(exc, InvalidInput) else 1)


@institution_app.command("create")
def institution_create(
    name: Annotated[str, typer.Argument(help="The institution's name (unique).")],
    region: Annotated[
        str | None, typer.Option(help="Its region; must be this deployment's [PHIVAULT_REGION].")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Create an institution, pinned to this deployment's region."""
    runtime = _accounts_runtime()
    try:
        info = runtime.accounts.create_institution(_CLI_SUBJECT, name, region)
    except AccountsError as exc:
        _accounts_failed(exc)
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps({"id": info.id, "name": info.name, "region": info.region}))
    else:
        out.print(f"created institution {info.name} (id {info.id}, region {info.region})", markup=False)


@institution_app.command("list")
def institution_list(json_output: JsonFlag = False) -> None:
    """List the institutions."""
    runtime = _accounts_runtime()
    try:
        infos = runtime.accounts.list_institutions(_CLI_SUBJECT)
    finally:
        runtime.close()
    if json_output:
        rows = [
            {"id": i.id, "name": i.name, "region": i.region, "created_at": i.created_at.isoformat()}
            for i in infos
        ]
        out.print_json(json.dumps(rows))
        return
    table = Table(title="institutions")
    for column in ("id", "name", "region", "created"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.id, info.name, info.region, info.created_at.isoformat(timespec="seconds"))
    out.print(table)


def _read_password_line() -> str:
    line = sys.stdin.readline()
    password = line.removesuffix("\n").removesuffix("\r")
    if not password:
        fail("--password-stdin: no password on standard input", code=2)
    return password


@user_app.command("create")
def user_create(  # one option per field of the account
    email: Annotated[str, typer.Option(help="The sign-in e-mail address (unique).")],
    role: Annotated[Role, typer.Option(help="operator, institution_admin, clinician or auditor.")],
    institution: Annotated[
        str | None, typer.Option(help="The institution's id (every role but operator).")
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read the password from the first line of standard input; without it a "
            "one-time password is generated, printed and must be changed at first sign-in.",
        ),
    ] = False,
    must_change_password: Annotated[
        bool, typer.Option("--must-change-password", help="Ask for a new password at first sign-in.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Create a user (no prompts: scripts give the password on standard input)."""
    password = _read_password_line() if password_stdin else None
    runtime = _accounts_runtime()
    try:
        info, one_time = runtime.accounts.create_user(
            _CLI_SUBJECT,
            institution_id=institution,
            email=email,
            role=role,
            password=password,
            must_change_password=must_change_password,
        )
    except AccountsError as exc:
        _accounts_failed(exc)
    finally:
        runtime.close()
    if json_output:
        result: dict[str, str | None] = {
            "id": info.id,
            "email": info.email,
            "role": info.role.value,
            "institution_id": info.institution_id,
        }
        if one_time is not None:
            result["one_time_password"] = one_time
        out.print_json(json.dumps(result))
        return
    out.print(f"created {info.role.value} {info.email} (id {info.id})", markup=False, highlight=False)
    if one_time is not None:
        out.print(
            f"one-time password (change it at first sign-in): {one_time}", markup=False, highlight=False
        )


@user_app.command("disable")
def user_disable(
    user: Annotated[str, typer.Argument(help="The user's id or e-mail address.")],
    json_output: JsonFlag = False,
) -> None:
    """Disable a user; their sessions end at once."""
    runtime = _accounts_runtime()
    try:
        found = runtime.accounts.find_user(_CLI_SUBJECT, user)
        info = runtime.accounts.set_user_disabled(_CLI_SUBJECT, found.id, disabled=True)
    except AccountsError as exc:
        _accounts_failed(exc)
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps({"id": info.id, "disabled": info.disabled}))
    else:
        out.print(
            f"disabled {info.email} (id {info.id}); their sessions ended", markup=False, highlight=False
        )


@user_app.command("reset-password")
def user_reset_password(
    user: Annotated[str, typer.Argument(help="The user's id or e-mail address.")],
    json_output: JsonFlag = False,
) -> None:
    """Give a user a new one-time password (shown once; to be changed at first sign-in, within
    PHIVAULT_ONE_TIME_PASSWORD_HOURS); their sessions end. For a user who cannot reset by e-mail,
    or whose one-time password expired (the bootstrap operator's too).
    """
    runtime = _accounts_runtime()
    try:
        found = runtime.accounts.find_user(_CLI_SUBJECT, user)
        info, one_time = runtime.accounts.issue_one_time_password(_CLI_SUBJECT, found.id)
    except AccountsError as exc:
        _accounts_failed(exc)
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps({"id": info.id, "email": info.email, "one_time_password": one_time}))
    else:
        for line in (
            f"new password for {info.email} (id {info.id}); their sessions ended",
            f"one-time password (change it at first sign-in): {one_time}",
        ):
            out.print(line, markup=False, highlight=False)


@user_app.command("list")
def user_list(
    institution: Annotated[str | None, typer.Option(help="Only this institution's users.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """List users (e-mail, role, state; never passwords or secrets)."""
    runtime = _accounts_runtime()
    try:
        users = runtime.accounts.list_users(_CLI_SUBJECT, institution)
    finally:
        runtime.close()
    rows = [
        {
            "id": u.id,
            "institution_id": u.institution_id,
            "email": u.email,
            "role": u.role.value,
            "disabled": u.disabled,
            "mfa_enabled": u.mfa_enabled,
            "created_at": u.created_at.isoformat(),
        }
        for u in users
    ]
    if json_output:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="users")
    for column in ("id", "institution", "email", "role", "state", "mfa"):
        table.add_column(column)
    for u in users:
        state = "disabled" if u.disabled else "active"
        table.add_row(
            u.id, u.institution_id or "-", u.email, u.role.value, state, "on" if u.mfa_enabled else "off"
        )
    out.print(table)


dicom_app = typer.Typer(help="DICOM receivers (C-STORE SCP, STOW-RS).", no_args_is_help=True)
app.add_typer(dicom_app, name="dicom")
dicom_node_app = typer.Typer(
    help="DICOM nodes: the calling AE titles the C-STORE SCP accepts, each for one institution.",
    no_args_is_help=True,
)
dicom_app.add_typer(dicom_node_app, name="node")


def _dicom_nodes(runtime: Runtime) -> DicomNodes:
    return DicomNodes(runtime.db, runtime.clock)


def _node_json(node: NodeInfo) -> dict[str, str | None]:
    return {
        "id": node.id,
        "institution_id": node.institution_id,
        "ae_title": node.ae_title,
        "device_id": node.device_id,
        "description": node.description,
        "created_at": node.created_at.isoformat(),
    }


def _dicom_node_failed(exc: DicomNodeError) -> NoReturn:
    fail(f"{exc.code}: {exc.detail}", code=2 if exc.status == 400 else 1)  # noqa: PLR2004  # bad input


@dicom_node_app.command("add")
def dicom_node_add(
    institution: Annotated[str, typer.Option(help="The institution the node sends for (its id).")],
    ae_title: Annotated[
        str, typer.Option("--ae-title", help="The node's calling AE title (1-16 characters).")
    ],
    device: Annotated[str | None, typer.Option(help="The device its instances count against.")] = None,
    description: Annotated[str, typer.Option(help="A note for admins, e.g. the room.")] = "",
    json_output: JsonFlag = False,
) -> None:
    """Allow a calling AE title to send to the C-STORE SCP, for one institution."""
    runtime = _accounts_runtime()
    try:
        node = _dicom_nodes(runtime).add(
            _CLI_SUBJECT,
            institution_id=institution,
            ae_title=ae_title,
            device_id=device,
            description=description,
        )
    except DicomNodeError as exc:
        _dicom_node_failed(exc)
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps(_node_json(node)))
    else:
        out.print(f"added DICOM node {node.ae_title} (id {node.id})", markup=False, highlight=False)


@dicom_node_app.command("list")
def dicom_node_list(
    institution: Annotated[str | None, typer.Option(help="Only this institution's nodes.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """List the DICOM nodes."""
    runtime = _accounts_runtime()
    try:
        nodes = _dicom_nodes(runtime).list(_CLI_SUBJECT, institution)
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps([_node_json(node) for node in nodes]))
        return
    table = Table(title="DICOM nodes")
    for column in ("id", "AE title", "institution", "device", "description"):
        table.add_column(column)
    for node in nodes:
        table.add_row(node.id, node.ae_title, node.institution_id, node.device_id or "-", node.description)
    out.print(table)


@dicom_node_app.command("remove")
def dicom_node_remove(
    node_id: Annotated[str, typer.Argument(metavar="ID", help="The node's id.")],
    json_output: JsonFlag = False,
) -> None:
    """Remove a DICOM node: its AE title can no longer associate."""
    runtime = _accounts_runtime()
    try:
        node = _dicom_nodes(runtime).remove(_CLI_SUBJECT, node_id)
    except DicomNodeError as exc:
        _dicom_node_failed(exc)
    finally:
        runtime.close()
    if json_output:
        out.print_json(json.dumps(_node_json(node)))
    else:
        out.print(f"removed DICOM node {node.ae_title} (id {node.id})", markup=False, highlight=False)


device_app = typer.Typer(help="Activation codes and devices.", no_args_is_help=True)
app.add_typer(device_app, name="device")


def _devices_failed(exc: DevicesError) -> NoReturn:
    fail(f"{exc.code}: {exc.detail}", code=2 if exc.status == 422 else 1)  # noqa: PLR2004  # invalid input


@device_app.command("code")
def device_code(
    institution: Annotated[str, typer.Option(help="The institution the device will belong to.")],
    serial: Annotated[str | None, typer.Option(help="Only a device with this serial may use it.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Make a single-use activation code (shown once; expires after PHIVAULT_DEVICE_CODE_HOURS)."""
    runtime = _accounts_runtime()
    try:
        issued = runtime.devices.create_code(_CLI_SUBJECT, institution, serial)
    except DevicesError as exc:
        _devices_failed(exc)
    finally:
        runtime.close()
    if json_output:
        # DESIGN.md §7: scripts read exactly these two fields.
        out.print_json(json.dumps({"code": issued.code, "expires_at": issued.expires_at.isoformat()}))
        return
    # typer.echo, not rich: a terminal's width must not break the code or pin across lines.
    typer.echo(f"activation code (shown once): {issued.code}")
    typer.echo(f"expires: {issued.expires_at.isoformat(timespec='seconds')}")
    for pin in issued.server_pins:
        typer.echo(f"server certificate pin (phivault-agent activate --pin): {pin}")


@device_app.command("list")
def device_list(
    institution: Annotated[str | None, typer.Option(help="Only this institution's devices.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """List devices (revoked ones too); never keys or tokens."""
    runtime = _accounts_runtime()
    try:
        devices = runtime.devices.list_devices(_CLI_SUBJECT, institution)
    finally:
        runtime.close()
    rows = [
        {
            "id": d.id,
            "institution_id": d.institution_id,
            "serial": d.serial,
            "key_thumbprint": d.key_thumbprint,
            "activated_at": d.activated_at.isoformat(),
            "last_seen_at": d.last_seen_at.isoformat(),
            "revoked_at": d.revoked_at.isoformat() if d.revoked_at else None,
        }
        for d in devices
    ]
    if json_output:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="devices")
    for column in ("id", "institution", "serial", "state", "last seen"):
        table.add_column(column)
    for d in devices:
        state = "revoked" if d.revoked_at else "active"
        table.add_row(
            d.id, d.institution_id, d.serial or "-", state, d.last_seen_at.isoformat(timespec="seconds")
        )
    out.print(table)


@device_app.command("revoke")
def device_revoke(
    device: Annotated[str, typer.Argument(help="The device's id.")],
    json_output: JsonFlag = False,
) -> None:
    """Revoke a device: its next request is refused; its unfinished uploads are cancelled."""
    runtime = _accounts_runtime()
    try:
        info = runtime.devices.revoke(_CLI_SUBJECT, device)
    except DevicesError as exc:
        _devices_failed(exc)
    finally:
        runtime.close()
    revoked_at = info.revoked_at.isoformat() if info.revoked_at else None
    if json_output:
        out.print_json(json.dumps({"id": info.id, "revoked_at": revoked_at}))
    else:
        out.print(f"revoked device {info.id}", markup=False, highlight=False)


def main() -> None:
    app()
