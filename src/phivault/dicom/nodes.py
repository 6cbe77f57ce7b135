"""DICOM nodes: the application entities allowed to send to the C-STORE SCP.

A node maps a calling AE title to an institution (and optionally one of its devices); the
SCP refuses associations from any other AE title. Institution admins manage their own
institution's nodes (``device:manage``); the CLI manages every institution's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.accounts.models import Institution
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.accounts.service import Authority
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, RequestContext, Target, record
from phivault.clock import Clock
from phivault.db.engine import Database
from phivault.devices.models import Device
from phivault.dicom.aetitle import ae_title_problem
from phivault.dicom.errors import (
    AeTitleTaken,
    DicomNodeForbidden,
    DicomNodeNotFound,
    InvalidAeTitle,
    InvalidDicomNode,
)
from phivault.exams.models import DicomNode
from phivault.ids import new_id

MAX_DESCRIPTION = 200  # the column's length
MAX_ID = 36


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: str
    institution_id: str
    ae_title: str
    device_id: str | None
    description: str
    created_at: datetime


def _info(row: DicomNode) -> NodeInfo:
    return NodeInfo(row.id, row.institution_id, row.ae_title, row.device_id, row.description, row.created_at)


def _require(actor: Authority) -> None:
    if isinstance(actor, Principal) and not actor.has(Permission.DEVICE_MANAGE):
        raise DicomNodeForbidden


def _scope(actor: Authority, institution_id: str | None) -> str | None:
    """The institution ``actor`` acts in: a principal's own, whatever it asks for; the
    CLI's the one it names (``None``: every institution).
    """
    if isinstance(actor, Principal):
        if actor.institution_id is None:
            raise DicomNodeForbidden  # a platform principal belongs to no institution
        return actor.institution_id
    return institution_id


class DicomNodes:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def add(  # the node's fields, named at each call site
        self,
        actor: Authority,
        *,
        ae_title: str,
        institution_id: str | None = None,
        device_id: str | None = None,
        description: str = "",
        context: RequestContext = NO_CONTEXT,
    ) -> NodeInfo:
        """Register a calling AE title for an institution (a principal's own)."""
        _require(actor)
        scope = _scope(actor, institution_id)
        if scope is None:
            raise InvalidDicomNode("name the institution the node sends for")
        problem = ae_title_problem(ae_title)
        if problem is not None:
            raise InvalidAeTitle(problem)
        description = " ".join(description.split())
        if len(description) > MAX_DESCRIPTION:
            raise InvalidDicomNode(f"a description has at most {MAX_DESCRIPTION} characters")
        if device_id is not None and not 1 <= len(device_id) <= MAX_ID:
            raise InvalidDicomNode(f"a device id has 1 to {MAX_ID} characters")
        now = self._clock.now()
        row = DicomNode(
            id=new_id(),
            institution_id=scope,
            # Peers pad AE titles with spaces (PS3.8 §9.3.2); only the rest is significant.
            ae_title=ae_title.strip(" "),
            device_id=device_id,
            description=description,
            created_at=now,
        )
        try:
            with self._db.transaction() as session:
                if session.get(Institution, scope) is None:
                    raise DicomNodeNotFound("no such institution")
                if device_id is not None:
                    device = session.get(Device, device_id)
                    # Another institution's device is as unknown as a missing one.
                    if device is None or device.institution_id != scope or device.revoked_at is not None:
                        raise DicomNodeNotFound("no such active device in this institution")
                session.add(row)
                session.flush()
                self._record(session, AuditAction.DICOM_NODE_CREATE, actor, row, context, now)
        except IntegrityError:
            raise AeTitleTaken from None
        return _info(row)

    def list(self, actor: Authority, institution_id: str | None = None) -> list[NodeInfo]:
        _require(actor)
        scope = _scope(actor, institution_id)
        query = select(DicomNode).order_by(DicomNode.ae_title)
        if scope is not None:
            query = query.where(DicomNode.institution_id == scope)
        with self._db.transaction() as session:
            return [_info(row) for row in session.scalars(query)]

    def remove(self, actor: Authority, node_id: str, context: RequestContext = NO_CONTEXT) -> NodeInfo:
        """Remove a node: its AE title can no longer associate (open associations end
        with their current exchange, they are not cut).
        """
        _require(actor)
        scope = _scope(actor, None)
        now = self._clock.now()
        with self._db.transaction() as session:
            row = session.get(DicomNode, node_id) if len(node_id) <= MAX_ID else None
            if row is None or (scope is not None and row.institution_id != scope):
                raise DicomNodeNotFound
            info = _info(row)
            session.delete(row)
            self._record(session, AuditAction.DICOM_NODE_DELETE, actor, row, context, now)
        return info

    def by_ae_title(self, ae_title: str) -> NodeInfo | None:
        """The node a calling AE title names (for the SCP; no actor: the caller is unknown)."""
        title = ae_title.strip(" ")
        if ae_title_problem(title) is not None:
            return None
        with self._db.transaction() as session:
            row = session.scalars(select(DicomNode).where(DicomNode.ae_title == title)).first()
            return None if row is None else _info(row)

    @staticmethod
    def _record(  # the audit record's fields
        session: Session,
        action: AuditAction,
        actor: Authority,
        row: DicomNode,
        context: RequestContext,
        now: datetime,
    ) -> None:
        record(
            session,
            action,
            actor,
            Target("dicom_node", row.id),
            Outcome.SUCCESS,
            now=now,
            context=context,
            institution_id=row.institution_id,
        )
