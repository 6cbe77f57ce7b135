"""The S3-compatible object store (AWS S3, Ceph RGW, MinIO …), through boto3.

URL: ``s3://BUCKET[/PREFIX]?endpoint=http://127.0.0.1:9000&region=eu-central-1&addressing=path``.
``endpoint`` is left out for AWS; ``addressing`` defaults to ``path`` when an endpoint is
given (what MinIO and Ceph expect) and to ``virtual`` on AWS. Credentials never appear in the
URL: boto3's standard chain finds them (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, web identity, instance or container roles).

Writes stream: ``put`` reads its source one part (8 MiB) at a time, sends small objects in
one PutObject and larger ones as a multipart upload, and aborts the upload on any failure, so
an object becomes visible whole or not at all. Every request that carries bytes also carries
their ``x-amz-checksum-sha256``: the store verifies each part, and Object Lock requires a
checksum on writes that set a retention (Content-MD5 or x-amz-checksum-*).

Retention uses S3 Object Lock in COMPLIANCE mode on the one version written. After writing,
``put`` reads the retention back and, if the server dropped it (some implementations ignore
the lock headers of CreateMultipartUpload), sets it with PutObjectRetention; a store that
still does not report it gets ``RetentionUnsupported``, never a silent unlocked object.

What ``delete`` means on a versioned bucket (every Object Lock bucket is versioned): it
removes **every version** of the key by version id, oldest first and the current one last,
and never adds a delete marker. A delete marker would hide the object while its bytes stay
stored, so erasure and the retention sweep would only pretend; and S3 accepts a delete
marker even on a locked object, which would make a locked object look deleted. Deleting a
retained version is refused by S3 (403), which becomes ``ObjectLocked`` while the object
stays readable. The bucket must therefore not carry a *default* retention rule: phivault
sets retention per object.

IAM actions used: s3:GetObject, s3:GetObjectVersion, s3:PutObject, s3:DeleteObject,
s3:DeleteObjectVersion, s3:ListBucket, s3:ListBucketVersions, s3:AbortMultipartUpload,
s3:PutObjectRetention, s3:GetObjectRetention, s3:GetBucketObjectLockConfiguration. A
lifecycle rule with AbortIncompleteMultipartUpload cleans up after a crash mid-upload (the
process cannot abort what it did not live to see).
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
import secrets
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING, BinaryIO, Final, Literal
from urllib.parse import parse_qsl, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from phivault.storage.base import (
    COPY_BUFFER,
    MAX_KEY_LENGTH,
    PROBE_KIND,
    StoredObject,
    new_object_key,
    validate_key,
)
from phivault.storage.errors import (
    InvalidObjectKey,
    ObjectLocked,
    ObjectNotFound,
    RetentionUnsupported,
    StorageError,
    StorageFull,
    StorageUnavailable,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _typeshed import WriteableBuffer
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CreateMultipartUploadRequestTypeDef,
        PutObjectRequestTypeDef,
    )

logger = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
DEFAULT_PART_SIZE: Final = 8 * MIB
MIN_PART_SIZE: Final = 5 * MIB  # S3: every part but the last is at least 5 MiB
MAX_PART_SIZE: Final = 5 * 1024 * MIB
MAX_PARTS: Final = 10_000  # S3's limit per multipart upload: 80 GB objects at 8 MiB
MAX_PAGE_SIZE: Final = 1000  # S3 returns at most 1000 keys per ListObjectsV2 page

_QUERY_PARAMETERS: Final = frozenset({"endpoint", "region", "addressing"})
# S3 bucket naming rules: 3-63 characters of [a-z0-9.-], starting and ending with a
# letter or digit, no "..", not shaped like an IPv4 address.
_BUCKET_RE: Final = re.compile(r"^(?!\d+\.\d+\.\d+\.\d+$)(?!.*\.\.)[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # Ceph zonegroups: "default", …
_PREFIX_RE: Final = re.compile(r"^(?:[a-z0-9][a-z0-9._-]*(?:/[a-z0-9._-]+)*/?)?$")

# Error codes, from the S3 API reference and the S3-compatible servers we target.
_NOT_FOUND_CODES: Final = frozenset({"NoSuchKey", "NoSuchVersion", "NotFound", "404"})
_FULL_CODES: Final = frozenset({"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage"})
_TRANSIENT_CODES: Final = frozenset(
    {"SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "Throttling"}
)
_DENIED_CODES: Final = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "RequestTimeTooSkewed",
    }
)
# Failures before or during the exchange: nothing to learn from the server but its absence.
_UNREACHABLE: Final = (
    BotoConnectionError,
    HTTPClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
)

Addressing = Literal["path", "virtual"]


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where objects live, parsed from an ``s3://`` URL."""

    bucket: str
    prefix: str  # "" or ends with "/"
    endpoint: str | None
    region: str | None
    addressing: Addressing

    @classmethod
    def from_url(cls, url: str) -> S3Location:
        """Parse and validate ``url``; ``ValueError`` says what is wrong, never echoing secrets."""
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ValueError("an S3 object store URL starts with s3://")
        if "@" in parts.netloc:
            # Checked first, and the URL is not quoted: it holds a secret.
            raise ValueError(
                "S3 credentials must not be in the object store URL: use the AWS credential "
                "chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role)"
            )
        if parts.fragment:
            raise ValueError("an S3 object store URL has no #fragment")
        bucket = parts.netloc
        if not _BUCKET_RE.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}: 3-63 characters of a-z, 0-9, '.' and '-'")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidObjectKey:
                raise ValueError(
                    f"invalid key prefix {prefix!r} in the S3 URL: lower-case segments of "
                    "a-z, 0-9, '.', '_' and '-' separated by single '/'"
                ) from None
            prefix += "/"

        params = _parse_query(parts.query)
        endpoint = _validate_endpoint(params["endpoint"]) if "endpoint" in params else None
        region = params.get("region")
        if region is not None and not _REGION_RE.fullmatch(region):
            raise ValueError(f"invalid S3 region {region!r}")
        if endpoint is not None and region is None:
            region = "us-east-1"  # what MinIO and Ceph answer to unless configured otherwise
        addressing = params.get("addressing", "path" if endpoint else "virtual")
        if addressing not in ("path", "virtual"):
            raise ValueError("S3 URL parameter addressing must be 'path' or 'virtual'")
        return cls(
            bucket=bucket,
            prefix=prefix,
            endpoint=endpoint,
            region=region,
            addressing="path" if addressing == "path" else "virtual",
        )


