"""``phivault-agent``: the device-side uploader.

    phivault-agent activate --server URL --code CODE [--ca-cert F] [--pin PIN]
    phivault-agent add FILE…           queue files (encrypted local spool; no network)
    phivault-agent sync [--json]       upload the queue: retries, back-off, resumes
    phivault-agent status [--json]     what is queued, confirmed, refused; warns as items age
    phivault-agent purge               forget confirmed items (and, if asked, refused ones)

Everything lives in the agent's home (``--home``, ``PHIVAULT_AGENT_HOME``, default
``~/.phivault-agent``): owner-only (0700/0600). Exit codes: 0 done, 1 failed (or items
left unconfirmed), 2 bad usage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichBar
from rich.table import Table

from phivault.agent.client import PinMismatch, ServerClient, ServerError
from phivault.agent.files import private_directory, write_private
from phivault.agent.keys import ALGORITHMS, DeviceKey
from phivault.agent.spool import Item, Spool, SpoolError, State
from phivault.agent.sync import DEFAULT_CHUNK, ItemResult, Progress, Syncer, SyncOptions

app = typer.Typer(
    name="phivault-agent",
    help="Upload exams from a device to phivault (offline-first, encrypted local spool).",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
_PIN_PATTERN = r"^sha256//[A-Za-z0-9+/]{43}=$"


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"phivault-agent: error: {message}", err=True)
    raise typer.Exit(code)


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Home:
    path: Path
    retain: timedelta

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def key_file(self) -> Path:
        return self.path / "device-key.pem"

    @property
    def ca_file(self) -> Path:
        return self.path / "server-ca.pem"

    def spool(self) -> Spool:
        private_directory(self.path)
        spool = Spool(self.path / "spool", self.path / "spool.key")
        spool.prepare()
        return spool

    def config(self) -> dict[str, Any]:
        try:
            config: dict[str, Any] = json.loads(self.config_file.read_bytes())
        except FileNotFoundError:
            fail("this device is not activated yet: run phivault-agent activate")
        except (OSError, ValueError) as exc:
            fail(f"cannot read {self.config_file}: {exc}")
        return config

    def client(self) -> ServerClient:
        config = self.config()
        try:
            key = DeviceKey.load(self.key_file)
        except (OSError, ValueError, TypeError) as exc:
            fail(f"cannot read the device key {self.key_file}: {exc}")
        ca_file = self.ca_file if config.get("ca_file") else None
        pins = frozenset(config.get("pins") or ())
        return ServerClient(config["server"], key, ca_file=ca_file, pins=pins)

    @contextlib.contextmanager
    def sync_lock(self) -> Iterator[None]:
        """One sync at a time per home (a second one would send the same items)."""
        private_directory(self.path)
        with (self.path / "sync.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fail("another phivault-agent sync is running on this spool")
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


_state: dict[str, Home] = {}


def home() -> Home:
    return _state["home"]


def _version(value: bool) -> None:  # noqa: FBT001  # typer callback signature
    if value:
        try:
            number = version("phivault")
        except PackageNotFoundError:
            number = "0.0.0"
        typer.echo(f"phivault-agent {number}")
        raise typer.Exit


@app.callback()
def _main(
    home_dir: Annotated[
        Path,
        typer.Option(
            "--home",
            envvar="PHIVAULT_AGENT_HOME",
            help="Where the agent keeps its key, settings and spool.",
        ),
    ] = Path("~/.phivault-agent"),
    retain_days: Annotated[
        int,
        typer.Option(
            "--retain-days",
            envvar="PHIVAULT_AGENT_RETAIN_DAYS",
            min=0,
            max=3650,
            help="Forget confirmed items this many days after the server confirmed them.",
        ),
    ] = 30,
    version_flag: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    del version_flag
    _state["home"] = Home(home_dir.expanduser().absolute(), timedelta(days=retain_days))


def _spool_tidied() -> Spool:
    spool = home().spool()
    spool.tidy(now(), home().retain)
    return spool


# -- activate ---------------------------------------------------------------------------------


@app.command()
def activate(  # noqa: PLR0913, PLR0917  # one option per fact activation needs
    server: Annotated[str, typer.Option(help="phivault's address, https://…")],
    code: Annotated[str, typer.Option(help="The activation code from your institution's admin.")],
    ca_cert: Annotated[
        Path | None,
        typer.Option("--ca-cert", exists=True, dir_okay=False, help="Trust this CA (PEM) for the server."),
    ] = None,
    pin: Annotated[
        str | None,
        typer.Option(
            help="The server certificate pin given with the code (sha256//…).", rich_help_panel=None
        ),
    ] = None,
    serial: Annotated[str | None, typer.Option(help="This device's serial number.")] = None,
    algorithm: Annotated[str, typer.Option(help="Key type: EdDSA (Ed25519) or ES256 (P-256).")] = "EdDSA",
    force: Annotated[bool, typer.Option("--force", help="Activate again with a new key.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Make a key pair here (the private key never leaves the device) and register its
    public key with the server using a single-use activation code.
    """
    import re  # noqa: PLC0415  # only here

    if algorithm not in ALGORITHMS:
        fail(f"--algorithm is one of {', '.join(ALGORITHMS)}", code=2)
    if pin is not None and not re.fullmatch(_PIN_PATTERN, pin):
        fail("--pin looks like sha256//<44 characters of base64>", code=2)
    if not server.startswith("https://"):
        fail("--server must be an https:// URL", code=2)
    place = home()
    private_directory(place.path)
    if place.config_file.exists() and not force:
        fail("this device is activated already (use --force to activate again with a new key)")
    key = DeviceKey.generate(algorithm)
    client = ServerClient(server, key, ca_file=ca_cert, pins=frozenset({pin}) if pin else frozenset())
    try:
        answer = client.activate(code, serial)
    except ServerError as exc:
        fail(f"activation refused: {exc.code}" + (f" ({exc.detail})" if exc.detail else ""))
    except httpx.TransportError as exc:
        fail(_transport_message(exc))
    finally:
        client.close()
    seen_pin = client.context.seen_pin
    key.save(place.key_file)
    if ca_cert is not None:
        shutil.copyfile(ca_cert, place.ca_file)
        place.ca_file.chmod(0o600)
    config = {
        "server": client.server,
        "device_id": answer["device_id"],
        "institution_id": answer["institution_id"],
        "pins": [seen_pin] if seen_pin else [],
        "ca_file": ca_cert is not None,
        "algorithm": key.algorithm,
        "key_thumbprint": key.thumbprint,
        "activated_at": now().isoformat(),
    }
    write_private(place.config_file, json.dumps(config, indent=2).encode())
    place.spool()
    summary = {
        key: config[key] for key in ("device_id", "institution_id", "server", "pins", "key_thumbprint")
    }
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        out.print(
            f"activated device {answer['device_id']} with {client.server}", markup=False, highlight=False
        )
        out.print(f"server certificate pinned: {seen_pin}", markup=False, highlight=False)


