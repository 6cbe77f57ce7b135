"""Errors of the exams part; each maps to one HTTP problem (``api.py``) and DIMSE status."""

from __future__ import annotations


class QuotaExceeded(Exception):
    """Storing ``incoming`` more bytes would exceed a quota; nothing was accepted (413)."""

    def __init__(self, scope: str, limit: int, used: int, incoming: int) -> None:
        super().__init__(f"the {scope} storage quota of {limit} bytes would be exceeded")
        self.scope = scope  # "device" or "institution"
        self.limit = limit
        self.used = used
        self.incoming = incoming


class NotFound(Exception):
    """No such exam object in the caller's institution (another tenant's answers alike)."""


class InvalidRequest(Exception):
    """A well-formed request that cannot be carried out (400 problem with ``code``)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class QuarantineResolved(Exception):
    """The quarantine entry was released or rejected meanwhile (409)."""


class ExamProtected(Exception):
    """The exam may not be deleted now: it is under legal hold, or within its retention
    period (409 problem with ``code`` ``legal_hold`` or ``retention_period``).
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class NotCommentAuthor(Exception):
    """Only its author edits or deletes a comment (403 ``not_comment_author``)."""
