"""The S3 object store against a real S3-protocol server (ministack, see servers/s3.py)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from phivault.storage.base import new_object_key
from phivault.storage.errors import (
    InvalidObjectKey,
    ObjectLocked,
    ObjectNotFound,
    RetentionUnsupported,
    StorageUnavailable,
)
from phivault.storage.s3 import S3Location, S3ObjectStore
from servers.common import free_port, unavailable
from servers.s3 import MinistackUnavailableError, S3Server, start_s3_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.s3

MIB = 1024 * 1024
PLAIN_BUCKET = "phivault-plain"
LOCKED_BUCKET = "phivault-locked"
# StorageUnavailable must come within a few seconds: three attempts with standard backoff.
UNAVAILABLE_WITHIN_SECONDS = 8.0


# -- fixtures ------------------------------------------------------------------------------


def _start(workdir: Path) -> S3Server:
    try:
        return start_s3_server(workdir)
    except MinistackUnavailableError as exc:
        unavailable(f"ministack: {exc}")
        raise  # unreachable: unavailable() skips or fails


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with _start(tmp_path_factory.mktemp("ministack")) as server:
        server.create_bucket(PLAIN_BUCKET)
        server.create_bucket(LOCKED_BUCKET, object_lock=True)
        yield server


@pytest.fixture(scope="module", autouse=True)
def aws_environment(s3_server: S3Server) -> Iterator[None]:
    # The store finds its credentials through the standard AWS chain: the environment.
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            patch.delenv(name)
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def s3(s3_server: S3Server) -> Iterator[S3Client]:
    # A plain boto3 client, to look at what the store did.
    with contextlib.closing(s3_server.client()) as client:
        yield client


def _prefix() -> str:
    return f"t{secrets.token_hex(6)}"


@pytest.fixture
def prefix() -> str:
    """Each test works under its own key prefix of the shared buckets."""
    return _prefix()


@pytest.fixture
def store(s3_server: S3Server, prefix: str) -> S3ObjectStore:
    return S3ObjectStore(s3_server.url_for(PLAIN_BUCKET, prefix))


@pytest.fixture
def locked_store(s3_server: S3Server, prefix: str) -> S3ObjectStore:
    return S3ObjectStore(s3_server.url_for(LOCKED_BUCKET, prefix), part_size=5 * MIB)


# -- helpers -------------------------------------------------------------------------------


class TrickleSource(io.BytesIO):
    """Returns at most 100 kB per read, as a socket would: the store must keep reading."""

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return super().read()
        return super().read(min(size, 100_000))


class SourceBrokeError(Exception):
    pass


class BreakingSource(io.BytesIO):
    """Yields ``data`` until ``fail_at`` bytes were read, then raises."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        super().__init__(data)
        self.fail_at = fail_at

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.fail_at:
            raise SourceBrokeError
        wanted = (
            self.fail_at - self.tell() if size is None or size < 0 else min(size, self.fail_at - self.tell())
        )
        return super().read(wanted)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_all(store: S3ObjectStore, key: str) -> bytes:
    with store.open(key) as stream:
        return stream.read()


def in_retention() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


# -- round trips ---------------------------------------------------------------------------


def test_small_object_round_trips_with_its_size(store: S3ObjectStore) -> None:
    key = new_object_key("exam")
    data = b"DICM" + secrets.token_bytes(1000)

    stored = store.put(key, io.BytesIO(data))

    assert (stored.key, stored.size) == (key, len(data))
    assert read_all(store, key) == data
    assert store.size(key) == len(data)
    assert store.exists(key)


def test_empty_object_round_trips(store: S3ObjectStore) -> None:
    key = new_object_key("exam")

    stored = store.put(key, io.BytesIO(b""))

    assert stored.size == 0
    assert read_all(store, key) == b""
    assert store.size(key) == 0
    assert store.read_range(key, 0, 10) == b""


