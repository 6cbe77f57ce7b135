"""DPoP proofs (RFC 9449): parsing and signature checks, thumbprints, server nonces.

Nothing here touches the database or the clock: ``parse_proof`` checks what a proof says
about itself (§4.3 steps 2-7: a well-formed JWS of type ``dpop+jwt`` with an asymmetric
algorithm we allow, signed by the public key in its ``jwk`` header); the devices service
checks the rest against the request, the clock, the replay cache and the token.

Algorithms: EdDSA (Ed25519, RFC 8037) and ES256 (P-256, RFC 7518 §3.4). ``none``, MACs and
RSA are refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import jwt
from jwt.exceptions import InvalidKeyError, PyJWKError, PyJWTError

from phivault.devices.errors import ProofInvalid

ALGORITHMS: Final = ("EdDSA", "ES256")
PROOF_TYPE: Final = "dpop+jwt"
MAX_PROOF_LENGTH: Final = 4096
MAX_JTI_LENGTH: Final = 128
_KEY_TYPES: Final = {"EdDSA": ("OKP", "Ed25519"), "ES256": ("EC", "P-256")}
# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS: Final = {
    "OKP": ("crv", "kty", "x"),
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
}
_PRIVATE_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi", "k")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK SHA-256 thumbprint, base64url without padding (the ``jkt``)."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or any(not isinstance(jwk.get(name), str) for name in members):
        raise ProofInvalid
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(token: str) -> str:
    """The ``ath`` claim: base64url(SHA-256(ASCII token)) (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii", errors="replace")).digest())


def normalise_htu(url: str) -> str:
    """The URI a proof names, for comparison (RFC 9449 §4.3 step 9, RFC 3986 §6.2.2-3):
    scheme and host in lower case, default port dropped, query and fragment ignored.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        return ""
    default = {"https": 443, "http": 80}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", "", ""))


@dataclass(frozen=True, slots=True)
class DpopProof:
    """A proof whose signature verified with its own ``jwk``; claims not yet judged."""

    jkt: str
    jwk: dict[str, Any]
    algorithm: str
    jti: str
    htm: str
    htu: str
    iat: float
    ath: str | None
    nonce: str | None


def parse_proof(proof: str) -> DpopProof:
    """Verify a proof's form and signature (RFC 9449 §4.3 steps 2-7); ``ProofInvalid`` else.

    The answer never says which check failed: a caller learns nothing about its forgery.
    """
    if not proof or len(proof) > MAX_PROOF_LENGTH or proof.count(".") != 2:  # noqa: PLR2004  # a JWS has three parts
        raise ProofInvalid
    try:
        header = jwt.get_unverified_header(proof)
    except PyJWTError:
        raise ProofInvalid from None
    algorithm, jwk = header.get("alg"), header.get("jwk")
    if header.get("typ") != PROOF_TYPE or algorithm not in ALGORITHMS or not isinstance(jwk, dict):
        raise ProofInvalid
    kty, crv = _KEY_TYPES[algorithm]
    if jwk.get("kty") != kty or jwk.get("crv") != crv or any(name in jwk for name in _PRIVATE_MEMBERS):
        raise ProofInvalid
    try:
        key = jwt.PyJWK(jwk, algorithm)
        claims = jwt.decode(
            proof,
            key=key,
            algorithms=[algorithm],
            # Time is judged by the service with the injected clock, not PyJWT's wall clock.
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except (PyJWTError, PyJWKError, InvalidKeyError, ValueError, TypeError):
        raise ProofInvalid from None
    return _proof_of(claims, jwk, algorithm)


def _proof_of(claims: dict[str, Any], jwk: dict[str, Any], algorithm: str) -> DpopProof:
    jti, htm, htu, iat = claims.get("jti"), claims.get("htm"), claims.get("htu"), claims.get("iat")
    ath, nonce = claims.get("ath"), claims.get("nonce")
    if (
        not isinstance(jti, str)
        or not 1 <= len(jti) <= MAX_JTI_LENGTH
        or not isinstance(htm, str)
        or not isinstance(htu, str)
        or isinstance(iat, bool)
        or not isinstance(iat, int | float)
        or (ath is not None and not isinstance(ath, str))
        or (nonce is not None and not isinstance(nonce, str))
    ):
        raise ProofInvalid
    public = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[str(jwk["kty"])]}
    return DpopProof(
        jkt=jwk_thumbprint(jwk),
        jwk=public,
        algorithm=algorithm,
        jti=jti,
        htm=htm,
        htu=htu,
        iat=float(iat),
        ath=ath,
        nonce=nonce,
    )


# -- server nonces (RFC 9449 §8) -----------------------------------------------------------

_NONCE_VERSION: Final = b"\x01"
_NONCE_MAC_BYTES: Final = 16
_NONCE_LABEL: Final = b"phivault/dpop-nonce/"


class NonceMaker:
    """Stateless server nonces: ``version ‖ uint64 issue time ‖ HMAC-SHA256(key, …)[:16]``.

    Any replica holding the same key (``device_secret_keys``) checks any other's nonces;
    nothing is stored per nonce. A nonce is valid for ``lifetime`` seconds; the current
    one changes every half lifetime, so a client's nonce is always fresh for at least half
    of it and clients of one period share one nonce.
    """

    def __init__(self, key: bytes, lifetime: int) -> None:
        self._key = key
        self.lifetime = lifetime
        self._step = max(1, lifetime // 2)

    def current(self, now: float) -> str:
        issued = int(now) // self._step * self._step
        body = _NONCE_VERSION + struct.pack(">Q", issued)
        return b64url(body + self._mac(body))

    def valid(self, nonce: str, now: float, skew: float) -> bool:
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (ValueError, TypeError):
            return False
        if len(raw) != 1 + 8 + _NONCE_MAC_BYTES or raw[:1] != _NONCE_VERSION:
            return False
        body, mac = raw[:9], raw[9:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return False
        issued: int = struct.unpack(">Q", body[1:])[0]
        return issued - skew <= now < issued + self.lifetime

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, _NONCE_LABEL + body, hashlib.sha256).digest()[:_NONCE_MAC_BYTES]
