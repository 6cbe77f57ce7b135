"""``phivault``: run and operate a phivault deployment.

Exit codes: 0 success, 1 the operation failed (a guardrail, an unreachable service),
2 bad usage or an invalid setting.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from phivault import __version__
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import Actor, SystemSubject
from phivault.audit.service import record as audit_record
from phivault.audit.verify import verify_log
from phivault.config.guardrails import Finding, Status, evaluate, failures
from phivault.config.settings import Settings, SettingsError, load_settings
from phivault.config.tls import TLSMaterialError
from phivault.crypto.keyring.errors import KeyringError
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
    try:
        runtime.keyring.check()
    except KeyringError as exc:
        fail(f"the keyring cannot be used, refusing to start: {exc}")
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
    from phivault.web.server import run_server  # noqa: PLC0415  # uvicorn only for serve

    try:
        run_server(runtime, settings.bind, settings.port)
    except TLSMaterialError as exc:
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


def main() -> None:
    app()
