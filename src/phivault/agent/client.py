"""The agent's connection to phivault: HTTPS with the server's certificate checked against
a CA and pinned, DPoP proofs on every request, tokens and server nonces (RFC 9449).

The pin (``sha256//<base64 SHA-256 of the certificate's SubjectPublicKeyInfo>``, curl's
``--pinnedpubkey`` form) is checked inside the TLS handshake, before a single byte of a
request is sent: a man in the middle with a certificate the device would otherwise trust
never sees the activation code or an exam.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from phivault.agent.keys import DeviceKey

TUS_VERSION: Final = "1.0.0"
TOKEN_MARGIN: Final = 30.0  # seconds: ask for a new token this long before it runs out


class ServerError(Exception):
    """A problem answer (RFC 9457) from the server, or no answer at all."""

    def __init__(
        self, status: int, code: str, detail: str = "", headers: httpx.Headers | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {detail}" if detail else f"{status} {code}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or httpx.Headers()


class PinMismatch(ssl.SSLError):
    """The server's certificate is not the pinned one."""


def certificate_pin(der: bytes) -> str:
    certificate = x509.load_der_x509_certificate(der)
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


class _PinnedSocket(ssl.SSLSocket):
    """Checks the pin as soon as the handshake is done (httpcore wraps sockets with it)."""

    def do_handshake(self, block: bool = False) -> None:  # noqa: FBT001, FBT002  # ssl's signature
        super().do_handshake(block)
        context = self.context
        if not isinstance(context, PinnedContext):
            return
        der = self.getpeercert(binary_form=True)
        if der is None:
            raise PinMismatch("the server sent no certificate")
        pin = certificate_pin(der)
        context.seen_pin = pin
        if context.pins and pin not in context.pins:
            self.close()
            raise PinMismatch(f"the server's certificate {pin} is not the pinned one")


