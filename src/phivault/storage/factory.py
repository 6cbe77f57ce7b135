"""Choose the object store backend from ``PHIVAULT_OBJECT_STORE_URL``."""

from __future__ import annotations

from urllib.parse import urlsplit

from phivault.storage.base import ObjectStore


def open_object_store(url: str) -> ObjectStore:
    """Return the backend for ``url`` (``file:///…`` or ``s3://bucket?endpoint=…``)."""
    scheme = urlsplit(url).scheme
    if scheme == "file":
        from phivault.storage.file import FileObjectStore  # noqa: PLC0415

        return FileObjectStore(url)
    if scheme == "s3":
        from phivault.storage.s3 import S3ObjectStore  # noqa: PLC0415  # boto3 is slow to import

        return S3ObjectStore(url)
    msg = f"unsupported object store URL scheme {scheme!r} (use file:// or s3://)"
    raise ValueError(msg)
