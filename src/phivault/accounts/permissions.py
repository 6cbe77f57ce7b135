"""Permissions and roles: what each kind of principal may do (DESIGN.md §5).

A permission is ``resource:action``; a role is a set of permissions. Access checks name
permissions, never roles, so changing what a role may do is one edit here. Operators run
the platform and hold no ``phi:*`` permission; devices only upload.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class Permission(StrEnum):
    EXAM_READ = "exam:read"
    EXAM_CREATE = "exam:create"
    EXAM_COMMENT = "exam:comment"
    EXAM_SHARE = "exam:share"
    EXAM_EXPORT = "exam:export"
    EXAM_ARCHIVE = "exam:archive"  # hide from default lists, and back
    EXAM_DELETE = "exam:delete"  # subject to retention and legal hold
    EXAM_HOLD = "exam:hold"  # place and release a legal hold
    PHI_READ = "phi:read"
    AUDIT_READ = "audit:read"
    AUDIT_EXPORT = "audit:export"
    USER_MANAGE = "user:manage"
    DEVICE_MANAGE = "device:manage"
    PACS_MANAGE = "pacs:manage"  # the institution's PACS destinations for export
    # an institution admin's own institution: password, session and MFA policy
    INSTITUTION_CONFIGURE = "institution:configure"
    # the platform's institutions: create, list (operators)
    INSTITUTION_MANAGE = "institution:manage"
    KEYS_MANAGE = "keys:manage"
    BACKUP_MANAGE = "backup:manage"


class Role(StrEnum):
    OPERATOR = "operator"
    INSTITUTION_ADMIN = "institution_admin"
    CLINICIAN = "clinician"
    AUDITOR = "auditor"
    DEVICE = "device"


ROLE_PERMISSIONS: Mapping[Role, frozenset[Permission]] = MappingProxyType(
    {
        # Operators review and export the platform's own audit records; the audit routes
        # scope a principal without an institution to records without one (issue 4).
        Role.OPERATOR: frozenset(
            {
                Permission.INSTITUTION_MANAGE,
                Permission.KEYS_MANAGE,
                Permission.BACKUP_MANAGE,
                Permission.AUDIT_READ,
                Permission.AUDIT_EXPORT,
            }
        ),
        # Institution admins manage the lifecycle of their institution's exams (archive,
        # legal hold, deletion): they read them de-identified (exam:read without phi:read).
        Role.INSTITUTION_ADMIN: frozenset(
            {
                Permission.EXAM_READ,
                Permission.EXAM_ARCHIVE,
                Permission.EXAM_DELETE,
                Permission.EXAM_HOLD,
                Permission.USER_MANAGE,
                Permission.DEVICE_MANAGE,
                Permission.PACS_MANAGE,
                Permission.INSTITUTION_CONFIGURE,
                Permission.AUDIT_READ,
            }
        ),
        Role.CLINICIAN: frozenset(
            {
                Permission.EXAM_READ,
                Permission.EXAM_CREATE,
                Permission.EXAM_COMMENT,
                Permission.EXAM_SHARE,
                Permission.EXAM_EXPORT,
                Permission.EXAM_ARCHIVE,
                Permission.PHI_READ,
            }
        ),
        Role.AUDITOR: frozenset({Permission.AUDIT_READ, Permission.AUDIT_EXPORT}),
        Role.DEVICE: frozenset({Permission.EXAM_CREATE}),
    }
)

ADMIN_ROLES = frozenset({Role.OPERATOR, Role.INSTITUTION_ADMIN})
"""Roles whose requests are accepted only from ``PHIVAULT_ADMIN_ALLOW_CIDRS``, and who
must use MFA unless their institution switches it off (operators always)."""

PLATFORM_ROLES = frozenset({Role.OPERATOR})
"""Roles that belong to no institution."""

USER_ROLES = frozenset(Role) - {Role.DEVICE}
"""Roles a person can hold; devices become principals through activation (devices part)."""
