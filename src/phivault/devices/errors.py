"""Errors of the devices part. Each names its HTTP status and stable problem ``code``
(``http.problems`` turns them into RFC 9457 problems) and a default message that says what
to do, never more than the caller may know. Messages never quote a token, code or proof.
"""

from __future__ import annotations

from typing import Any

# RFC 9449 §7.1 / RFC 6750 §3: the challenge of every 401 a device gets.
DPOP_CHALLENGE = 'DPoP algs="EdDSA ES256"'


class DevicesError(Exception):
    status: int = 400
    code: str = "bad_request"
    message: str = "the request cannot be carried out"

    def __init__(self, detail: str | None = None, **extensions: Any) -> None:  # noqa: ANN401
        super().__init__(detail or self.message)
        self.detail = detail or self.message
        self.extensions = extensions
        self.headers: dict[str, str] = {}


# -- proofs and tokens (401: the request is not authenticated) -----------------------------


class DeviceUnauthenticated(DevicesError):
    """Base of the 401 answers; ``error`` is the RFC 9449 §7.1 error code of the challenge."""

    status = 401
    error = "invalid_dpop_proof"

    def __init__(self, detail: str | None = None, **extensions: Any) -> None:  # noqa: ANN401
        super().__init__(detail, **extensions)
        self.headers = {"WWW-Authenticate": f'{DPOP_CHALLENGE}, error="{self.error}"'}


class ProofMissing(DeviceUnauthenticated):
    code, message = "dpop_proof_missing", "send exactly one DPoP proof (RFC 9449) in the DPoP header"


class ProofInvalid(DeviceUnauthenticated):
    code, message = "dpop_proof_invalid", "the DPoP proof is malformed or its signature does not verify"


class ProofReplayed(DeviceUnauthenticated):
    code, message = "dpop_proof_replayed", "this DPoP proof was used before; sign a new one per request"


class ProofMethodMismatch(DeviceUnauthenticated):
    code, message = "dpop_method_mismatch", "the DPoP proof was made for another HTTP method (htm)"


class ProofUrlMismatch(DeviceUnauthenticated):
    code, message = "dpop_url_mismatch", "the DPoP proof was made for another URL (htu)"


class ProofExpired(DeviceUnauthenticated):
    code, message = "dpop_proof_expired", "the DPoP proof's iat is too old or in the future; check the clock"


class ProofTokenHashMismatch(DeviceUnauthenticated):
    code, message = "dpop_ath_mismatch", "the DPoP proof's ath is not the hash of the access token sent"


class NonceRequired(DeviceUnauthenticated):
    """RFC 9449 §8: retry with the nonce in the ``DPoP-Nonce`` header."""

    code, message = "use_dpop_nonce", "sign the proof again with the server nonce in the DPoP-Nonce header"
    error = "use_dpop_nonce"

    def __init__(self, nonce: str) -> None:
        super().__init__()
        self.headers["DPoP-Nonce"] = nonce


class KeyMismatch(DeviceUnauthenticated):
    code, message = (
        "dpop_key_mismatch",
        "the proof is signed by another key than the one the token is bound to",
    )
    error = "invalid_token"


class InvalidDeviceToken(DeviceUnauthenticated):
    code, message = (
        "invalid_token",
        "the device token is unknown or expired; get a new one at /api/v1/devices/token",
    )
    error = "invalid_token"


class DeviceNotActivated(DeviceUnauthenticated):
    code, message = "device_not_activated", "no activated device has this key; activate it with a code first"
    error = "invalid_token"


class DeviceRevoked(DeviceUnauthenticated):
    code, message = "device_revoked", "this device was revoked by its institution; it needs a new activation"
    error = "invalid_token"


class TokenRequiresDpop(DevicesError):
    """A DPoP-bound token presented as a Bearer token (RFC 9449 §7.2)."""

    status, code, message = (
        401,
        "token_requires_dpop",
        "device tokens are sent as Authorization: DPoP with a proof",
    )

    def __init__(self) -> None:
        super().__init__()
        self.headers = {"WWW-Authenticate": f'{DPOP_CHALLENGE}, error="invalid_token"'}


# -- activation ---------------------------------------------------------------------------


class ActivationCodeInvalid(DevicesError):
    status, code, message = (
        400,
        "activation_code_invalid",
        "the activation code is not valid; check it or ask for a new one",
    )


class ActivationCodeExpired(DevicesError):
    status, code, message = (
        400,
        "activation_code_expired",
        "the activation code has expired; ask for a new one",
    )


class ActivationCodeUsed(DevicesError):
    status, code, message = (
        400,
        "activation_code_used",
        "the activation code was used already; ask for a new one",
    )


