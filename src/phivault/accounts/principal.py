"""Who is acting: the ``Principal`` every service function takes and scopes queries by."""

from __future__ import annotations

from dataclasses import dataclass

from phivault.accounts.permissions import ROLE_PERMISSIONS, Permission, Role
from phivault.audit.actions import ActorType
from phivault.audit.service import Actor


@dataclass(frozen=True)
class Principal:
    """An authenticated user or device; satisfies ``phivault.audit.service.Subject``.

    ``institution_id`` is ``None`` for platform operators, who belong to no tenant.
    ``session_id`` is the session the request came through (``None`` for devices).
    """

    actor: Actor
    institution_id: str | None
    role: Role
    permissions: frozenset[Permission]
    session_id: str | None

    def has(self, permission: Permission) -> bool:
        return permission in self.permissions

    @property
    def user_id(self) -> str:
        return self.actor.id

    @classmethod
    def for_user(
        cls, user_id: str, institution_id: str | None, role: Role, session_id: str | None
    ) -> Principal:
        return cls(
            actor=Actor(ActorType.USER, user_id),
            institution_id=institution_id,
            role=role,
            permissions=ROLE_PERMISSIONS[role],
            session_id=session_id,
        )
