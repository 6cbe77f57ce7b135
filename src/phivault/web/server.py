"""``phivault serve``: HTTPS only, through uvicorn with phivault's own TLS context."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from phivault.config.tls import server_context
from phivault.dicom.scp import StoreScp, build_scp
from phivault.runtime import Runtime
from phivault.web.app import create_app
from phivault.web.protocol import protocol_with_deadline

log = logging.getLogger(__name__)

KEEP_ALIVE_SECONDS = 5
GRACEFUL_SHUTDOWN_SECONDS = 20


def run_server(runtime: Runtime, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight requests and stop the worker."""
    settings = runtime.settings
    context = server_context(settings.cert_path, settings.key_path)
    config = uvicorn.Config(
        create_app(runtime),
        host=host,
        port=port,
        lifespan="on",
        log_config=None,  # phivault configures logging; uvicorn's access log is off
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        http=protocol_with_deadline(settings.http_header_timeout_seconds),
        limit_concurrency=settings.http_max_connections,
        loop="uvloop",
    )
    config.load()
    # uvicorn builds its SSL context from file names only; ours enforces the TLS policy.
    config.ssl = context
    # The DICOM receiver listens first: should its port be taken, serve stops here.
    scp = _start_scp(runtime)
    log.info("phivault serving https://%s:%d (profile %s)", _url_host(host), port, settings.profile)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler
    # that was installed before it. This one makes that a normal exit (status 0), which
    # is what service managers expect after a requested stop.
    previous = signal.signal(signal.SIGTERM, _stopped_on_request)
    try:
        _Server(config, on_shutdown=scp.stop_accepting if scp is not None else None).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if scp is not None:
            scp.stop()  # associations in progress get a few seconds to finish
    log.info("phivault stopped")


def _start_scp(runtime: Runtime) -> StoreScp | None:
    if not runtime.settings.dicom_scp_enabled:
        return None
    scp = build_scp(runtime.settings, ingest=runtime.ingest, db=runtime.db, clock=runtime.clock)
    scp.start()
    return scp


class _Server(uvicorn.Server):
    """uvicorn's server; when it begins to shut down, the DICOM listener closes too."""

    def __init__(self, config: uvicorn.Config, *, on_shutdown: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._on_shutdown is not None:
            await asyncio.to_thread(self._on_shutdown)
        await super().shutdown(sockets)


def _stopped_on_request(_signum: int, _frame: FrameType | None) -> None:
    log.info("stop requested (SIGTERM); in-flight requests finished")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