class PinnedContext(ssl.SSLContext):
    """A client TLS context (1.2+, hostname and chain verified) that also enforces pins."""

    pins: frozenset[str]
    seen_pin: str | None

    @classmethod
    def create(cls, ca_file: Path | None, pins: frozenset[str]) -> PinnedContext:
        context = cls(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        if ca_file is not None:
            context.load_verify_locations(cafile=str(ca_file))
        else:
            context.load_default_certs()
        context.sslsocket_class = _PinnedSocket
        context.pins = pins
        context.seen_pin = None
        return context


@dataclass
class Token:
    value: str
    expires_at: float


class ServerClient:
    """One device's session with the server: signs a proof for every request, keeps the
    newest server nonce and a token, and retries once when the server asks for a nonce
    (``use_dpop_nonce``) or the token ran out (``invalid_token``).
    """

    def __init__(  # connection settings, named at the call sites
        self,
        server: str,
        key: DeviceKey,
        *,
        ca_file: Path | None,
        pins: frozenset[str],
        timeout: float = 60.0,
        user_agent: str = "phivault-agent",
    ) -> None:
        if not server.startswith("https://"):
            msg = "the server URL must start with https://"
            raise ValueError(msg)
        self.server = server.rstrip("/")
        self.key = key
        self.context = PinnedContext.create(ca_file, pins)
        self.http = httpx.Client(
            base_url=self.server,
            verify=self.context,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            headers={"User-Agent": user_agent},
            follow_redirects=False,
        )
        self.nonce: str | None = None
        self.token: Token | None = None

    def close(self) -> None:
        self.http.close()

    def url(self, path: str) -> str:
        return path if path.startswith("https://") else self.server + path

    # -- requests ----------------------------------------------------------------------------

    def request(  # a request's parts
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        json: Any = None,  # noqa: ANN401  # a JSON body
        body: Callable[[], Iterable[bytes]] | None = None,
        authenticated: bool = True,
    ) -> httpx.Response:
        """Send one request with a fresh proof; retried once for a nonce or a new token
        (``body`` makes the streamed body again for each try).
        """
        url = self.url(path)
        response: httpx.Response | None = None
        for attempt in range(3):
            token = self._token() if authenticated else None
            sent = dict(headers or {})
            sent["DPoP"] = self.key.proof(method, url, token=token, nonce=self.nonce)
            if token is not None:
                sent["Authorization"] = f"DPoP {token}"
            content = body() if body is not None else None
            response = self.http.request(method, url, headers=sent, json=json, content=content)
            if "dpop-nonce" in response.headers:
                self.nonce = response.headers["dpop-nonce"]
            code = _problem_code(response) if response.status_code == 401 else None  # noqa: PLR2004
            if code == "use_dpop_nonce" and attempt < 2:  # noqa: PLR2004
                continue
            if code == "invalid_token" and authenticated and attempt < 2:  # noqa: PLR2004
                self.token = None
                continue
            return response
        assert response is not None  # noqa: S101  # nosec B101  # type narrowing: the loop ran at least once
        return response

    def _token(self) -> str:
        if self.token is None or self.token.expires_at - time.monotonic() < TOKEN_MARGIN:
            answer = self.request("POST", "/api/v1/devices/token", authenticated=False)
            body = expect(answer, 200)
            self.token = Token(body["access_token"], time.monotonic() + float(body["expires_in"]))
        return self.token.value

    # -- activation ------------------------------------------------------------------------------

    def activate(self, code: str, serial: str | None) -> dict[str, Any]:
        """Register this device's key with an activation code; returns the server's answer.

        The pin of the certificate seen is sent along, so a proxy that re-encrypts the
        connection with its own certificate is refused by the server too.
        """
        self.http.get("/healthz")  # the TLS handshake, with the pin check, happens here
        body: dict[str, Any] = {"code": code, "tls_pin": self.context.seen_pin}
        if serial:
            body["serial"] = serial
        answer = expect(self.request("POST", "/api/v1/devices/activate", json=body, authenticated=False), 200)
        self.token = Token(answer["access_token"], time.monotonic() + float(answer["expires_in"]))
        return answer

    # -- uploads (tus 1.0) ---------------------------------------------------------------------

    def create_upload(self, length: int, client_ref: str) -> tuple[str, int]:
        """Open (or find again, by ``client_ref``) an upload; returns its URL and offset."""
        metadata = "client-ref " + base64.b64encode(client_ref.encode("ascii")).decode("ascii")
        headers = {"Tus-Resumable": TUS_VERSION, "Upload-Length": str(length), "Upload-Metadata": metadata}
        response = self.request("POST", "/api/v1/uploads", headers=headers)
        if response.status_code not in (200, 201):
            raise _error(response)
        return self.url(response.headers["location"]), int(response.headers["upload-offset"])

    def offset(self, upload_url: str) -> int:
        response = self.request("HEAD", upload_url, headers={"Tus-Resumable": TUS_VERSION})
        if response.status_code != 200:  # noqa: PLR2004
            raise _error(response)
        return int(response.headers["upload-offset"])

    def send_chunk(
        self, upload_url: str, offset: int, length: int, checksum: bytes, body: Callable[[], Iterable[bytes]]
    ) -> int:
        """PATCH ``length`` bytes that ``body()`` yields (its SHA-256 is ``checksum``),
        streamed; returns the server's new offset.
        """
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(length),
            "Upload-Offset": str(offset),
            "Upload-Checksum": "sha256 " + base64.b64encode(checksum).decode("ascii"),
        }
        response = self.request("PATCH", upload_url, headers=headers, body=body)
        if response.status_code != 204:  # noqa: PLR2004
            raise _error(response)
        return int(response.headers["upload-offset"])

    def finalize(self, upload_url: str, sha256: str) -> dict[str, Any]:
        response = self.request("POST", upload_url + "/finalize", json={"sha256": sha256})
        return expect(response, 200)


def _problem_code(response: httpx.Response) -> str | None:
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        try:
            code = response.json().get("code")
        except ValueError:
            return None
        return code if isinstance(code, str) else None
    return None


def _error(response: httpx.Response) -> ServerError:
    code = _problem_code(response) or f"http_{response.status_code}"
    detail = ""
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        try:
            detail = str(response.json().get("detail") or "")
        except ValueError:
            detail = ""
    return ServerError(response.status_code, code, detail, response.headers)


def expect(response: httpx.Response, status: int) -> dict[str, Any]:
    if response.status_code != status:
        raise _error(response)
    body: dict[str, Any] = response.json()
    return body
