"""The one list of audited actions, and the outcomes a record can have.

Actions are ``resource.verb`` strings. A record names objects by id only: never PHI
values, secrets or tokens (DESIGN.md §6).
"""

from __future__ import annotations

from enum import StrEnum


class AuditAction(StrEnum):
    # the audit log itself
    AUDIT_READ = "audit.read"
    AUDIT_EXPORT = "audit.export"
    AUDIT_VERIFY = "audit.verify"
    AUDIT_PRUNE = "audit.prune"
    AUDIT_KEY_CREATE = "audit.key_create"
    # keys
    KEY_ROTATE = "key.rotate"
    KEY_SHRED = "key.shred"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


class ActorType(StrEnum):
    USER = "user"
    DEVICE = "device"
    SYSTEM = "system"
    ANONYMOUS = "anonymous"
