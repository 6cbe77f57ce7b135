"""``phivault-agent``: the device-side uploader.

Its commands (activate, add, sync, status, purge) arrive with device activation; this
entry point exists so the installed command and its help are stable from the start.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

app = typer.Typer(
    name="phivault-agent",
    help="Upload exams from a device to phivault (offline-first, encrypted local spool).",
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:  # noqa: FBT001  # typer callback signature
    if value:
        try:
            number = version("phivault")
        except PackageNotFoundError:
            number = "0.0.0"
        typer.echo(f"phivault-agent {number}")
        raise typer.Exit


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    version_flag: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    del version_flag
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)


def main() -> None:
    app()
