"""Key rotation as a resumable background job, and the key status report.

Rotation re-wraps keys; it never re-encrypts data (DESIGN §4):

* **root**: the keyring makes a new root key version current; the job then re-wraps every
  institution key that is still in use under it. When none is left on an older version,
  and after a settle delay that waits out transactions which wrapped a new institution
  key under the old version just before the switch, versions that nothing references any
  more are retired in the keyring (``Keyring.retire``).
* **institution**: a new version of the institution's key becomes current at once (new
  patient keys use it); the job re-wraps that institution's patient keys under it, then
  retires the old versions.

Each job run handles one bounded batch in the worker's transaction and enqueues the next
run in the same transaction, so a process killed at any moment leaves either the batch
done and its successor queued, or neither: running again finishes the rotation and no
key is lost. Every re-wrap is a conditional UPDATE (still wrapped by what was read, not
destroyed meanwhile), so a rotation never brings a shredded key back. The rotation row is
locked for the batch, so the CLI and workers may drive the same rotation side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.models import AuditSigningKey
from phivault.audit.service import Actor, Subject, SystemSubject, Target, record
from phivault.crypto.errors import KeyNotFound, RotationInProgress
from phivault.crypto.keyring import WrappedKey
from phivault.crypto.keyring.errors import KeyringError
from phivault.crypto.models import (
    InstitutionKey,
    InstitutionKeyStatus,
    KeyRotation,
    PatientKey,
    PurgeLedgerEntry,
    RotationScope,
    RotationStatus,
)
from phivault.crypto.service import KeyHierarchy, institution_key_aad
from phivault.db.jobs import JobContext, enqueue
from phivault.ids import new_id

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "ROOT_SETTLE",
    "ROTATION_JOB",
    "InstitutionKeyReport",
    "KeyStatusReport",
    "RootVersionReport",
    "RotationProgress",
    "active_rotation",
    "key_status",
    "rotation_job_handler",
    "run_rotation_batch",
    "start_rotation",
]

ROTATION_JOB: Final = "crypto.key_rotation"
DEFAULT_BATCH_SIZE: Final = 200
# Longer than any transaction that wraps a key lives (the job lease is at most an hour,
# but creating an institution key is one short transaction).
ROOT_SETTLE: Final = timedelta(minutes=5)
_ROTATION_ACTOR: Final = Actor.system("key-rotation")


@dataclass(frozen=True, slots=True)
class RotationProgress:
    """Where a rotation stands."""

    id: str
    scope: str
    institution_id: str | None
    from_version: int
    to_version: int
    status: str
    total: int
    rewrapped: int
    batches: int
    retired_version: int | None
    settle_until: datetime | None
    started_at: datetime
    completed_at: datetime | None

    @property
    def done(self) -> bool:
        return self.status == RotationStatus.COMPLETED.value


def _progress(row: KeyRotation) -> RotationProgress:
    return RotationProgress(
        id=row.id,
        scope=row.scope,
        institution_id=row.institution_id,
        from_version=row.from_version,
        to_version=row.to_version,
        status=row.status,
        total=row.total,
        rewrapped=row.rewrapped,
        batches=row.batches,
        retired_version=row.retired_version,
        settle_until=row.settle_until,
        started_at=row.started_at,
        completed_at=row.completed_at,
    )


def _scope_key(institution_id: str | None) -> str:
    return RotationScope.ROOT.value if institution_id is None else f"institution:{institution_id}"


def _job_key(rotation_id: str, batch: int) -> str:
    return f"key-rotation/{rotation_id}/{batch}"


def active_rotation(session: Session, institution_id: str | None) -> RotationProgress | None:
    """The unfinished rotation of the root key (``None``) or of an institution's key."""
    row = session.scalars(
        select(KeyRotation).where(
            KeyRotation.scope_key == _scope_key(institution_id),
            KeyRotation.status != RotationStatus.COMPLETED.value,
        )
    ).first()
    return None if row is None else _progress(row)