def _transport_message(exc: httpx.TransportError) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, PinMismatch):
            detail = cause.args[0] if cause.args else ""
            return f"the server's certificate does not match the pin: {detail}"
        cause = cause.__cause__ or cause.__context__
    return f"cannot reach the server: {exc}"


# -- add --------------------------------------------------------------------------------------


@app.command()
def add(
    files: Annotated[
        list[Path], typer.Argument(exists=True, dir_okay=False, readable=True, help="Exam files (DICOM).")
    ],
    json_output: JsonFlag = False,
) -> None:
    """Queue files: each is copied into the encrypted spool. Needs no network. The files
    themselves are left where they are.
    """
    spool = _spool_tidied()
    queued = {item.sha256: item for item in spool.items() if item.state == State.QUEUED}
    added = []
    for path in files:
        try:
            with path.open("rb") as source:
                item = spool.add(source, now())
        except OSError as exc:
            fail(f"cannot queue {path}: {exc.strerror or exc}")
        if item.sha256 in queued:
            spool.forget(item)  # the same content is queued already: nothing duplicated
            item = queued[item.sha256]
            added.append({"id": item.id, "size": item.size, "sha256": item.sha256, "already_queued": True})
            continue
        queued[item.sha256] = item
        added.append({"id": item.id, "size": item.size, "sha256": item.sha256, "already_queued": False})
    if json_output:
        typer.echo(json.dumps({"queued": added}))
        return
    for entry in added:
        note = " (already queued)" if entry["already_queued"] else ""
        out.print(f"queued {entry['id']} ({entry['size']} bytes){note}", markup=False, highlight=False)


# -- sync -------------------------------------------------------------------------------------


class _Bar(Progress):
    def __init__(self, bar: RichBar) -> None:
        self.bar = bar
        self.tasks: dict[str, TaskID] = {}

    def start(self, item: Item, offset: int) -> None:
        if item.id not in self.tasks:
            self.tasks[item.id] = self.bar.add_task(item.id[:8], total=item.size)
        self.bar.update(self.tasks[item.id], completed=offset)

    def advance(self, item: Item, sent: int) -> None:
        self.bar.advance(self.tasks[item.id], sent)

    def finish(self, item: Item, result: ItemResult) -> None:
        task = self.tasks.get(item.id)
        if task is not None:
            label = f"{item.id[:8]} {result.state}" + (f" ({result.error})" if result.error else "")
            self.bar.update(task, description=label)


