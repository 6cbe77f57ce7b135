"""Share links: an exam shown outside the institution, de-identified, through a secret link.

* **Create** (``exam:share``, the owning institution): a 256-bit token (``ids.new_token``)
  whose SHA-256 is stored, never the token; an expiry no later than
  ``PHIVAULT_SHARE_MAX_DAYS`` ahead; ``view`` (page and previews) or ``download`` (also the
  DICOM files); an optional passcode, hashed like a password (the accounts' Argon2id or
  PBKDF2 hasher). The instances shared are fixed when the link is made (``ShareItem``).
* **E-mail**: with a recipient address, a job makes the token and mails the link
  (``accounts.mail``), so the link never sits in the job queue and its creator never sees
  it. Without an SMTP server (``PHIVAULT_SMTP_HOST`` empty) nothing is sent and the answer
  says so (``delivery: not_configured``) and hands the link to its creator instead.
* **Use** (``/share/{token}``, no sign-in): an expired, revoked, blocked or unknown link,
  or one whose exam is gone, is one and the same ``NotFound``. A passcode, once verified,
  gives a cookie (``grant``: an HMAC under the institution's secret, bound to the link, its
  passcode hash and an expiry); failed passcodes are throttled per link and per address
  with exponential back-off. Every use counts (``access_count``) and is audited.
* **Content**: only what ingest stored de-identified, and only after the egress guard
  (``egress.py``) found none of the patient's PHI in it. A hit suspends the link
  (``blocked_at``), logs an alert without values, records ``egress.block`` naming the link
  and the patient's pseudonym, and the recipient gets the same 404 as for a dead link.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from phivault.accounts import throttle
from phivault.accounts.errors import Forbidden, Throttled
from phivault.accounts.mail import Mailer, MailError
from phivault.accounts.passwords import PasswordHasher, normalise, too_long
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.service import Actor, RequestContext, SystemSubject, Target, record
from phivault.config.settings import Settings
from phivault.db.jobs import JobContext, JobError, JobRegistry, enqueue
from phivault.dicom.layout import FramesUnavailable, LayoutError
from phivault.dicom.render import RenderingUnavailable, RenderOptions, decode_frame, render
from phivault.exams.egress import EgressBlocked, EgressGuard, record_values
from phivault.exams.errors import InvalidRequest, NotFound
from phivault.exams.models import Instance, Series, Study
from phivault.exams.outbound_models import ShareDelivery, ShareItem, ShareLink, ShareMode
from phivault.exams.policy import Policies
from phivault.exams.reading import ExamReader, InstanceReading
from phivault.ids import new_id, new_token, token_digest

log = logging.getLogger(__name__)

SHARE_MAIL_JOB: Final = "exams.share_mail"
SHARE_MAIL_ATTEMPTS: Final = 5
MIN_PASSCODE: Final = 6
MAX_PASSCODE: Final = 128
GRANT_TTL: Final = timedelta(hours=12)
MAX_SHARED_INSTANCES: Final = 10_000
_GRANT_PURPOSE: Final = "share-grant"
# Passcode guessing: five free tries per link, then 2, 4, 8 … seconds up to an hour; and
# per client address across links.
SHARE_PASSCODE: Final = throttle.ThrottlePolicy(
    "share", free=5, max_delay=timedelta(hours=1), forget_after=timedelta(hours=24)
)
SHARE_CLIENT: Final = throttle.ThrottlePolicy(
    "share-ip", free=30, max_delay=timedelta(hours=1), forget_after=timedelta(hours=1)
)


class PasscodeRequired(Exception):
    """The link has a passcode and the request carries no valid grant (401)."""


class WrongPasscode(Exception):
    """The passcode did not match (401); counted against the link and the address."""


class NotDownloadable(Exception):
    """A view-only link was asked for DICOM (403)."""


@dataclass(frozen=True, slots=True)
class ShareRequest:
    expires_at: datetime
    mode: ShareMode
    passcode: str | None = None
    recipient_email: str | None = None


@dataclass(frozen=True, slots=True)
class ShareInfo:
    """A share as its institution sees it (never the token)."""

    id: str
    exam_id: str
    mode: ShareMode
    expires_at: datetime
    created_at: datetime
    created_by: str
    has_passcode: bool
    recipient_email: str | None
    delivery: ShareDelivery
    status: str  # active, expired, revoked, blocked, pending (e-mail not sent yet)
    access_count: int
    last_access_at: datetime | None
    instances: int

    @classmethod
    def of(cls, row: ShareLink, instances: int, now: datetime) -> ShareInfo:
        if row.revoked_at is not None:
            status = "revoked"
        elif row.blocked_at is not None:
            status = "blocked"
        elif row.expires_at <= now:
            status = "expired"
        elif row.token_digest is None:
            status = "pending"
        else:
            status = "active"
        return cls(
            id=row.id,
            exam_id=row.study_id,
            mode=ShareMode(row.mode),
            expires_at=row.expires_at,
            created_at=row.created_at,
            created_by=row.created_by,
            has_passcode=row.passcode_hash is not None,
            recipient_email=row.recipient_email,
            delivery=ShareDelivery(row.delivery),
            status=status,
            access_count=row.access_count,
            last_access_at=row.last_access_at,
            instances=instances,
        )


@dataclass(frozen=True, slots=True)
class CreatedShare:
    share: ShareInfo
    token: str | None  # only when the creator gets the link (no e-mail sent)


@dataclass(frozen=True, slots=True)
class SharedInstance:
    """One instance of a share page: de-identified index values only."""

    number: int
    modality: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    frames: int
    size: int


@dataclass(frozen=True, slots=True)
class SharePage:
    mode: ShareMode
    expires_at: datetime
    study_description: str
    modalities: list[str]
    instances: list[SharedInstance]


@dataclass(frozen=True)
class OpenShare:
    """A live share, found by its token: what a public request may read."""

    share_id: str
    institution_id: str
    mode: ShareMode
    expires_at: datetime
    study: Study
    items: dict[int, str]  # number → instance id

    @property
    def subject(self) -> SystemSubject:
        return SystemSubject(Actor(ActorType.ANONYMOUS, f"share:{self.share_id}"), self.institution_id)


class ShareService:
    """``runtime.shares``: see the module docstring."""

    def __init__(  # the runtime's parts this service composes
        self,
        settings: Settings,
        reader: ExamReader,
        policies: Policies,
        hasher: PasswordHasher,
        mailer: Mailer,
    ) -> None:
        self.settings = settings
        self.reader = reader
        self.policies = policies
        self.hasher = hasher
        self.mailer = mailer
        self.max_lifetime = timedelta(days=settings.share_max_days)

    def register_jobs(self, registry: JobRegistry) -> None:
        registry.register(SHARE_MAIL_JOB, self._mail_job)

    @property
    def _clock_now(self) -> datetime:
        return self.reader.clock.now()

    # -- the institution's side -----------------------------------------------------------

    def create(
        self, principal: Principal, exam_id: str, request: ShareRequest, *, context: RequestContext
    ) -> CreatedShare:
        if not principal.has(Permission.EXAM_SHARE):
            raise Forbidden
        now = self._clock_now
        if request.expires_at <= now:
            raise InvalidRequest("share_expiry_invalid", "expires_at must be in the future")
        if request.expires_at > now + self.max_lifetime:
            raise InvalidRequest(
                "share_expiry_too_far",
                f"a share lives at most {self.settings.share_max_days} days (PHIVAULT_SHARE_MAX_DAYS)",
            )
        passcode_hash = self._hash_passcode(request.passcode) if request.passcode is not None else None
        token: str | None = None
        if request.recipient_email is None:
            delivery = ShareDelivery.LINK
        elif self.settings.smtp_host:
            delivery = ShareDelivery.QUEUED
        else:
            delivery = ShareDelivery.NOT_CONFIGURED
        if delivery is not ShareDelivery.QUEUED:
            token = new_token()
        reader = self.reader
        with reader.db.transaction() as session:
            study = reader.study_by_id(session, principal, exam_id)
            instances = reader.instances(session, study)[:MAX_SHARED_INSTANCES]
            if not instances:
                raise NotFound
            row = ShareLink(
                id=new_id(),
                institution_id=study.institution_id,
                study_id=study.id,
                created_by=principal.actor.id[:36],
                token_digest=token_digest(token) if token is not None else None,
                passcode_hash=passcode_hash,
                mode=request.mode.value,
                recipient_email=request.recipient_email,
                delivery=delivery.value,
                expires_at=request.expires_at,
                created_at=now,
                access_count=0,
            )
            session.add(row)
            session.flush()
            session.add_all(
                ShareItem(share_id=row.id, number=number, instance_id=instance.id)
                for number, instance in enumerate(instances, start=1)
            )
            if delivery is ShareDelivery.QUEUED:
                enqueue(
                    session, SHARE_MAIL_JOB, {"share_id": row.id}, now=now, max_attempts=SHARE_MAIL_ATTEMPTS
                )
            record(
                session,
                AuditAction.SHARE_CREATE,
                principal,
                Target("share", row.id),
                Outcome.SUCCESS,
                now=now,
                context=context,
            )
            return CreatedShare(ShareInfo.of(row, len(instances), now), token)

    def _hash_passcode(self, passcode: str) -> str:
        normalised = normalise(passcode)
        if not MIN_PASSCODE <= len(normalised) <= MAX_PASSCODE or too_long(normalised):
            raise InvalidRequest(
                "share_passcode_invalid", f"a passcode has {MIN_PASSCODE} to {MAX_PASSCODE} characters"
            )
        return self.hasher.hash(normalised)

    def shares_of(self, principal: Principal, exam_id: str, *, context: RequestContext) -> list[ShareInfo]:
        reader = self.reader
        now = self._clock_now
        with reader.db.transaction() as session:
            study = reader.study_by_id(session, principal, exam_id)
            rows = list(
                session.scalars(
                    select(ShareLink)
                    .where(ShareLink.institution_id == study.institution_id, ShareLink.study_id == study.id)
                    .order_by(ShareLink.created_at.desc(), ShareLink.id)
                )
            )
            counts: dict[str, int] = {
                share_id: int(count)
                for share_id, count in session.execute(
                    select(ShareItem.share_id, func.count())
                    .where(ShareItem.share_id.in_([row.id for row in rows]))
                    .group_by(ShareItem.share_id)
                )
            }
            reader.audit(session, principal, AuditAction.EXAM_VIEW, Target("study", study.id), context)
            return [ShareInfo.of(row, int(counts.get(row.id, 0)), now) for row in rows]

    def revoke(
        self, principal: Principal, exam_id: str, share_id: str, *, context: RequestContext
    ) -> ShareInfo:
        if not principal.has(Permission.EXAM_SHARE):
            raise Forbidden
        reader = self.reader
        now = self._clock_now
        with reader.db.transaction() as session:
            study = reader.study_by_id(session, principal, exam_id)
            row = session.get(ShareLink, share_id, with_for_update=True)
            if row is None or row.study_id != study.id or row.institution_id != study.institution_id:
                raise NotFound
            if row.revoked_at is None:
                row.revoked_at = now
                row.revoked_by = principal.actor.id[:36]
                record(
                    session,
                    AuditAction.SHARE_REVOKE,
                    principal,
                    Target("share", row.id),
                    Outcome.SUCCESS,
                    now=now,
                    context=context,
                )
            items = session.scalar(select(func.count()).where(ShareItem.share_id == row.id)) or 0
            return ShareInfo.of(row, int(items), now)

    def _mail_job(self, job: JobContext) -> None:
        """Job: make the link's token and mail it (the token exists only here and in the
        message). A failure is retried by the queue; after the last one the share says so.
        """
        session = job.session
        row = session.get(ShareLink, str(job.payload["share_id"]))
        now = self._clock_now
        if row is None or row.delivery != ShareDelivery.QUEUED.value or row.recipient_email is None:
            return
        if row.revoked_at is not None or row.expires_at <= now:
            return
        token = new_token()
        row.token_digest = token_digest(token)
        row.delivery = ShareDelivery.SENT.value
        link = self.link(token)
        lines = [
            "An exam was shared with you through phivault. It carries no patient information.",
            "",
            f"Open it before {row.expires_at.strftime('%Y-%m-%d %H:%M')} UTC:",
            "",
            link,
            "",
        ]
        if row.passcode_hash is not None:
            lines += ["You need the passcode the sender gives you separately.", ""]
        lines.append("If you did not expect this message, ignore it.")
        try:
            self.mailer.send(row.recipient_email, "An exam was shared with you", "\n".join(lines) + "\n")
        except MailError as exc:
            if job.attempt < SHARE_MAIL_ATTEMPTS:
                raise JobError(f"share {row.id}: {exc}") from None  # retried with back-off
            # The last attempt: the link stays unmade and the share says the mail failed.
            row.token_digest = None
            row.delivery = ShareDelivery.FAILED.value
            log.warning("share %s: the e-mail could not be delivered after %d attempts", row.id, job.attempt)

    def link(self, token: str) -> str:
        return f"{self.settings.public_url.rstrip('/')}/share/{token}"

    # -- the recipient's side -------------------------------------------------------------

    def open(
        self, token: str, grant: str | None, *, context: RequestContext, count: bool = True
    ) -> OpenShare:
        """The live share of ``token``: ``NotFound`` for any dead or unknown link,
        ``PasscodeRequired`` when it has a passcode and ``grant`` is not valid for it.
        """
        now = self._clock_now
        with self.reader.db.transaction() as session:
            row = self._live(session, token, now)
            if row.passcode_hash is not None and not self._grant_valid(row, grant, now):
                raise PasscodeRequired
            study = session.get(Study, row.study_id)
            if study is None or study.institution_id != row.institution_id:
                raise NotFound
            items: dict[int, str] = {
                item.number: item.instance_id
                for item in session.scalars(select(ShareItem).where(ShareItem.share_id == row.id))
            }
            opened = OpenShare(row.id, row.institution_id, ShareMode(row.mode), row.expires_at, study, items)
            if count:
                row.access_count += 1
                row.last_access_at = now
                record(
                    session,
                    AuditAction.SHARE_USE,
                    opened.subject,
                    Target("share", row.id),
                    Outcome.SUCCESS,
                    now=now,
                    context=context,
                )
            return opened

    def _live(self, session: Session, token: str, now: datetime) -> ShareLink:
        if not token or len(token) > 128:  # noqa: PLR2004  # tokens are 43 characters
            raise NotFound
        row = session.scalars(
            select(ShareLink).where(ShareLink.token_digest == token_digest(token)).with_for_update()
        ).first()
        if row is None or row.revoked_at is not None or row.blocked_at is not None or row.expires_at <= now:
            raise NotFound
        return row

    def verify_passcode(self, token: str, passcode: str, *, context: RequestContext) -> tuple[str, int]:
        """A grant for the share after the right passcode, and its lifetime in seconds."""
        now = self._clock_now
        client = context.ip or "unknown"
        with self.reader.db.transaction() as session:
            row = self._live(session, token, now)
            if row.passcode_hash is None:
                raise InvalidRequest("share_has_no_passcode", "this link has no passcode")
            for policy, key in ((SHARE_PASSCODE, row.id), (SHARE_CLIENT, client)):
                state = throttle.state(session, policy, key, now)
                if state.locked(now) and state.locked_until is not None:
                    raise Throttled(int((state.locked_until - now).total_seconds()) + 1)
            encoded = row.passcode_hash
            share_id, institution_id, share_expires = row.id, row.institution_id, row.expires_at
        candidate = normalise(passcode)
        matched = not too_long(candidate) and self.hasher.verify(encoded, candidate)
        subject = SystemSubject(Actor(ActorType.ANONYMOUS, f"share:{share_id}"), institution_id)
        with self.reader.db.transaction() as session:
            if not matched:
                throttle.record_failure(session, SHARE_PASSCODE, share_id, now)
                throttle.record_failure(session, SHARE_CLIENT, client, now)
            else:
                throttle.clear(session, SHARE_PASSCODE, share_id)
            record(
                session,
                AuditAction.SHARE_USE,
                subject,
                Target("share", share_id),
                Outcome.SUCCESS if matched else Outcome.DENIED,
                now=now,
                context=context,
            )
        if not matched:
            raise WrongPasscode
        expires = min(now + GRANT_TTL, share_expires)
        stamp = int(expires.timestamp())
        return f"{stamp}.{self._grant_mac(institution_id, share_id, encoded, stamp)}", int(
            (expires - now).total_seconds()
        )

    def _grant_mac(self, institution_id: str, share_id: str, passcode_hash: str, stamp: int) -> str:
        return self.reader.secrets.get(institution_id).blind(
            _GRANT_PURPOSE, share_id, passcode_hash, str(stamp)
        )

    def _grant_valid(self, row: ShareLink, grant: str | None, now: datetime) -> bool:
        if not grant or row.passcode_hash is None or len(grant) > 100:  # noqa: PLR2004
            return False
        stamp_text, _, mac = grant.partition(".")
        if not stamp_text.isdigit() or int(stamp_text) <= now.timestamp():
            return False
        expected = self._grant_mac(row.institution_id, row.id, row.passcode_hash, int(stamp_text))
        return hmac.compare_digest(expected, mac)

    def page(self, opened: OpenShare) -> SharePage:
        with self.reader.db.transaction() as session:
            instances = self._instances(session, opened, list(opened.items.values()))
            series = {
                row.id: row
                for row in session.scalars(
                    select(Series).where(
                        Series.id.in_({instance.series_id for instance in instances.values()})
                    )
                )
            }
        shown = []
        for number in sorted(opened.items):
            instance = instances.get(opened.items[number])
            if instance is None:
                continue  # removed from the exam since the link was made
            of = series.get(instance.series_id)
            shown.append(
                SharedInstance(
                    number=number,
                    modality=of.modality if of else "",
                    series_number=of.series_number if of else None,
                    series_description=of.series_description if of else "",
                    instance_number=instance.instance_number,
                    rows=instance.rows,
                    columns=instance.columns,
                    frames=instance.number_of_frames or 1,
                    size=instance.size,
                )
            )
        study = opened.study
        return SharePage(
            mode=opened.mode,
            expires_at=opened.expires_at,
            study_description=study.study_description,
            modalities=[m for m in study.modalities.split("\\") if m],
            instances=shown,
        )

    def _instances(self, session: Session, opened: OpenShare, ids: list[str]) -> dict[str, Instance]:
        rows = session.scalars(
            select(Instance).where(
                Instance.id.in_(ids),
                Instance.study_id == opened.study.id,
                Instance.institution_id == opened.institution_id,
            )
        )
        return {row.id: row for row in rows}

    def reading(self, opened: OpenShare, number: int) -> InstanceReading:
        """The stored, de-identified instance ``number`` of the share (never re-identified)."""
        instance_id = opened.items.get(number)
        if instance_id is None:
            raise NotFound
        with self.reader.db.transaction() as session:
            instance = self._instances(session, opened, [instance_id]).get(instance_id)
            if instance is None:
                raise NotFound
            stored = self.reader.open(session, opened.study, instance)
        return InstanceReading(opened.study, instance, stored, None)

    def download(self, opened: OpenShare, number: int) -> InstanceReading:
        if opened.mode is not ShareMode.DOWNLOAD:
            raise NotDownloadable
        return self.reading(opened, number)

    def rendered(self, reading: InstanceReading, frame: int, options: RenderOptions) -> bytes:
        """One frame as an image: pixels only, no metadata (``dicom.render``)."""
        try:
            (data,) = reading.frames([frame])
        except IndexError:
            raise InvalidRequest("frame_out_of_range", "the instance has fewer frames") from None
        except (FramesUnavailable, LayoutError):
            raise InvalidRequest("rendering_unavailable", "this instance cannot be rendered") from None
        try:
            array = decode_frame(reading.layout.header, data, reading.instance.transfer_syntax_uid)
            return render(reading.layout.header, array, options)
        except RenderingUnavailable:
            raise InvalidRequest("rendering_unavailable", "this instance cannot be rendered") from None

    # -- the egress guard -----------------------------------------------------------------

    def guard(self, opened: OpenShare, instance_ids: Iterable[str]) -> EgressGuard:
        """The egress guard for what ``opened`` sends of ``instance_ids`` (egress.py)."""
        return self.guard_for(opened.study, instance_ids)

    def guard_for(self, study: Study, instance_ids: Iterable[str]) -> EgressGuard:
        """The egress guard of ``study``'s patient and of ``instance_ids`` (egress.py)."""
        reader = self.reader
        values: list[str] = []
        ids = sorted(set(instance_ids))
        records = []
        with reader.db.transaction() as session, reader.phi_db.read() as phi_session:
            options = self.policies.load(session, study.institution_id).options
            patient = reader.phi.patient_values(session, phi_session, study.patient_ref)
            study_phi = reader.study_phi(session, phi_session, study)
            for instance_id in ids:
                try:
                    records.append(reader.instance_phi(session, phi_session, study, instance_id))
                except NotFound:
                    continue  # an index row without its PHI: nothing of it to look for
        name = patient.get("patient_name", "")
        values += [patient.get(key, "") for key in ("patient_id", "issuer_of_patient_id", "birth_date")]
        values += [name, *_name_parts(name)]
        values += [
            study_phi.accession_number,
            study_phi.study_date,
            study_phi.study_id,
            study_phi.study_instance_uid,
            study_phi.referring_physician_name,
            *_name_parts(study_phi.referring_physician_name),
        ]
        for phi in records:
            values += record_values(phi.phi, options)
            values += [phi.uids.study_instance_uid, phi.uids.series_instance_uid, phi.uids.sop_instance_uid]
        return EgressGuard(values)

    def screened(
        self, opened: OpenShare, guard: EgressGuard, chunks: Iterable[bytes], *, context: RequestContext
    ) -> Iterator[bytes]:
        """``chunks`` through ``guard``; on a hit the alert is raised, then ``EgressBlocked``."""
        try:
            yield from guard.screen(chunks)
        except EgressBlocked:
            self.alert(opened, context=context)
            raise

    def alert(self, opened: OpenShare, *, context: RequestContext) -> None:
        """The security alert of a blocked response: the link is suspended, an alert is
        logged (ids only) and ``egress.block`` recorded naming the link and the patient.
        """
        now = self._clock_now
        log.error(
            "SECURITY ALERT: egress guard blocked share %s of institution %s (patient %s): "
            "PHI in outgoing bytes",
            opened.share_id,
            opened.institution_id,
            opened.study.patient_ref,
        )
        with self.reader.db.transaction() as session:
            session.execute(
                update(ShareLink)
                .where(ShareLink.id == opened.share_id, ShareLink.blocked_at.is_(None))
                .values(blocked_at=now)
            )
            for target in (Target("share", opened.share_id), Target("patient", opened.study.patient_ref)):
                record(
                    session,
                    AuditAction.EGRESS_BLOCK,
                    opened.subject,
                    target,
                    Outcome.DENIED,
                    now=now,
                    context=context,
                )

    def screened_download(
        self,
        principal: Principal,
        study: Study,
        instance_id: str,
        chunks: Iterable[bytes],
        *,
        context: RequestContext,
    ) -> Iterator[bytes]:
        """A de-identified instance downloaded by a signed-in principal without ``phi:read``
        (WADO-RS), through the egress guard: on a hit the alert is raised (logged, and
        ``egress.block`` naming the instance and the patient), then ``EgressBlocked``.
        """
        guard = self.guard_for(study, [instance_id])
        try:
            yield from guard.screen(chunks)
        except EgressBlocked:
            log.error(  # noqa: TRY400  # no traceback: the alert names ids only
                "SECURITY ALERT: egress guard blocked a de-identified download of instance %s "
                "of institution %s (patient %s): PHI in outgoing bytes",
                instance_id,
                study.institution_id,
                study.patient_ref,
            )
            now = self._clock_now
            with self.reader.db.transaction() as session:
                for target in (Target("instance", instance_id), Target("patient", study.patient_ref)):
                    record(
                        session,
                        AuditAction.EGRESS_BLOCK,
                        principal,
                        target,
                        Outcome.DENIED,
                        now=now,
                        context=context,
                    )
            raise


def _name_parts(name: str) -> list[str]:
    return [part for part in name.replace("=", "^").replace(" ", "^").split("^") if part]
