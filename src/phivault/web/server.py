"""``phivault serve``: HTTPS only, through uvicorn with phivault's own TLS context."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn

from phivault.config.tls import server_context
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
    log.info("phivault serving https://%s:%d (profile %s)", _url_host(host), port, settings.profile)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler
    # that was installed before it. This one makes that a normal exit (status 0), which
    # is what service managers expect after a requested stop.
    previous = signal.signal(signal.SIGTERM, _stopped_on_request)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("phivault stopped")


def _stopped_on_request(_signum: int, _frame: FrameType | None) -> None:
    log.info("stop requested (SIGTERM); in-flight requests finished")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
