"""The FastAPI app factory."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from phivault import __version__
from phivault.accounts import api as accounts_api
from phivault.audit import api as audit_api
from phivault.devices import api as devices_api
from phivault.dicom import api as dicom_api
from phivault.dicom import qido, wado
from phivault.exams import api as exams_api
from phivault.exams import export_api, ingest_api, share_api
from phivault.http.deps import Public, document_access
from phivault.http.problems import document_problems, install_problem_handlers
from phivault.runtime import Runtime
from phivault.web import health
from phivault.web.headers import STATIC_PREFIX, SecurityHeadersMiddleware

log = logging.getLogger(__name__)

_DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>phivault API</title>
<link rel="stylesheet" href="{static}swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{static}swagger-ui-bundle.js"></script>
<script src="{static}local/docs.js"></script></body></html>
"""


def create_app(runtime: Runtime) -> FastAPI:
    """Build the app around an already initialised ``runtime``."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        thread: threading.Thread | None = None
        if runtime.settings.run_worker:
            worker = runtime.new_worker()
            thread = threading.Thread(target=worker.run_forever, args=(stop,), name="job-worker", daemon=True)
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=runtime.settings.job_lease_seconds)

    app = FastAPI(
        title="phivault",
        version=__version__,
        summary="Cloud for medical-device exams: de-identified images, PHI kept apart and encrypted.",
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_problem_handlers(app)
    app.add_middleware(SecurityHeadersMiddleware, hsts_max_age=runtime.settings.hsts_max_age)
    app.include_router(health.router)
    app.include_router(audit_api.router)
    app.include_router(accounts_api.router)
    app.include_router(devices_api.router)
    app.include_router(dicom_api.router)
    app.include_router(dicom_api.nodes_router)
    app.include_router(ingest_api.router)
    app.include_router(qido.router)
    app.include_router(wado.router)
    app.include_router(exams_api.router)
    app.include_router(share_api.router)
    app.include_router(share_api.public_router)
    app.include_router(export_api.router)
    app.include_router(export_api.destinations_router)
    _mount_docs(app)
    _document_problems(app)
    return app


def _document_problems(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_access(document_problems(generate()), app.routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise


def _mount_docs(app: FastAPI) -> None:
    # Swagger UI is served from the installed package, not a CDN: the server may have no
    # internet access, and a third-party script on an admin page is a supply-chain risk.
    bundle = StaticFiles(directory=swagger_ui_bundle.swagger_ui_path)
    ours = StaticFiles(directory=Path(__file__).parent / "static")
    app.mount(STATIC_PREFIX + "local", ours, name="docs-local")
    app.mount(STATIC_PREFIX.rstrip("/"), bundle, name="docs-static")
    page = _DOCS_HTML.format(static=STATIC_PREFIX)

    @app.get("/api/docs", include_in_schema=False, dependencies=[Public])
    def docs() -> HTMLResponse:
        return HTMLResponse(page)