def test_single_put_carries_the_sha256_checksum_to_the_server(
    store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    key = new_object_key("exam")
    data = secrets.token_bytes(4096)

    store.put(key, io.BytesIO(data))

    head = s3.head_object(Bucket=PLAIN_BUCKET, Key=f"{prefix}/{key}", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_twenty_mib_object_goes_up_in_parts_and_round_trips(
    store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    key = new_object_key("exam")
    data = os.urandom(20 * MIB)

    stored = store.put(key, TrickleSource(data))

    assert stored.size == len(data)
    head = s3.head_object(Bucket=PLAIN_BUCKET, Key=f"{prefix}/{key}")
    assert head["ETag"].endswith('-3"')  # 8 + 8 + 4 MiB: a multipart upload
    digest = hashlib.sha256()
    with store.open(key) as stream:
        while chunk := stream.read(MIB):
            digest.update(chunk)
    assert digest.hexdigest() == sha256_hex(data)
    assert store.size(key) == len(data)


def test_object_of_exactly_one_part_round_trips(store: S3ObjectStore) -> None:
    key = new_object_key("exam")
    data = os.urandom(8 * MIB)

    stored = store.put(key, io.BytesIO(data))

    assert stored.size == len(data)
    assert read_all(store, key) == data


@pytest.fixture(scope="module")
def ranged_object(s3_server: S3Server) -> tuple[S3ObjectStore, str, bytes]:
    store = S3ObjectStore(s3_server.url_for(PLAIN_BUCKET, _prefix()))
    key = new_object_key("exam")
    data = os.urandom(9 * MIB)  # two parts: the ranges below cross the part boundary
    store.put(key, io.BytesIO(data))
    return store, key, data


@pytest.mark.parametrize(
    ("start", "length"),
    [
        (0, 1),
        (0, 100),
        (1000, 0),
        (8 * MIB - 5, 10),  # across the boundary between the two parts
        (9 * MIB - 1, 1),  # the last byte
        (9 * MIB - 10, 100),  # past the end: fewer bytes
        (9 * MIB, 10),  # at the end: nothing
        (9 * MIB + 100, 10),  # beyond the end: nothing
        (0, 9 * MIB),  # everything
    ],
)
def test_read_range_returns_the_bytes_asked_for_and_fewer_at_the_end(
    ranged_object: tuple[S3ObjectStore, str, bytes], start: int, length: int
) -> None:
    store, key, data = ranged_object
    assert store.read_range(key, start, length) == data[start : start + length]


def test_read_range_rejects_negative_arguments(ranged_object: tuple[S3ObjectStore, str, bytes]) -> None:
    store, key, _ = ranged_object
    with pytest.raises(ValueError, match="negative"):
        store.read_range(key, -1, 10)
    with pytest.raises(ValueError, match="negative"):
        store.read_range(key, 0, -1)


# -- listing -------------------------------------------------------------------------------


def _put_many(store: S3ObjectStore, keys: list[str]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda key: store.put(key, io.BytesIO(key.encode())), keys))


def test_keys_follows_pagination_past_one_page(s3_server: S3Server, prefix: str) -> None:
    store = S3ObjectStore(s3_server.url_for(PLAIN_BUCKET, prefix), page_size=7)
    exams = [new_object_key("exam") for _ in range(23)]
    audit = [new_object_key("audit") for _ in range(3)]
    _put_many(store, exams + audit)

    assert sorted(store.keys()) == sorted(exams + audit)
    assert sorted(store.keys("exam/")) == sorted(exams)
    assert list(store.keys("nothing/")) == []


def test_keys_lists_more_than_a_thousand_keys(store: S3ObjectStore) -> None:
    keys = [new_object_key("exam") for _ in range(1010)]  # S3 pages hold 1000 keys at most
    _put_many(store, keys)

    assert sorted(store.keys()) == sorted(keys)


def test_keys_skips_objects_that_are_not_phivault_keys(
    store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    key = new_object_key("exam")
    store.put(key, io.BytesIO(b"x"))
    for foreign in ("README.TXT", "exam/../../escape", "_other/thing"):
        s3.put_object(Bucket=PLAIN_BUCKET, Key=f"{prefix}/{foreign}", Body=b"not ours")

    assert list(store.keys()) == [key]


# -- delete and missing objects ------------------------------------------------------------


def test_delete_removes_the_object_and_is_idempotent(store: S3ObjectStore) -> None:
    key = new_object_key("exam")
    store.put(key, io.BytesIO(b"bytes"))

    store.delete(key)
    store.delete(key)

    assert not store.exists(key)
    assert list(store.keys()) == []


def test_deleting_an_object_that_never_existed_is_not_an_error(store: S3ObjectStore) -> None:
    store.delete(new_object_key("exam"))


def test_delete_on_a_versioned_bucket_removes_every_version_without_a_delete_marker(
    locked_store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    key = new_object_key("exam")
    locked_store.put(key, io.BytesIO(b"first"))
    locked_store.put(key, io.BytesIO(b"second"))  # a second version of the same key

    locked_store.delete(key)

    listing = s3.list_object_versions(Bucket=LOCKED_BUCKET, Prefix=f"{prefix}/")
    assert listing.get("Versions", []) == []
    assert listing.get("DeleteMarkers", []) == []


def test_missing_object_raises_object_not_found(store: S3ObjectStore) -> None:
    key = new_object_key("exam")

    assert not store.exists(key)
    with pytest.raises(ObjectNotFound):
        store.open(key)
    with pytest.raises(ObjectNotFound):
        store.read_range(key, 0, 10)
    with pytest.raises(ObjectNotFound):
        store.read_range(key, 0, 0)
    with pytest.raises(ObjectNotFound):
        store.size(key)


# -- key validation ------------------------------------------------------------------------

INVALID_KEYS = [
    "",
    "../etc/passwd",
    "exam/../../x",
    "/exam/aa/b",
    "exam//b",
    "Exam/aa/b",
    "exam/aa/b/",
    "x" * 600,
]


@pytest.fixture
def unreachable_store() -> tuple[S3ObjectStore, list[str]]:
    # A store whose endpoint has no server, with a log of every request it sends.
    store = S3ObjectStore(f"s3://{PLAIN_BUCKET}?endpoint=http://127.0.0.1:{free_port()}")
    sent: list[str] = []

    def record(**kwargs: object) -> None:
        sent.append(str(kwargs.get("event_name")))

    for client in (store._client, store._probe_client):
        client.meta.events.register("before-send", record)
    return store, sent


@pytest.mark.parametrize("key", INVALID_KEYS)
def test_invalid_keys_are_rejected_before_any_request(
    unreachable_store: tuple[S3ObjectStore, list[str]], key: str
) -> None:
    store, sent = unreachable_store
    calls: list[Callable[[], object]] = [
        lambda: store.put(key, io.BytesIO(b"x")),
        lambda: store.put(key, io.BytesIO(b"x"), retain_until=in_retention()),
        lambda: store.open(key),
        lambda: store.read_range(key, 0, 1),
        lambda: store.size(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ]
    for call in calls:
        with pytest.raises(InvalidObjectKey):
            call()
    assert sent == []


@pytest.mark.parametrize("prefix", ["../", "/exam", "Exam/", "exam//"])
def test_invalid_listing_prefixes_are_rejected_before_any_request(
    unreachable_store: tuple[S3ObjectStore, list[str]], prefix: str
) -> None:
    store, sent = unreachable_store
    with pytest.raises(InvalidObjectKey):
        store.keys(prefix)
    assert sent == []


# -- Object Lock ---------------------------------------------------------------------------


def test_retained_object_refuses_delete_and_stays_readable(
    locked_store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    key = new_object_key("backup")
    data = secrets.token_bytes(2048)
    locked_store.put(key, io.BytesIO(data), retain_until=in_retention())

    with pytest.raises(ObjectLocked):
        locked_store.delete(key)

    assert read_all(locked_store, key) == data
    retention = s3.get_object_retention(Bucket=LOCKED_BUCKET, Key=f"{prefix}/{key}")["Retention"]
    assert retention.get("Mode") == "COMPLIANCE"
    assert s3.list_object_versions(Bucket=LOCKED_BUCKET, Prefix=f"{prefix}/").get("DeleteMarkers", []) == []


def test_refused_delete_leaves_the_current_version_in_place(locked_store: S3ObjectStore) -> None:
    key = new_object_key("backup")
    locked_store.put(key, io.BytesIO(b"older, retained"), retain_until=in_retention())
    locked_store.put(key, io.BytesIO(b"current"))

    with pytest.raises(ObjectLocked):
        locked_store.delete(key)

    # Versions go oldest first: the refusal comes before the current version is touched.
    assert read_all(locked_store, key) == b"current"


def test_retained_multipart_object_is_locked_too(
    locked_store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    key = new_object_key("backup")
    data = os.urandom(6 * MIB)  # two parts of the 5 MiB part size
    until = in_retention()

    stored = locked_store.put(key, io.BytesIO(data), retain_until=until)

    assert stored.size == len(data)
    assert read_all(locked_store, key) == data
    head = s3.head_object(Bucket=LOCKED_BUCKET, Key=f"{prefix}/{key}")
    assert head["ETag"].endswith('-2"')
    assert head.get("ObjectLockMode") == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] >= until.replace(microsecond=0)
    with pytest.raises(ObjectLocked):
        locked_store.delete(key)
    assert read_all(locked_store, key) == data


def test_retention_on_a_bucket_without_object_lock_is_unsupported(store: S3ObjectStore) -> None:
    key = new_object_key("backup")
    source = io.BytesIO(b"must not be stored unlocked")

    with pytest.raises(RetentionUnsupported):
        store.put(key, source, retain_until=in_retention())

    assert source.tell() == 0
    assert not store.exists(key)


def test_retain_until_without_a_timezone_is_refused(locked_store: S3ObjectStore) -> None:
    naive = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)
    with pytest.raises(ValueError, match="timezone"):
        locked_store.put(new_object_key("backup"), io.BytesIO(b"x"), retain_until=naive)


# -- failures ------------------------------------------------------------------------------


def test_failed_multipart_upload_leaves_no_object_and_no_pending_upload(
    store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    key = new_object_key("exam")
    source = BreakingSource(os.urandom(20 * MIB), fail_at=12 * MIB)  # inside the second part

    with pytest.raises(SourceBrokeError):
        store.put(key, source)

    assert not store.exists(key)
    uploads = s3.list_multipart_uploads(Bucket=PLAIN_BUCKET, Prefix=f"{prefix}/").get("Uploads", [])
    assert uploads == []


def test_probe_leaves_nothing_behind_on_a_versioned_bucket(
    locked_store: S3ObjectStore, s3: S3Client, prefix: str
) -> None:
    locked_store.probe()
    locked_store.probe()

    listing = s3.list_object_versions(Bucket=LOCKED_BUCKET, Prefix=f"{prefix}/")
    assert listing.get("Versions", []) == []
    assert listing.get("DeleteMarkers", []) == []


def test_probe_reports_a_missing_bucket_as_unavailable(s3_server: S3Server) -> None:
    store = S3ObjectStore(s3_server.url_for("no-such-bucket"))
    with pytest.raises(StorageUnavailable, match="does not exist"):
        store.probe()


@pytest.fixture
def outage_server(tmp_path: Path) -> Iterator[S3Server]:
    # A server of its own, so stopping it disturbs no other test.
    with _start(tmp_path / "ministack") as server:
        server.create_bucket(PLAIN_BUCKET)
        yield server


def _assert_unavailable_quickly(call: Callable[[], object]) -> None:
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        call()
    assert time.monotonic() - started < UNAVAILABLE_WITHIN_SECONDS


def test_store_down_raises_storage_unavailable_quickly_and_recovers(outage_server: S3Server) -> None:
    store = S3ObjectStore(outage_server.url_for(PLAIN_BUCKET))
    key = new_object_key("exam")
    store.put(key, io.BytesIO(b"before the outage"))

    outage_server.stop()
    _assert_unavailable_quickly(lambda: store.put(new_object_key("exam"), io.BytesIO(b"x")))
    _assert_unavailable_quickly(lambda: store.open(key))
    _assert_unavailable_quickly(lambda: store.read_range(key, 0, 4))
    _assert_unavailable_quickly(lambda: store.exists(key))
    _assert_unavailable_quickly(lambda: list(store.keys()))
    _assert_unavailable_quickly(lambda: store.delete(key))
    _assert_unavailable_quickly(store.probe)

    outage_server.start()
    assert read_all(store, key) == b"before the outage"
    store.probe()
    later = new_object_key("exam")
    store.put(later, io.BytesIO(b"after"))
    assert read_all(store, later) == b"after"


def test_server_listens_on_loopback_only(s3_server: S3Server) -> None:
    addresses = s3_server.listening_addresses()
    assert ("127.0.0.1", s3_server.port) in addresses
    assert {address for address, _ in addresses} == {"127.0.0.1"}


# -- URL -----------------------------------------------------------------------------------


def test_url_with_credentials_is_refused_without_repeating_them() -> None:
    with pytest.raises(ValueError, match="credential chain") as caught:
        S3ObjectStore("s3://AKIAEXAMPLE:sup3rsecret@bucket?endpoint=http://127.0.0.1:9000")
    assert "sup3rsecret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://bucket", "s3://"),
        ("s3://Bucket", "bucket name"),
        ("s3://ab", "bucket name"),
        ("s3://bucket:9000", "bucket name"),
        ("s3://192.168.1.1", "bucket name"),
        ("s3://bucket/../up", "prefix"),
        ("s3://bucket/Exams", "prefix"),
        ("s3://bucket?secret_key=x", "unknown"),
        ("s3://bucket?region=a&region=b", "twice"),
        ("s3://bucket?region=", "empty"),
        ("s3://bucket?region=EU_1", "region"),
        ("s3://bucket?addressing=dns", "addressing"),
        ("s3://bucket?endpoint=ftp://host", "http"),
        ("s3://bucket?endpoint=http://host/s3", "path"),
        ("s3://bucket?endpoint=http://user:pw@host", "credentials"),
        ("s3://bucket?endpoint=http://host:99999", "port"),
        ("s3://bucket#x", "fragment"),
    ],
)
def test_invalid_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        S3Location.from_url(url)


def test_url_defaults_for_a_self_hosted_endpoint_and_for_aws() -> None:
    local = S3Location.from_url("s3://phi-objects/exams/?endpoint=http://127.0.0.1:9000")
    assert (local.bucket, local.prefix, local.endpoint) == ("phi-objects", "exams/", "http://127.0.0.1:9000")
    assert (local.region, local.addressing) == ("us-east-1", "path")

    aws = S3Location.from_url("s3://phi-objects?region=eu-central-1")
    assert (aws.prefix, aws.endpoint, aws.region, aws.addressing) == ("", None, "eu-central-1", "virtual")
    assert S3Location.from_url("s3://phi-objects?addressing=path").addressing == "path"
