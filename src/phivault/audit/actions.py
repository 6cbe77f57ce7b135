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
    AUDIT_FORWARD_FAIL = "audit.forward_fail"
    # keys
    KEY_ROTATE = "key.rotate"
    KEY_SHRED = "key.shred"
    # accounts, institutions and users
    INSTITUTION_CREATE = "institution.create"
    INSTITUTION_UPDATE = "institution.update"
    USER_CREATE = "user.create"
    USER_DISABLE = "user.disable"
    USER_ENABLE = "user.enable"
    USER_ROLE_CHANGE = "user.role_change"
    USER_EMAIL_CHANGE = "user.email_change"
    # accounts, sign-in and sessions
    AUTH_LOGIN = "auth.login"
    AUTH_MFA = "auth.mfa"
    AUTH_LOCKOUT = "auth.lockout"
    AUTH_REAUTHENTICATE = "auth.reauthenticate"
    AUTH_TOKEN_REUSE = "auth.token_reuse"  # noqa: S105   # nosec B105 # an action name, not a secret
    SESSION_END = "session.end"
    PASSWORD_CHANGE = "password.change"  # noqa: S105   # nosec B105 # an action name, not a secret
    PASSWORD_RESET_REQUEST = "password.reset_request"  # noqa: S105   # nosec B105 # an action name, not a secret
    PASSWORD_RESET = "password.reset"  # noqa: S105   # nosec B105 # an action name, not a secret
    MFA_ENABLE = "mfa.enable"
    MFA_DISABLE = "mfa.disable"
    MFA_RECOVERY_CODES = "mfa.recovery_codes"
    KEY_CREATE = "key.create"
    KEY_RETIRE = "key.retire"
    OBJECT_INTEGRITY_FAILURE = "object.integrity_failure"
    # exams: ingest (ids only: instance, quarantine entry, study; never UIDs of the sender)
    INSTANCE_INGEST = "instance.ingest"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_REJECT = "instance.reject"
    INSTANCE_QUARANTINE = "instance.quarantine"
    QUARANTINE_LIST = "quarantine.list"
    QUARANTINE_RELEASE = "quarantine.release"
    QUARANTINE_REJECT = "quarantine.reject"
    INGEST_POLICY_UPDATE = "ingest_policy.update"
    PHI_SWEEP = "phi.sweep"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"


class ActorType(StrEnum):
    USER = "user"
    DEVICE = "device"
    SYSTEM = "system"
    DICOM_NODE = "dicom_node"  # a modality or PACS sending over DIMSE, by its dicom_nodes id
    ANONYMOUS = "anonymous"
