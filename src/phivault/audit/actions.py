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
    # dicom nodes (the C-STORE SCP's callers; ids and AE titles, never instance values)
    DICOM_NODE_CREATE = "dicom_node.create"
    DICOM_NODE_DELETE = "dicom_node.delete"
    DICOM_ASSOCIATION_REJECT = "dicom_association.reject"
    # devices (ids only: never a code, token or proof)
    DEVICE_CODE_CREATE = "device.code_create"
    DEVICE_ACTIVATE = "device.activate"
    DEVICE_REVOKE = "device.revoke"
    DEVICE_PROOF_FAIL = "device.proof_fail"
    UPLOAD_CREATE = "upload.create"
    UPLOAD_FINALIZE = "upload.finalize"
    UPLOAD_CANCEL = "upload.cancel"
    UPLOAD_EXPIRE = "upload.expire"
    # exams: reading (ids only: the study, series, instance, comment; patients by pseudonym)
    EXAM_SEARCH = "exam.search"
    EXAM_VIEW = "exam.view"
    EXAM_DOWNLOAD = "exam.download"
    EXAM_ARCHIVE = "exam.archive"
    EXAM_UNARCHIVE = "exam.unarchive"
    EXAM_LEGAL_HOLD = "exam.legal_hold"
    EXAM_LEGAL_HOLD_RELEASE = "exam.legal_hold_release"
    EXAM_DELETE = "exam.delete"
    EXAM_COMMENT_CREATE = "exam.comment_create"
    EXAM_COMMENT_UPDATE = "exam.comment_update"
    EXAM_COMMENT_DELETE = "exam.comment_delete"
    PHI_READ = "phi.read"
    # exams: sharing and export (ids only: the share, export, destination; patients by pseudonym)
    SHARE_CREATE = "share.create"
    SHARE_USE = "share.use"  # each request through a link; a wrong passcode is outcome denied
    SHARE_REVOKE = "share.revoke"
    EGRESS_BLOCK = "egress.block"  # the egress guard found PHI in outgoing bytes: a security alert
    PACS_DESTINATION_CREATE = "pacs_destination.create"
    PACS_DESTINATION_UPDATE = "pacs_destination.update"
    PACS_DESTINATION_DELETE = "pacs_destination.delete"
    EXPORT_CREATE = "export.create"
    EXPORT_COMPLETE = "export.complete"
    EXPORT_FAIL = "export.fail"
    PHI_EXPORT = "phi.export"  # re-identified instances of a patient sent to a PACS


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