def start_rotation(
    keys: KeyHierarchy,
    session: Session,
    *,
    institution_id: str | None,
    actor: Subject,
    now: datetime,
) -> RotationProgress:
    """Rotate the root key (``institution_id=None``) or one institution's key.

    Makes the new version current and queues the re-wrap job in the caller's transaction.
    If a rotation of that scope is unfinished, returns it instead (resume, not restart).
    """
    active = active_rotation(session, institution_id)
    if active is not None:
        return active
    if institution_id is None:
        rotation = _start_root(keys, session, now)
        target = Target("root_key", f"{keys.keyring.key_id}@{rotation.to_version}")
    else:
        rotation = _start_institution(keys, session, institution_id, now)
        target = Target("institution_key", f"{institution_id}@{rotation.to_version}")
    try:
        with session.begin_nested():
            session.add(rotation)
            session.flush()
    except IntegrityError:
        raise RotationInProgress from None
    enqueue(session, ROTATION_JOB, {"rotation_id": rotation.id}, now=now, dedupe_key=_job_key(rotation.id, 0))
    record(
        session,
        AuditAction.KEY_ROTATE,
        actor,
        target,
        Outcome.SUCCESS,
        now=now,
        institution_id=institution_id,
    )
    return _progress(rotation)


def _new_rotation(
    scope: RotationScope,
    institution_id: str | None,
    from_version: int,
    to_version: int,
    total: int,
    now: datetime,
) -> KeyRotation:
    return KeyRotation(
        id=new_id(),
        scope=scope.value,
        scope_key=_scope_key(institution_id),
        institution_id=institution_id,
        from_version=from_version,
        to_version=to_version,
        status=RotationStatus.REWRAPPING.value,
        cursor=None,
        total=total,
        rewrapped=0,
        batches=0,
        retired_version=None,
        settle_until=None,
        started_at=now,
        updated_at=now,
        completed_at=None,
    )


def _start_root(keys: KeyHierarchy, session: Session, now: datetime) -> KeyRotation:
    from_version = keys.keyring.current_version()
    # Outside the database: a crash before commit leaves an unused root version behind,
    # which costs nothing; the next attempt makes another.
    to_version = keys.keyring.create_version()
    total = session.scalar(
        select(func.count())
        .select_from(InstitutionKey)
        .where(
            InstitutionKey.status != InstitutionKeyStatus.RETIRED.value,
            InstitutionKey.root_version < to_version,
        )
    )
    return _new_rotation(RotationScope.ROOT, None, from_version, to_version, total or 0, now)


def _start_institution(
    keys: KeyHierarchy, session: Session, institution_id: str, now: datetime
) -> KeyRotation:
    # FOR UPDATE waits for transactions that are wrapping patient keys under it (they hold
    # it FOR SHARE), so none can slip in under the old version after this commits.
    current = session.scalars(
        select(InstitutionKey)
        .where(
            InstitutionKey.institution_id == institution_id,
            InstitutionKey.status == InstitutionKeyStatus.CURRENT.value,
        )
        .with_for_update()
    ).first()
    if current is None:
        msg = "the institution has no key to rotate"
        raise KeyNotFound(msg)
    current.status = InstitutionKeyStatus.PREVIOUS.value
    session.flush()  # the one-current-per-institution index sees the old row step down first
    new = keys.create_institution_key_row(institution_id, current.version + 1, now)
    session.add(new)
    session.flush()
    total = session.scalar(
        select(func.count())
        .select_from(PatientKey)
        .where(
            PatientKey.institution_id == institution_id,
            PatientKey.institution_key_id != new.id,
            PatientKey.wrapped_key.is_not(None),
        )
    )
    return _new_rotation(
        RotationScope.INSTITUTION, institution_id, current.version, new.version, total or 0, now
    )