@app.command()
def sync(  # one option per knob of the transfer
    json_output: JsonFlag = False,
    chunk_size: Annotated[
        int, typer.Option(min=64 * 1024, max=256 * 1024 * 1024, help="Bytes per request.")
    ] = DEFAULT_CHUNK,
    max_attempts: Annotated[int, typer.Option(min=1, max=1000, help="Tries per item in this run.")] = 8,
    max_backoff: Annotated[float, typer.Option(min=0.0, help="Longest wait between tries, seconds.")] = 60.0,
    max_rate: Annotated[
        float | None, typer.Option(min=1.0, help="Send at most this many bytes per second.")
    ] = None,
) -> None:
    """Upload the queue; resumes where the server is; deletes each local copy once the
    server's receipt digest matches. Exit 1 if anything is left unconfirmed.
    """
    place = home()
    with place.sync_lock():
        spool = _spool_tidied()
        client = place.client()
        options = SyncOptions(
            chunk_size=chunk_size,
            max_attempts=max_attempts,
            base_backoff=min(1.0, max_backoff),
            max_backoff=max_backoff,
            max_rate=max_rate,
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        try:
            with RichBar(*columns, console=err, disable=json_output) as bar:
                report = Syncer(spool, client, options, _Bar(bar), now=now).run()
        except SpoolError as exc:
            fail(str(exc))
        finally:
            client.close()
    summary = report.as_json()
    if json_output:
        typer.echo(json.dumps(summary))
    else:
        out.print(
            f"{summary['confirmed']} confirmed, {summary['rejected']} refused by the server, "
            f"{summary['unconfirmed']} still queued; "
            f"{summary['bytes_sent']} bytes sent in {summary['seconds']} s",
            markup=False,
            highlight=False,
        )
        for item in report.items:
            if item.error:
                out.print(f"  {item.id}: {item.error}", markup=False, highlight=False)
    if summary["unconfirmed"] or summary["rejected"]:
        raise typer.Exit(1)


# -- status -----------------------------------------------------------------------------------


@app.command()
def status(
    json_output: JsonFlag = False,
    warn_hours: Annotated[
        float, typer.Option(min=0.0, help="Warn about items unconfirmed for longer than this.")
    ] = 24.0,
) -> None:
    """What is queued, confirmed and refused; warns about items waiting too long."""
    place = home()
    spool = _spool_tidied()
    moment = now()
    items = spool.items()
    warnings = []
    old = [i for i in items if i.state == State.QUEUED and moment - i.added > timedelta(hours=warn_hours)]
    if old:
        oldest = max(moment - i.added for i in old)
        warnings.append(
            f"{len(old)} item(s) not confirmed by the server for more than {warn_hours:g} h "
            f"(oldest {oldest.total_seconds() / 3600:.1f} h): connect the device and run phivault-agent sync"
        )
    refused = [i for i in items if i.state == State.REJECTED]
    if refused:
        warnings.append(
            f"{len(refused)} item(s) refused by the server; they stay until phivault-agent purge --rejected"
        )
    config = json.loads(place.config_file.read_bytes()) if place.config_file.exists() else None
    rows = [
        {
            "id": i.id,
            "state": i.state,
            "size": i.size,
            "sha256": i.sha256,
            "added_at": i.added_at,
            "confirmed_at": i.confirmed_at,
            "attempts": i.attempts,
            "last_error": i.last_error,
            "receipt_status": (i.receipt or {}).get("status"),
        }
        for i in items
    ]
    if json_output:
        report = {
            "activated": config is not None,
            "device_id": config.get("device_id") if config else None,
            "server": config.get("server") if config else None,
            "queued": sum(1 for i in items if i.state == State.QUEUED),
            "confirmed": sum(1 for i in items if i.state == State.CONFIRMED),
            "rejected": len(refused),
            "warnings": warnings,
            "items": rows,
        }
        typer.echo(json.dumps(report))
        return
    if config is None:
        out.print("not activated yet (phivault-agent activate)")
    else:
        out.print(f"device {config['device_id']} of {config['server']}", markup=False, highlight=False)
    table = Table(title="spool")
    for column in ("id", "state", "bytes", "added", "note"):
        table.add_column(column)
    for i in items:
        note = i.last_error or (i.receipt or {}).get("status") or ""
        table.add_row(i.id, i.state, str(i.size), i.added_at[:19], str(note))
    out.print(table)
    for warning in warnings:
        err.print(f"warning: {warning}", markup=False, highlight=False)


# -- purge ------------------------------------------------------------------------------------


@app.command()
def purge(
    rejected: Annotated[
        bool, typer.Option("--rejected", help="Also delete items the server refused (their local copies).")
    ] = False,
    everything: Annotated[
        bool,
        typer.Option("--all", help="Delete every item, unconfirmed ones too (their data is lost here)."),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm --all.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Forget confirmed items now; --rejected and --all delete more, never silently."""
    if everything and not yes:
        fail("--all deletes exams the server has not confirmed; add --yes if you mean it", code=2)
    spool = home().spool()
    removed = {State.CONFIRMED: 0, State.REJECTED: 0, State.QUEUED: 0}
    for item in spool.items():
        if (
            item.state == State.CONFIRMED
            or (item.state == State.REJECTED and (rejected or everything))
            or everything
        ):
            spool.forget(item)
            removed[item.state] += 1
    if json_output:
        typer.echo(json.dumps({"removed": removed}))
    else:
        out.print(
            f"removed {removed[State.CONFIRMED]} confirmed, {removed[State.REJECTED]} refused and "
            f"{removed[State.QUEUED]} unconfirmed item(s)",
            markup=False,
            highlight=False,
        )


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
