"""Object store errors. Messages name keys (phivault-generated ids), never content."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of object store errors."""

    default_message = "object store error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class InvalidObjectKey(StorageError):
    """The key is not one phivault generates (a user-supplied path never reaches a store)."""

    default_message = "invalid object key"


class ObjectNotFound(StorageError):
    """No object is stored under the key."""

    default_message = "object not found"


class StorageUnavailable(StorageError):
    """The backend cannot be reached or refused the operation; retrying may succeed."""

    default_message = "object store unavailable"


class StorageFull(StorageError):
    """The backend has no space left; nothing partial was left behind."""

    default_message = "object store is full"


class RetentionUnsupported(StorageError):
    """The backend cannot enforce an immutability (object lock) period."""

    default_message = "this object store cannot enforce retention"


class ObjectLocked(StorageError):
    """The object is under retention (object lock) and cannot be deleted or overwritten yet."""

    default_message = "object is under retention"
