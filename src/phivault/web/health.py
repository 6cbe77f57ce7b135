"""Liveness and readiness, for load balancers and orchestrators."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError

from phivault.http.deps import Public, RuntimeDep
from phivault.http.problems import Problem
from phivault.storage.errors import StorageError

router = APIRouter(tags=["health"])

CheckState = Literal["ok", "unavailable"]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok"]
    checks: dict[str, CheckState]


@router.get("/healthz", response_model=Health, dependencies=[Public])
async def healthz() -> Health:
    """The process is up and answering (it does not look at its dependencies).

    ``async``: answered on the event loop, not queued behind work in the thread pool (a
    burst of sign-ins hashing passwords), so it measures whether the loop is responsive.
    """
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    dependencies=[Public],
    responses={503: {"description": "a dependency is unavailable (problem+json with `checks`)"}},
)
def readyz(runtime: RuntimeDep) -> Readiness:
    """Ready to serve: both databases answer and the object store accepts a write."""
    checks: dict[str, CheckState] = {}
    for name, db in (("database", runtime.db), ("phi_database", runtime.phi_db)):
        try:
            db.ping()
            checks[name] = "ok"
        except SQLAlchemyError:
            checks[name] = "unavailable"
    try:
        runtime.store.probe()
        checks["object_store"] = "ok"
    except StorageError:
        checks["object_store"] = "unavailable"
    if any(state != "ok" for state in checks.values()):
        raise Problem(
            503, "not_ready", "a dependency is unavailable", headers={"Retry-After": "5"}, checks=checks
        )
    return Readiness(status="ok", checks=checks)