class SerialMismatch(DevicesError):
    status, code, message = (
        400,
        "activation_serial_mismatch",
        "the activation code was issued for another device serial",
    )


class TlsPinMismatch(DevicesError):
    status, code, message = (
        400,
        "tls_pin_mismatch",
        "the TLS certificate the device saw is not this server's: something intercepts the connection",
    )


class DeviceKeyInUse(DevicesError):
    status, code, message = (
        409,
        "device_key_in_use",
        "this key belongs to an activated device; generate a new one",
    )


class RegionMismatch(DevicesError):
    status, code, message = 409, "region_mismatch", "this institution is served in another region"


# -- management -----------------------------------------------------------------------------


class NotFound(DevicesError):
    # Also the answer for another tenant's (or another device's) object.
    status, code, message = 404, "not_found", "no such object"


class Forbidden(DevicesError):
    status, code, message = 403, "forbidden", "your role does not allow this"


class InvalidInput(DevicesError):
    status, code, message = 422, "validation_error", "the request is invalid"


# -- uploads (tus 1.0 where it speaks) -----------------------------------------------------


class TusVersionUnsupported(DevicesError):
    status, code, message = 412, "tus_version_unsupported", "send Tus-Resumable: 1.0.0"

    def __init__(self) -> None:
        super().__init__()
        self.headers = {"Tus-Version": "1.0.0"}


class UploadTooLarge(DevicesError):
    status, code, message = 413, "upload_too_large", "the upload is larger than one exam may be"


class QuotaExceeded(DevicesError):
    status, code = 413, "quota_exceeded"

    def __init__(self, scope: str, limit: int, used: int, incoming: int) -> None:
        super().__init__(
            f"the {scope} storage quota of {limit} bytes would be exceeded "
            f"({used} bytes used, {incoming} bytes arriving)",
            quota_scope=scope,
            quota_bytes=limit,
            used_bytes=used,
            incoming_bytes=incoming,
        )


class UnsupportedMediaType(DevicesError):
    status, code, message = 415, "unsupported_media_type", "send chunks as application/offset+octet-stream"


class ChecksumRequired(DevicesError):
    status, code, message = (
        400,
        "checksum_required",
        "send Upload-Checksum: sha256 <base64 digest> with every chunk",
    )


class ChunkChecksumMismatch(DevicesError):
    # tus 1.0 checksum extension: 460 Checksum Mismatch. Nothing of the chunk was kept.
    status, code, message = (
        460,
        "chunk_checksum_mismatch",
        "the chunk does not match its Upload-Checksum; send it again",
    )


class ChunkLengthInvalid(DevicesError):
    status, code, message = (
        400,
        "chunk_length_invalid",
        "the chunk's Content-Length is missing, does not match its body, or runs past Upload-Length",
    )


class OffsetMismatch(DevicesError):
    status, code, message = (
        409,
        "upload_offset_mismatch",
        "Upload-Offset is not the server's offset; ask with HEAD and resume",
    )

    def __init__(self, offset: int) -> None:
        super().__init__(offset=offset)
        self.headers = {"Upload-Offset": str(offset), "Tus-Resumable": "1.0.0"}


class UploadIncomplete(DevicesError):
    status, code, message = 409, "upload_incomplete", "send the remaining bytes before finalizing"

    def __init__(self, offset: int, length: int) -> None:
        super().__init__(offset=offset, length=length)


class UploadBusy(DevicesError):
    status, code, message = 409, "upload_finalizing", "the upload is being finalized; ask again shortly"

    def __init__(self, retry_after: int) -> None:
        super().__init__()
        self.headers = {"Retry-After": str(max(1, retry_after))}


class UploadClosed(DevicesError):
    status, code, message = 409, "upload_closed", "the upload is finalized or failed; it takes no more data"


class UploadGone(DevicesError):
    # tus 1.0 §"Expiration": 410 Gone for an expired upload; also cancelled ones.
    status, code, message = 410, "upload_expired", "the upload expired or was cancelled; start a new one"


class UploadDigestMismatch(DevicesError):
    status, code, message = (
        422,
        "upload_digest_mismatch",
        "the bytes received do not have the SHA-256 given; nothing was stored, start a new upload",
    )


class UploadFailed(DevicesError):
    """The upload cannot be finalized (a stored chunk failed its integrity check)."""

    status, message = 409, "the upload failed; start a new one"

    def __init__(self, code: str) -> None:
        super().__init__()
        self.code = code


class UploadRejected(DevicesError):
    """The ingest pipeline refused the content (it audited why); ``code`` is its code."""

    status = 422

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