def run_rotation_batch(
    keys: KeyHierarchy,
    session: Session,
    rotation_id: str,
    *,
    now: datetime,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> RotationProgress:
    """Do one bounded step of a rotation in the caller's transaction; queue the next step.

    Safe to call for a finished rotation (nothing happens) and from several processes at
    once (the rotation row is locked for the duration).
    """
    rotation = session.scalars(
        select(KeyRotation).where(KeyRotation.id == rotation_id).with_for_update()
    ).first()
    if rotation is None:
        msg = "no such rotation"
        raise KeyNotFound(msg)
    if rotation.status == RotationStatus.COMPLETED.value:
        return _progress(rotation)
    if (
        rotation.status == RotationStatus.SETTLING.value
        and rotation.settle_until
        and now < rotation.settle_until
    ):
        return _progress(rotation)
    if rotation.scope == RotationScope.ROOT.value:
        _root_step(keys, session, rotation, now, batch_size)
    else:
        _institution_step(keys, session, rotation, now, batch_size)
    rotation.batches += 1
    rotation.updated_at = now
    if rotation.status != RotationStatus.COMPLETED.value:
        enqueue(
            session,
            ROTATION_JOB,
            {"rotation_id": rotation.id},
            now=now,
            run_at=rotation.settle_until if rotation.status == RotationStatus.SETTLING.value else now,
            dedupe_key=_job_key(rotation.id, rotation.batches),
        )
    session.flush()
    return _progress(rotation)


def _institution_step(
    keys: KeyHierarchy, session: Session, rotation: KeyRotation, now: datetime, batch_size: int
) -> None:
    institution_id = rotation.institution_id
    current = session.scalars(
        select(InstitutionKey).where(
            InstitutionKey.institution_id == institution_id,
            InstitutionKey.status == InstitutionKeyStatus.CURRENT.value,
        )
    ).one()
    batch = session.execute(
        select(PatientKey, InstitutionKey)
        .join(InstitutionKey, PatientKey.institution_key_id == InstitutionKey.id)
        .where(
            PatientKey.institution_id == institution_id,
            PatientKey.institution_key_id != current.id,
            PatientKey.wrapped_key.is_not(None),
        )
        .order_by(PatientKey.id)
        .limit(batch_size)
        .with_for_update(of=PatientKey)
    ).all()
    patient: PatientKey
    old: InstitutionKey
    for patient, old in batch:
        rewrapped = keys.wrap_patient_key(keys.rewrap_source_key(patient, old), patient, current)
        changed = session.execute(
            update(PatientKey)
            .where(
                PatientKey.id == patient.id,
                PatientKey.institution_key_id == old.id,
                PatientKey.wrapped_key.is_not(None),  # destroyed meanwhile: stays destroyed
            )
            .values(wrapped_key=rewrapped, institution_key_id=current.id)
            .execution_options(synchronize_session=False)
        )
        rotation.rewrapped += changed.rowcount  # type: ignore[attr-defined]
        rotation.cursor = patient.id
    if len(batch) == batch_size:
        return
    if _retire_unused_institution_keys(keys, session, institution_id or "", now):
        rotation.status = RotationStatus.COMPLETED.value
        rotation.completed_at = now


def _retire_unused_institution_keys(
    keys: KeyHierarchy, session: Session, institution_id: str, now: datetime
) -> bool:
    """Retire the institution's superseded versions that wrap nothing; whether all went."""
    previous = session.scalars(
        select(InstitutionKey)
        .where(
            InstitutionKey.institution_id == institution_id,
            InstitutionKey.status == InstitutionKeyStatus.PREVIOUS.value,
        )
        .with_for_update()
    ).all()
    all_retired = True
    for row in previous:
        in_use = session.scalar(
            select(func.count())
            .select_from(PatientKey)
            .where(PatientKey.institution_key_id == row.id, PatientKey.wrapped_key.is_not(None))
        )
        if in_use:
            all_retired = False
            continue
        row.status = InstitutionKeyStatus.RETIRED.value
        row.retired_at = now
        keys.forget_institution_key(row.id)
        record(
            session,
            AuditAction.KEY_RETIRE,
            SystemSubject(_ROTATION_ACTOR, institution_id),
            Target("institution_key", f"{institution_id}@{row.version}"),
            Outcome.SUCCESS,
            now=now,
        )
    return all_retired


def _root_step(
    keys: KeyHierarchy, session: Session, rotation: KeyRotation, now: datetime, batch_size: int
) -> None:
    batch = session.scalars(
        select(InstitutionKey)
        .where(
            InstitutionKey.status != InstitutionKeyStatus.RETIRED.value,
            InstitutionKey.root_version < rotation.to_version,
        )
        .order_by(InstitutionKey.id)
        .limit(batch_size)
        .with_for_update()
    ).all()
    for row in batch:
        key = keys.unwrap_institution_key(row)
        wrapped = keys.keyring.wrap(key, aad=institution_key_aad(row.institution_id, row.version))
        changed = session.execute(
            update(InstitutionKey)
            .where(InstitutionKey.id == row.id, InstitutionKey.root_version == row.root_version)
            .values(wrapped_key=wrapped.to_bytes(), root_key_id=wrapped.key_id, root_version=wrapped.version)
            .execution_options(synchronize_session=False)
        )
        rotation.rewrapped += changed.rowcount  # type: ignore[attr-defined]
        rotation.cursor = row.id
    if len(batch) == batch_size:
        return
    if rotation.status == RotationStatus.REWRAPPING.value or batch:
        # Everything visible is moved; wait out transactions that may still commit an
        # institution key wrapped under the old version, then look again.
        rotation.status = RotationStatus.SETTLING.value
        rotation.settle_until = now + ROOT_SETTLE
        return
    rotation.retired_version = _retire_unused_root_versions(keys, session, rotation, now)
    rotation.status = RotationStatus.COMPLETED.value
    rotation.completed_at = now


def root_versions_in_use(session: Session) -> dict[int, int]:
    """How many stored keys each root key version wraps (institution and audit keys).

    Every table that stores a key wrapped by the keyring must be counted here, or
    retirement could strand it.
    """
    counts: dict[int, int] = {}
    for version, count in session.execute(
        select(InstitutionKey.root_version, func.count())
        .where(InstitutionKey.status != InstitutionKeyStatus.RETIRED.value)
        .group_by(InstitutionKey.root_version)
    ):
        counts[version] = counts.get(version, 0) + count
    # The audit log's checkpoint keys are append-only and so never re-wrapped: the root
    # versions under them stay usable as long as they exist.
    for (wrapped,) in session.execute(select(AuditSigningKey.wrapped_private_key)):
        try:
            version = WrappedKey.from_bytes(wrapped).version
        except KeyringError:
            continue
        counts[version] = counts.get(version, 0) + 1
    return counts


def _retire_unused_root_versions(
    keys: KeyHierarchy, session: Session, rotation: KeyRotation, now: datetime
) -> int | None:
    """Retire every root version below the oldest one still in use; return the highest retired."""
    in_use = [version for version, count in root_versions_in_use(session).items() if count]
    limit = min([*in_use, rotation.to_version]) - 1
    already = max((v.version for v in keys.keyring.versions() if v.retired), default=0)
    if limit < 1 or limit <= already:
        return None
    # Irreversible and outside the transaction; checking ``already`` keeps a repeated run
    # (after a crash before commit) from asking twice.
    keys.keyring.retire(limit)
    record(
        session,
        AuditAction.KEY_RETIRE,
        SystemSubject(_ROTATION_ACTOR),
        Target("root_key", f"{keys.keyring.key_id}@{limit}"),
        Outcome.SUCCESS,
        now=now,
    )
    return limit


def rotation_job_handler(
    keys: KeyHierarchy, batch_size: int = DEFAULT_BATCH_SIZE
) -> Callable[[JobContext], None]:
    """The job handler: one batch per run (the batch queues its successor)."""

    def handle(context: JobContext) -> None:
        rotation_id = context.payload.get("rotation_id")
        if not isinstance(rotation_id, str):
            return
        run_rotation_batch(keys, context.session, rotation_id, now=context.now, batch_size=batch_size)

    return handle


# --- Status ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RootVersionReport:
    version: int
    created_at: datetime | None
    age_days: int | None
    current: bool
    retired: bool
    wraps: int  # stored keys this version wraps


@dataclass(frozen=True, slots=True)
class InstitutionKeyReport:
    institution_id: str
    version: int
    status: str
    created_at: datetime
    age_days: int
    root_version: int
    wraps: int  # live patient keys this version wraps


@dataclass(frozen=True, slots=True)
class KeyStatusReport:
    keyring: str
    root_key_id: str
    root_versions: list[RootVersionReport]
    institution_keys: list[InstitutionKeyReport]
    rotations: list[RotationProgress]  # unfinished ones, then the 10 latest finished
    patient_keys: int
    shredded_patient_keys: int
    rotation_days: int
    overdue: list[str]  # "root" and institution ids whose current key is older than that


def key_status(keys: KeyHierarchy, session: Session, *, now: datetime, rotation_days: int) -> KeyStatusReport:
    """Versions, ages, what each version wraps, rotations, and what is overdue."""
    wraps_by_root = root_versions_in_use(session)
    root_versions = [
        RootVersionReport(
            version=v.version,
            created_at=v.created_at,
            age_days=None if v.created_at is None else (now - v.created_at).days,
            current=v.current,
            retired=v.retired,
            wraps=wraps_by_root.get(v.version, 0),
        )
        for v in keys.keyring.versions()
    ]
    wraps_by_institution_key = {
        str(key_id): int(count)
        for key_id, count in session.execute(
            select(PatientKey.institution_key_id, func.count())
            .where(PatientKey.wrapped_key.is_not(None))
            .group_by(PatientKey.institution_key_id)
        )
    }
    institution_rows = session.scalars(
        select(InstitutionKey).order_by(InstitutionKey.institution_id, InstitutionKey.version)
    ).all()
    institution_keys = [
        InstitutionKeyReport(
            institution_id=row.institution_id,
            version=row.version,
            status=row.status,
            created_at=row.created_at,
            age_days=(now - row.created_at).days,
            root_version=row.root_version,
            wraps=wraps_by_institution_key.get(row.id, 0),
        )
        for row in institution_rows
    ]
    unfinished = session.scalars(
        select(KeyRotation)
        .where(KeyRotation.status != RotationStatus.COMPLETED.value)
        .order_by(KeyRotation.started_at)
    ).all()
    finished = session.scalars(
        select(KeyRotation)
        .where(KeyRotation.status == RotationStatus.COMPLETED.value)
        .order_by(KeyRotation.started_at.desc())
        .limit(10)
    ).all()
    patient_keys = session.scalar(select(func.count()).select_from(PatientKey)) or 0
    shredded = session.scalar(select(func.count()).select_from(PurgeLedgerEntry)) or 0
    return KeyStatusReport(
        keyring=keys.keyring.describe(),
        root_key_id=keys.keyring.key_id,
        root_versions=root_versions,
        institution_keys=institution_keys,
        rotations=[_progress(row) for row in (*unfinished, *finished)],
        patient_keys=patient_keys,
        shredded_patient_keys=shredded,
        rotation_days=rotation_days,
        overdue=overdue_keys(root_versions, institution_keys, now=now, rotation_days=rotation_days),
    )


def overdue_keys(
    root_versions: list[RootVersionReport],
    institution_keys: list[InstitutionKeyReport],
    *,
    now: datetime,
    rotation_days: int,
) -> list[str]:
    """Which current keys are older than the rotation period: "root" and institution ids."""
    limit = now - timedelta(days=rotation_days)
    overdue = [
        "root" for v in root_versions if v.current and v.created_at is not None and v.created_at < limit
    ]
    overdue += [
        row.institution_id
        for row in institution_keys
        if row.status == InstitutionKeyStatus.CURRENT.value and row.created_at < limit
    ]
    return overdue
