"""Failed-attempt throttling with exponential back-off, kept in the database.

Two keys are counted for each failed sign-in: the account (the e-mail as typed, lower
case, hashed — unknown addresses are counted too, so a lock says nothing about whether an
account exists) and the client address. After ``free`` failures, each further failure
locks the key for 2, 4, 8 … seconds up to ``max_delay``; a success clears the account's
count, and a count is forgotten ``forget_after`` its last failure. Failures while a key
is locked do not lengthen the lock, so nobody can keep someone else's account locked for
longer than ``max_delay`` at a time (ASVS 6.1.1, 6.3.1; NIST SP 800-63B §5.2.2: far
fewer than 100 consecutive failures an account can be tried in an hour).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from phivault.accounts.models import Throttle
from phivault.ids import token_digest


@dataclass(frozen=True, slots=True)
class ThrottlePolicy:
    prefix: str
    free: int
    max_delay: timedelta
    forget_after: timedelta

    def key(self, subject: str) -> str:
        return f"{self.prefix}:{token_digest(subject)}"


ACCOUNT = ThrottlePolicy("account", free=5, max_delay=timedelta(minutes=15), forget_after=timedelta(hours=24))
CLIENT = ThrottlePolicy("ip", free=30, max_delay=timedelta(minutes=15), forget_after=timedelta(hours=1))
# Password reset: at most three e-mails to one account an hour, silently (the answer never
# changes), and twenty requests from one client an hour.
RESET_MAIL = ThrottlePolicy("reset", free=3, max_delay=timedelta(hours=1), forget_after=timedelta(hours=1))
RESET_CLIENT = ThrottlePolicy(
    "reset-ip", free=20, max_delay=timedelta(hours=1), forget_after=timedelta(hours=1)
)


@dataclass(frozen=True, slots=True)
class ThrottleState:
    failures: int
    locked_until: datetime | None
    lock_started: bool = False

    def locked(self, now: datetime) -> bool:
        return self.locked_until is not None and now < self.locked_until


def state(session: Session, policy: ThrottlePolicy, subject: str, now: datetime) -> ThrottleState:
    row = session.get(Throttle, policy.key(subject))
    if row is None or now - row.updated_at > policy.forget_after:
        return ThrottleState(0, None)
    return ThrottleState(row.failures, row.locked_until)


def record_failure(session: Session, policy: ThrottlePolicy, subject: str, now: datetime) -> ThrottleState:
    """Count a failure and return the new state; ``locked_until`` set means a lock began."""
    key = policy.key(subject)
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        insert(Throttle)
        .values(key=key, failures=0, locked_until=None, updated_at=now)
        .on_conflict_do_nothing(index_elements=["key"])
    )
    row = session.scalars(
        select(Throttle)
        .where(Throttle.key == key)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()
    if now - row.updated_at > policy.forget_after:
        row.failures, row.locked_until = 0, None
    if row.locked_until is not None and now < row.locked_until:
        return ThrottleState(row.failures, row.locked_until)
    row.failures += 1
    row.updated_at = now
    excess = row.failures - policy.free
    if excess > 0:
        delay = min(timedelta(seconds=2 ** min(excess, 30)), policy.max_delay)
        row.locked_until = now + delay
        return ThrottleState(row.failures, row.locked_until, lock_started=True)
    row.locked_until = None
    return ThrottleState(row.failures, None)


def clear(session: Session, policy: ThrottlePolicy, subject: str) -> None:
    session.execute(delete(Throttle).where(Throttle.key == policy.key(subject)))


def purge_stale(session: Session, now: datetime) -> None:
    """Forget rows nobody has failed on for a day (every policy forgets by then)."""
    session.execute(delete(Throttle).where(Throttle.updated_at < now - timedelta(hours=24)))
