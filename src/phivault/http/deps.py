"""Dependencies shared by routes, as ``Annotated`` aliases (routes stay three lines)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute

from phivault.accounts.errors import Forbidden, MfaEnrolmentRequired, PasswordChangeRequired, Unauthenticated
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.accounts.service import PENDING_MFA_ENROLMENT, PENDING_PASSWORD_CHANGE, Authentication
from phivault.audit.service import RequestContext
from phivault.devices.errors import TokenRequiresDpop
from phivault.devices.service import ProofTarget, is_device
from phivault.runtime import Runtime


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


# -- request context and access control (accounts) -----------------------------------------

PUBLIC = "public"
AUTHENTICATED = "authenticated"
ACCESS_EXTENSION = "x-phivault-permission"
_ACCESS: dict[Callable[..., object], str] = {}
"""Dependency → the access level it declares; read by ``document_access`` for OpenAPI."""


async def public() -> None:
    """Declares a route open to anyone (the route-matrix test expects no 401/403 there).

    ``async`` like ``_request_context``: a sync dependency takes a thread-pool slot, and
    ``/healthz`` must not wait behind a burst of sign-ins for one.
    """


_ACCESS[public] = PUBLIC
Public = Depends(public)
"""``dependencies=[Public]`` on a route that needs no sign-in."""


async def _request_context(request: Request) -> RequestContext:
    state: dict[str, Any] = request.scope.get("state") or {}
    return RequestContext(
        ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
        request_id=state.get("request_id"),
    )


RequestContextDep = Annotated[RequestContext, Depends(_request_context)]

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An access token from `POST /api/v1/auth/login` (or `/mfa/verify`, `/refresh`).",
)


_dpop = APIKeyHeader(
    name="DPoP",
    auto_error=False,
    scheme_name="dpop",
    description="Devices: `Authorization: DPoP <token>` and a DPoP proof (RFC 9449) signed by the "
    "device's key, from `POST /api/v1/devices/activate` or `/devices/token`.",
)


def proof_target(request: Request, runtime: Runtime) -> ProofTarget:
    """What a DPoP proof of this request must name: its method and URL, as received or as
    reached through ``PHIVAULT_PUBLIC_URL`` (RFC 9449 §4.3 steps 8-9).
    """
    public = runtime.settings.public_url.rstrip("/") + request.url.path
    return ProofTarget.of(request.method, str(request.url), public)


def _authentication(
    request: Request,
    runtime: RuntimeDep,
    context: RequestContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    proof: Annotated[str | None, Depends(_dpop)],
) -> Authentication:
    del proof  # read with every DPoP header below; declared for the OpenAPI document
    scheme, _, token = (request.headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "dpop":
        device = runtime.devices.authenticate(
            token.strip(), request.headers.getlist("dpop"), proof_target(request, runtime), context
        )
        request.state.dpop_nonce = device.nonce
        return Authentication(device.principal, frozenset())
    if credentials is None:
        raise Unauthenticated
    try:
        return runtime.accounts.authenticate(credentials.credentials, context)
    except Unauthenticated:
        # RFC 9449 §7.2: a DPoP-bound token must not be accepted as a bearer token.
        if runtime.devices.is_device_token(credentials.credentials):
            raise TokenRequiresDpop from None
        raise


def _authenticated_principal(
    authentication: Annotated[Authentication, Depends(_authentication)],
) -> Principal:
    """A user past set-up (password change, MFA enrolment), or a device."""
    if PENDING_PASSWORD_CHANGE in authentication.pending:
        raise PasswordChangeRequired
    if PENDING_MFA_ENROLMENT in authentication.pending:
        raise MfaEnrolmentRequired
    return authentication.principal


def _setup_principal(authentication: Annotated[Authentication, Depends(_authentication)]) -> Principal:
    if is_device(authentication.principal):
        raise Forbidden("this route is for people; devices use the device API")
    return authentication.principal


def _current_principal(principal: Annotated[Principal, Depends(_authenticated_principal)]) -> Principal:
    if is_device(principal):
        raise Forbidden("this route is for people; devices use the device API")
    return principal


def _device_principal(
    request: Request, response: Response, principal: Annotated[Principal, Depends(_authenticated_principal)]
) -> Principal:
    if not is_device(principal):
        raise Forbidden("only activated devices use this route (Authorization: DPoP)")
    nonce = getattr(request.state, "dpop_nonce", None)
    if nonce:
        response.headers["DPoP-Nonce"] = nonce  # RFC 9449 §8.2: the next nonce to use
    return principal


DEVICE = "device"
_ACCESS[_current_principal] = AUTHENTICATED
_ACCESS[_setup_principal] = AUTHENTICATED
_ACCESS[_device_principal] = DEVICE

CurrentPrincipal = Annotated[Principal, Depends(_current_principal)]
"""The signed-in user (Bearer token), or a 401 ``unauthorized`` problem; devices get 403."""

SetupPrincipal = Annotated[Principal, Depends(_setup_principal)]
"""Like ``CurrentPrincipal``, but also while a password change or MFA enrolment is due:
only for the routes that carry those steps out (and sign-out)."""

DevicePrincipal = Annotated[Principal, Depends(_device_principal)]
"""An activated device (``Authorization: DPoP`` and a proof); users get 403 ``forbidden``."""


def require(permission: Permission) -> Callable[[Principal], Principal]:
    """A dependency: the signed-in principal if it holds ``permission``, else 403.

    Use as ``Annotated[Principal, Depends(require(Permission.USER_MANAGE))]``. Services
    check again and scope by institution; this makes the route's need visible (OpenAPI
    ``x-phivault-permission``) and refuses early.
    """

    def dependency(principal: Annotated[Principal, Depends(_authenticated_principal)]) -> Principal:
        if not principal.has(permission):
            raise Forbidden
        return principal

    _ACCESS[dependency] = permission.value
    return dependency


def route_access(dependant: Dependant) -> str | None:
    """The access a route declares: ``public``, ``authenticated``, ``device`` or its
    permission(s) (comma-separated); ``None`` when it declares nothing, ``conflict`` when
    both public and protected.
    """
    found: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        if current.call is not None and current.call in _ACCESS:
            found.add(_ACCESS[current.call])
        stack.extend(current.dependencies)
    if PUBLIC in found and len(found) > 1:
        return "conflict"
    permissions = found - {PUBLIC, AUTHENTICATED, DEVICE}
    if permissions:
        return ",".join(sorted(permissions))
    if DEVICE in found:
        return DEVICE
    return next(iter(found), None)


def document_access(schema: dict[str, Any], routes: Sequence[BaseRoute]) -> dict[str, Any]:
    """Write each operation's declared access into the OpenAPI document."""
    paths = schema.get("paths", {})
    # Included routers are not flattened into app.routes (FastAPI ≥ 0.16x): walk their
    # effective routes, whose dependant includes router-level dependencies.
    for route in iter_route_contexts(routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        access = route_access(route.dependant) or "undeclared"
        for method in route.methods or ():
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is not None:
                operation[ACCESS_EXTENSION] = access
    return schema