def _parse_query(query: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("malformed query string in the S3 object store URL") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in _QUERY_PARAMETERS:
            # Name only: an unknown parameter might be someone's attempt at a secret.
            allowed = ", ".join(sorted(_QUERY_PARAMETERS))
            raise ValueError(f"unknown S3 URL parameter {name!r} (known: {allowed})")
        if name in params:
            raise ValueError(f"S3 URL parameter {name!r} is given twice")
        if not value:
            raise ValueError(f"S3 URL parameter {name!r} is empty")
        params[name] = value
    return params


def _validate_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if "@" in parts.netloc:
        raise ValueError("the S3 endpoint must not contain credentials")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the S3 endpoint must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked
    except ValueError:
        raise ValueError("the S3 endpoint has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("the S3 endpoint is scheme://host[:port] only, without a path")
    return f"{parts.scheme}://{parts.netloc}"


def _validate_prefix(prefix: str) -> str:
    if len(prefix) > MAX_KEY_LENGTH or not _PREFIX_RE.fullmatch(prefix):
        raise InvalidObjectKey("invalid key prefix")
    return prefix


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _whole_seconds_utc(moment: datetime) -> datetime:
    """``moment`` in UTC, rounded up to a second: a retention is never shorter than asked."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("retain_until must be a timezone-aware datetime")
    moment = moment.astimezone(UTC)
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment


@contextmanager
def _s3_errors(bucket: str, action: str, key: str | None) -> Iterator[None]:
    """Translate botocore's exceptions into ``StorageError`` subclasses."""
    try:
        yield
    except ClientError as error:
        raise _client_error(error, bucket, action, key) from error
    except FlexibleChecksumError as error:
        raise StorageError(f"{action} {key}: checksum mismatch in the response") from error
    except (NoCredentialsError, PartialCredentialsError) as error:
        raise StorageUnavailable(
            f"{action}: no usable S3 credentials (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or attach a role)"
        ) from error
    except _UNREACHABLE as error:
        raise StorageUnavailable(f"{action}: S3 endpoint unreachable ({type(error).__name__})") from error


def _error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def _client_error(error: ClientError, bucket: str, action: str, key: str | None) -> StorageError:
    code = _error_code(error)
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    where = f"{action} {key}" if key else action
    if code == "NoSuchBucket":
        return StorageUnavailable(f"{where}: bucket {bucket!r} does not exist")
    if code in _NOT_FOUND_CODES:
        return ObjectNotFound(f"{key}: object not found" if key else None)
    if code in _FULL_CODES or status == HTTPStatus.INSUFFICIENT_STORAGE:
        return StorageFull(f"{where}: object store is full ({code})")
    if code in _TRANSIENT_CODES or status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        return StorageUnavailable(f"{where}: S3 answered {status} {code}")
    if code in _DENIED_CODES or status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        return StorageUnavailable(f"{where}: S3 refused access ({code or status})")
    return StorageError(f"{where}: S3 refused the request ({code or status})")


class _PartReader:
    """Reads ``source`` one part at a time, counting what passes through."""

    def __init__(self, source: BinaryIO, part_size: int) -> None:
        self._source = source
        self._part_size = part_size
        self.size = 0

    def next_part(self) -> bytes:
        """Up to ``part_size`` bytes; fewer only at the end of the source."""
        chunks: list[bytes] = []
        wanted = self._part_size
        while wanted > 0:
            chunk = self._source.read(wanted)
            if not chunk:
                break
            chunks.append(chunk)
            wanted -= len(chunk)
        part = b"".join(chunks)
        self.size += len(part)
        return part


class S3ObjectStore:
    """``ObjectStore`` on an S3 bucket (optionally under a key prefix)."""

    def __init__(
        self,
        url: str,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        page_size: int = MAX_PAGE_SIZE,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {MIN_PART_SIZE} and {MAX_PART_SIZE}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        self.location = S3Location.from_url(url)
        self.url = url  # validated above: holds no credentials
        self._bucket = self.location.bucket
        self._prefix = self.location.prefix
        self._part_size = part_size
        self._page_size = page_size
        self._lock_enabled = False  # cached once seen: Object Lock cannot be turned off
        session = boto3.session.Session()
        self._client = self._make_client(
            session,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
        )
        # Readiness probes must answer fast when S3 is down: one attempt, short timeouts.
        self._probe_client = self._make_client(
            session,
            connect_timeout=min(connect_timeout, 2.0),
            read_timeout=min(read_timeout, 5.0),
            max_attempts=1,
        )

    def _make_client(
        self,
        session: boto3.session.Session,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
    ) -> S3Client:
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": self.location.addressing},
            # phivault sends its own x-amz-checksum-sha256 on every write; without this
            # botocore would add a CRC32 trailer too, which some S3-compatibles refuse.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_supported",
            tcp_keepalive=True,
            max_pool_connections=20,
            user_agent_extra="phivault",
        )
        return session.client(
            "s3",
            endpoint_url=self.location.endpoint,
            region_name=self.location.region,
            config=config,
        )

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.url!r})"

    def _errors(self, action: str, key: str | None = None) -> AbstractContextManager[None]:
        return _s3_errors(self._bucket, action, key)

    # -- ObjectStore -------------------------------------------------------------------

    def put(self, key: str, source: BinaryIO, *, retain_until: datetime | None = None) -> StoredObject:
        """Store ``source`` under ``key``; see the module docstring for how."""
        full_key = self._prefix + validate_key(key)
        until = None if retain_until is None else _whole_seconds_utc(retain_until)
        with self._errors("put", key):
            if until is not None:
                self._require_object_lock()
            reader = _PartReader(source, self._part_size)
            first = reader.next_part()
            if len(first) < self._part_size:
                version_id = self._put_single(full_key, first, until)
            else:
                version_id = self._put_multipart(full_key, reader, first, until)
            if until is not None:
                self._ensure_retention(key, full_key, version_id, until)
        return StoredObject(key=key, size=reader.size)

    def _put_single(self, full_key: str, body: bytes, until: datetime | None) -> str | None:
        request: PutObjectRequestTypeDef = {
            "Bucket": self._bucket,
            "Key": full_key,
            "Body": body,
            "ContentType": "application/octet-stream",
            "ChecksumSHA256": _b64(hashlib.sha256(body).digest()),
        }
        if until is not None:
            request["ObjectLockMode"] = "COMPLIANCE"
            request["ObjectLockRetainUntilDate"] = until
        return self._client.put_object(**request).get("VersionId")

    def _put_multipart(
        self, full_key: str, reader: _PartReader, first: bytes, until: datetime | None
    ) -> str | None:
        request: CreateMultipartUploadRequestTypeDef = {
            "Bucket": self._bucket,
            "Key": full_key,
            "ContentType": "application/octet-stream",
            "ChecksumAlgorithm": "SHA256",
        }
        if until is not None:
            request["ObjectLockMode"] = "COMPLIANCE"
            request["ObjectLockRetainUntilDate"] = until
        upload_id = self._client.create_multipart_upload(**request)["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            part = first
            while part:
                number = len(parts) + 1
                self._check_part_count(full_key, number)
                checksum = _b64(hashlib.sha256(part).digest())
                response = self._client.upload_part(
                    Bucket=self._bucket,
                    Key=full_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=part,
                    ChecksumSHA256=checksum,
                )
                parts.append({"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum})
                part = reader.next_part() if len(part) == self._part_size else b""
            completed = self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Whatever failed (the source, S3, an interrupt), leave no pending upload behind.
            self._abort_upload(full_key, upload_id)
            raise
        return completed.get("VersionId")

    def _check_part_count(self, full_key: str, number: int) -> None:
        if number > MAX_PARTS:
            raise StorageError(f"put {full_key}: larger than {MAX_PARTS} parts of {self._part_size} bytes")

    def _abort_upload(self, full_key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=full_key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as error:
            # Nothing became visible; a lifecycle rule (AbortIncompleteMultipartUpload)
            # reclaims the parts. Log identifiers only.
            logger.warning(
                "could not abort multipart upload %s of %s: %s",
                upload_id,
                full_key,
                type(error).__name__,
            )

    def _require_object_lock(self) -> None:
        if self._lock_enabled:
            return
        try:
            response = self._client.get_object_lock_configuration(Bucket=self._bucket)
            enabled = response.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        except ClientError as error:
            if _error_code(error) != "ObjectLockConfigurationNotFoundError":
                raise
            enabled = None
        if enabled != "Enabled":
            raise RetentionUnsupported(
                f"bucket {self._bucket!r} has no Object Lock; create it with Object Lock enabled"
            )
        self._lock_enabled = True

    def _ensure_retention(self, key: str, full_key: str, version_id: str | None, until: datetime) -> None:
        """Check that the version written is locked until ``until``; lock it if it is not."""
        if self._retained_until(full_key, version_id) >= until:
            return
        try:
            self._client.put_object_retention(
                Bucket=self._bucket,
                Key=full_key,
                VersionId=version_id or "null",
                Retention={"Mode": "COMPLIANCE", "RetainUntilDate": until},
            )
        except ClientError as error:
            if _error_code(error) not in ("NotImplemented", "InvalidRequest"):
                raise
        else:
            if self._retained_until(full_key, version_id) >= until:
                return
        self._delete_version(key, full_key, version_id or "null")
        raise RetentionUnsupported(f"put {key}: the object store did not keep the retention")

    def _retained_until(self, full_key: str, version_id: str | None) -> datetime:
        head = self._client.head_object(Bucket=self._bucket, Key=full_key, VersionId=version_id or "null")
        until = head.get("ObjectLockRetainUntilDate")
        if head.get("ObjectLockMode") != "COMPLIANCE" or until is None:
            return datetime.min.replace(tzinfo=UTC)
        return until

    def prepare(self) -> None:
        """Nothing to create: the operator provisions the bucket (with Object Lock where
        backups need it) and grants the IAM actions listed above; ``probe`` checks access.
        """

    def open(self, key: str) -> BinaryIO:
        """Stream the object's bytes (buffered); read errors raise ``StorageError``."""
        full_key = self._prefix + validate_key(key)
        with self._errors("open", key):
            body = self._client.get_object(Bucket=self._bucket, Key=full_key)["Body"]
        return io.BufferedReader(_ObjectBody(self._bucket, key, body), buffer_size=COPY_BUFFER)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` with one ranged GET (RFC 9110 §14.1.2)."""
        full_key = self._prefix + validate_key(key)
        if start < 0 or length < 0:
            raise ValueError("start and length must not be negative")
        if length == 0:
            self.size(key)  # a missing object is still an error
            return b""
        with self._errors("read", key):
            try:
                response = self._client.get_object(
                    Bucket=self._bucket, Key=full_key, Range=f"bytes={start}-{start + length - 1}"
                )
            except ClientError as error:
                if _error_code(error) == "InvalidRange":
                    return b""  # 416: start is at or past the end of the object
                raise
            with response["Body"] as body:
                data = body.read()
        # A server that ignores Range answers 200 with the whole object.
        if response.get("ContentRange") is None and len(data) > length:
            data = data[start : start + length]
        return data

    def size(self, key: str) -> int:
        """Return the object's length, from a HEAD request."""
        full_key = self._prefix + validate_key(key)
        with self._errors("size", key):
            return self._client.head_object(Bucket=self._bucket, Key=full_key)["ContentLength"]

    def exists(self, key: str) -> bool:
        """Whether the current version of ``key`` exists (a HEAD request).

        HEAD answers a bare 404 for a missing bucket too, so a deleted bucket reads as
        "no object" here; ``probe`` and every write report it as ``StorageUnavailable``.
        """
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """Remove every version of ``key``; ``ObjectLocked`` if one is under retention."""
        full_key = self._prefix + validate_key(key)
        with self._errors("delete", key):
            versions = self._versions_of(full_key)
            for version_id in versions:
                self._delete_version(key, full_key, version_id)

    def _versions_of(self, full_key: str) -> list[str]:
        """Version ids of ``full_key`` (delete markers included), the current one last."""
        older: list[str] = []
        latest: list[str] = []
        paginator = self._client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=full_key):
            entries = [*page.get("Versions", []), *page.get("DeleteMarkers", [])]
            for entry in entries:
                if entry.get("Key") == full_key and "VersionId" in entry:
                    (latest if entry.get("IsLatest") else older).append(entry["VersionId"])
            # Listings are in key order and full_key sorts before every longer key that
            # starts with it: once another key shows up, all of full_key's versions are in.
            if any(entry.get("Key") != full_key for entry in entries):
                break
        return older + latest

    def _delete_version(self, key: str, full_key: str, version_id: str) -> None:
        try:
            self._client.delete_object(Bucket=self._bucket, Key=full_key, VersionId=version_id)
        except ClientError as error:
            code = _error_code(error)
            if code in _NOT_FOUND_CODES:
                return  # deleted meanwhile: the goal is reached
            if code == "AccessDenied":
                until = self._lock_blocking_delete(full_key, version_id)
                if until is not None:
                    raise ObjectLocked(f"{key} is under retention until {until}") from error
            raise

    def _lock_blocking_delete(self, full_key: str, version_id: str) -> str | None:
        """Why a version delete was refused, if Object Lock explains it: the end date."""
        try:
            head = self._client.head_object(Bucket=self._bucket, Key=full_key, VersionId=version_id)
        except ClientError:
            return None  # e.g. 405 for a delete marker: those are never locked
        if head.get("ObjectLockLegalHoldStatus") == "ON":
            return "its legal hold is released"
        until = head.get("ObjectLockRetainUntilDate")
        # The server's clock decided the refusal; comparing with the wall clock only tells
        # a lock from a missing permission.
        if head.get("ObjectLockMode") and until is not None and until > datetime.now(UTC):
            return until.astimezone(UTC).isoformat()
        return None

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Every phivault key under ``prefix``, one ListObjectsV2 page at a time.

        The prefix is checked now, not at the first ``next()``. Objects whose names are
        not phivault keys (anything others wrote into the bucket) are skipped, so callers
        such as the sweeper never act on them.
        """
        return self._list(self._prefix + _validate_prefix(prefix))

    def _list(self, full_prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self._bucket, Prefix=full_prefix, PaginationConfig={"PageSize": self._page_size}
        )
        with self._errors("list"):
            for page in pages:
                for entry in page.get("Contents", []):
                    name = entry.get("Key", "")[len(self._prefix) :]
                    try:
                        yield validate_key(name)
                    except InvalidObjectKey:
                        continue

    def probe(self) -> None:
        """Write, read back and delete a small object, with one quick attempt each."""
        key = new_object_key(PROBE_KIND)
        full_key = self._prefix + key
        payload = secrets.token_bytes(32)
        client = self._probe_client
        with self._errors("probe", key):
            version_id = client.put_object(
                Bucket=self._bucket,
                Key=full_key,
                Body=payload,
                ChecksumSHA256=_b64(hashlib.sha256(payload).digest()),
            ).get("VersionId")
            try:
                with client.get_object(Bucket=self._bucket, Key=full_key)["Body"] as body:
                    read_back = body.read()
            finally:
                try:
                    # By version: a plain delete on a versioned bucket would leave the probe
                    # stored behind a delete marker, one more for every readiness check.
                    client.delete_object(Bucket=self._bucket, Key=full_key, VersionId=version_id or "null")
                except ClientError as error:
                    if _error_code(error) == "AccessDenied" and self._lock_blocking_delete(
                        full_key, version_id or "null"
                    ):
                        raise ObjectLocked(
                            "probe object is under retention: the bucket has a default "
                            "retention rule; remove it (phivault sets retention per object)"
                        ) from error
                    raise
        if read_back != payload:
            raise StorageError("probe: the object read back differs from the one written")


class _ObjectBody(io.RawIOBase):
    """A GetObject body as a raw stream whose read errors are ``StorageError``."""

    def __init__(self, bucket: str, key: str, body: StreamingBody) -> None:
        super().__init__()
        self._bucket = bucket
        self._key = key
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        with _s3_errors(self._bucket, "read", self._key):
            data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


__all__ = ["DEFAULT_PART_SIZE", "S3Location", "S3ObjectStore"]
