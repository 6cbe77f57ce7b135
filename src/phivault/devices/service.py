"""The devices service: activation codes, activation, DPoP-bound device tokens, the
authentication of device requests, and device management.

Every management function takes the acting ``Principal`` (or the CLI's ``SystemSubject``),
checks its permission and scopes by its institution: another tenant's device answers
``NotFound``. Device requests are authenticated by ``authenticate``: an opaque access
token (stored hashed) bound to the thumbprint of the key registered at activation, and a
DPoP proof (RFC 9449) signed by that key for this very request.

Refusals that must be remembered (the audit event of a failed proof or activation) are
committed in a transaction of their own, then raised.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from phivault.accounts.models import Institution
from phivault.accounts.permissions import ROLE_PERMISSIONS, Permission, Role
from phivault.accounts.principal import Principal
from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, Actor, RequestContext, Subject, SystemSubject, Target, record
from phivault.clock import Clock
from phivault.config.settings import Settings
from phivault.crypto.keyring import Keyring, WrappedKey
from phivault.db.engine import Database
from phivault.db.jobs import enqueue
from phivault.devices import dpop
from phivault.devices.errors import (
    ActivationCodeExpired,
    ActivationCodeInvalid,
    ActivationCodeUsed,
    DeviceKeyInUse,
    DeviceNotActivated,
    DeviceRevoked,
    DevicesError,
    DeviceUnauthenticated,
    Forbidden,
    InvalidDeviceToken,
    InvalidInput,
    KeyMismatch,
    NonceRequired,
    NotFound,
    ProofExpired,
    ProofMethodMismatch,
    ProofMissing,
    ProofReplayed,
    ProofTokenHashMismatch,
    ProofUrlMismatch,
    RegionMismatch,
    SerialMismatch,
    TlsPinMismatch,
)
from phivault.devices.models import (
    MAX_SERIAL,
    UNFINISHED,
    ActivationCode,
    Device,
    DeviceSecretKey,
    DeviceToken,
    DpopProofSeen,
    Upload,
    UploadStatus,
)
from phivault.ids import new_id, new_token, token_digest

log = logging.getLogger(__name__)

HOUSEKEEPING_JOB = "devices.housekeeping"
HOUSEKEEPING_INTERVAL = timedelta(minutes=5)
TOUCH_INTERVAL = timedelta(minutes=1)  # last-seen writes at most this often per device
MAX_TOKEN_LENGTH = 512
# Crockford's base32 (no I, L, O, U): 25 characters carry 125 bits (≥ 100, issue 7).
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_CHARACTERS = 25
_CODE_READS_AS = str.maketrans({"I": "1", "L": "1", "O": "0"})
_SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$")
_NONCE_KEY_ID = "dpop-nonce-v1"
_NONCE_KEY_AAD = b"phivault/devices/dpop-nonce-key/" + _NONCE_KEY_ID.encode()
_ANONYMOUS = SystemSubject(Actor(ActorType.ANONYMOUS, "anonymous"))

Authority = Principal | SystemSubject
"""Who may manage devices: an institution admin, or the ``phivault`` CLI."""


# -- values returned to callers -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedCode:
    """A new activation code: shown once, then only its digest exists."""

    code: str
    institution_id: str
    serial: str | None
    expires_at: datetime
    server_pins: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    institution_id: str
    serial: str | None
    key_thumbprint: str
    activated_at: datetime
    last_seen_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeviceGrant:
    """An access token for a device (``token_type`` DPoP, RFC 9449 §5)."""

    device_id: str
    institution_id: str
    access_token: str
    expires_in: int
    nonce: str  # the current server nonce, for the answer's DPoP-Nonce header


@dataclass(frozen=True, slots=True)
class ProofTarget:
    """The request a proof must be for: its method and the URLs that name it (the URL as
    received and as seen through ``PHIVAULT_PUBLIC_URL``), already normalised.
    """

    method: str
    urls: frozenset[str]

    @classmethod
    def of(cls, method: str, *urls: str) -> ProofTarget:
        return cls(method.upper(), frozenset(dpop.normalise_htu(url) for url in urls if url))


@dataclass(frozen=True, slots=True)
class DeviceAuthentication:
    principal: Principal
    nonce: str  # the current server nonce, for the response's DPoP-Nonce header


def device_principal(device_id: str, institution_id: str) -> Principal:
    return Principal(
        actor=Actor(ActorType.DEVICE, device_id),
        institution_id=institution_id,
        role=Role.DEVICE,
        permissions=ROLE_PERMISSIONS[Role.DEVICE],
        session_id=None,
    )


def is_device(principal: Principal) -> bool:
    return principal.actor.type is ActorType.DEVICE and principal.role is Role.DEVICE


def new_activation_code() -> str:
    """25 characters of Crockford base32 from ``secrets`` in groups of five: 125 bits."""
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_CHARACTERS))
    return "-".join(raw[i : i + 5] for i in range(0, CODE_CHARACTERS, 5))


def normalise_code(code: str) -> str:
    """A code as typed (any case, dashes, spaces, I/L/O for 1/0) in its canonical form."""
    letters = "".join(code.split()).replace("-", "").upper().translate(_CODE_READS_AS)
    return letters if len(letters) == CODE_CHARACTERS and set(letters) <= set(CODE_ALPHABET) else ""


def certificate_pin(pem: bytes) -> str:
    """``sha256//<base64 SHA-256 of the SubjectPublicKeyInfo>`` of the first certificate,
    the form curl's ``--pinnedpubkey`` takes (RFC 7469 §2.4 pin-sha256).
    """
    import base64  # noqa: PLC0415  # only here

    certificate = x509.load_pem_x509_certificate(pem)
    spki = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return "sha256//" + base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def _require(actor: Authority, permission: Permission) -> None:
    if isinstance(actor, Principal) and not actor.has(permission):
        raise Forbidden


def _in_scope(actor: Authority, institution_id: str) -> bool:
    """The CLI sees every institution; a principal only its own."""
    if isinstance(actor, SystemSubject):
        return True
    return actor.institution_id is not None and actor.institution_id == institution_id


def _device_info(row: Device) -> DeviceInfo:
    return DeviceInfo(
        id=row.id,
        institution_id=row.institution_id,
        serial=row.serial,
        key_thumbprint=row.jkt,
        activated_at=row.activated_at,
        last_seen_at=row.last_seen_at,
        revoked_at=row.revoked_at,
    )


def normalise_serial(serial: str | None) -> str | None:
    if serial is None:
        return None
    serial = serial.strip()
    if not serial:
        return None
    if len(serial) > MAX_SERIAL or not _SERIAL_RE.fullmatch(serial):
        raise InvalidInput("a device serial is 1 to 64 letters, digits and . _ : / -")
    return serial


def schedule_housekeeping(session: Session, now: datetime) -> None:
    """Make sure a housekeeping job is due at the end of the current period (one per
    period across replicas: the dedupe key names the period).
    """
    period = int(HOUSEKEEPING_INTERVAL.total_seconds())
    slot = int(now.timestamp()) // period + 1
    run_at = datetime.fromtimestamp(slot * period, tz=now.tzinfo)
    enqueue(session, HOUSEKEEPING_JOB, {}, now=now, run_at=run_at, dedupe_key=f"{HOUSEKEEPING_JOB}:{slot}")


class Devices:
    def __init__(self, settings: Settings, db: Database, clock: Clock, keyring: Keyring) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.keyring = keyring
        self.code_ttl = timedelta(hours=settings.device_code_hours)
        self.token_ttl = timedelta(seconds=settings.device_token_seconds)
        self.proof_max_age = float(settings.dpop_proof_max_age_seconds)
        self._nonce_maker: dpop.NonceMaker | None = None
        self._lock = threading.Lock()

    # -- activation codes ---------------------------------------------------------------

    def create_code(
        self,
        actor: Authority,
        institution_id: str | None,
        serial: str | None = None,
        context: RequestContext = NO_CONTEXT,
    ) -> IssuedCode:
        """A single-use activation code for one device of ``institution_id`` (an admin's
        own institution), optionally bound to a serial; shown once.
        """
        _require(actor, Permission.DEVICE_MANAGE)
        if isinstance(actor, Principal):
            institution_id = actor.institution_id
        if institution_id is None:
            raise InvalidInput("name the institution the device will belong to")
        serial = normalise_serial(serial)
        now = self.clock.now()
        code = new_activation_code()
        with self.db.transaction() as session:
            institution = session.get(Institution, institution_id)
            if institution is None or not _in_scope(actor, institution.id):
                raise NotFound
            if institution.region != self.settings.region:
                raise RegionMismatch
            row = ActivationCode(
                id=new_id(),
                digest=token_digest(normalise_code(code)),
                institution_id=institution.id,
                serial=serial,
                created_at=now,
                expires_at=now + self.code_ttl,
                used_at=None,
                device_id=None,
            )
            session.add(row)
            session.flush()
            record(
                session,
                AuditAction.DEVICE_CODE_CREATE,
                actor,
                Target("activation_code", row.id),
                Outcome.SUCCESS,
                now=now,
                context=context,
                institution_id=institution.id,
            )
        return IssuedCode(code, institution.id, serial, row.expires_at, self.server_pins())

    def server_pins(self) -> tuple[str, ...]:
        """The pins of the certificates devices may see: ``PHIVAULT_DEVICE_TLS_PINS`` when a
        load balancer terminates TLS, else the pin of phivault's own certificate.
        """
        if self.settings.device_tls_pins:
            return self.settings.device_tls_pins
        try:
            return (certificate_pin(Path(self.settings.cert_path).read_bytes()),)
        except (OSError, ValueError):
            return ()

    # -- activation and tokens ----------------------------------------------------------

    def activate(  # the activation request's parts, named at the call site
        self,
        code: str,
        proofs: Sequence[str],
        target: ProofTarget,
        *,
        serial: str | None,
        tls_pin: str | None,
        context: RequestContext = NO_CONTEXT,
    ) -> DeviceGrant:
        """Register the key of the proof for the institution of ``code`` (single use) and
        return the device's first token. The public key travels in the proof's ``jwk``
        header, so activation proves possession of the private key.
        """
        now = self.clock.now()
        proof = self._checked_proof(proofs, target, now, token=None, device=None, context=context)
        serial = normalise_serial(serial)
        digest = token_digest(normalise_code(code)) if len(code) <= MAX_TOKEN_LENGTH else ""
        outcome: DeviceGrant | DevicesError
        with self.db.transaction() as session:
            row = (
                session.scalars(
                    select(ActivationCode).where(ActivationCode.digest == digest).with_for_update()
                ).first()
                if digest
                else None
            )
            refusal = self._code_refusal(session, row, proof, serial, tls_pin, now)
            if refusal is not None:
                target_ref = Target("activation_code", row.id) if row is not None else None
                record(
                    session,
                    AuditAction.DEVICE_ACTIVATE,
                    _ANONYMOUS,
                    target_ref,
                    Outcome.DENIED,
                    now=now,
                    context=context,
                    institution_id=row.institution_id if row is not None else None,
                )
                outcome = refusal
            else:
                assert row is not None  # noqa: S101  # nosec B101  # _code_refusal checked it
                outcome = self._register(session, row, proof, serial, context, now)
        if isinstance(outcome, DevicesError):
            raise outcome
        return outcome

    def _code_refusal(  # noqa: PLR0911  # the facts the decision weighs; one answer each
        self,
        session: Session,
        row: ActivationCode | None,
        proof: dpop.DpopProof,
        serial: str | None,
        tls_pin: str | None,
        now: datetime,
    ) -> DevicesError | None:
        if row is None:
            return ActivationCodeInvalid()
        if row.used_at is not None:
            return ActivationCodeUsed()
        if row.expires_at <= now:
            return ActivationCodeExpired()
        if row.serial is not None and row.serial != serial:
            return SerialMismatch()
        if tls_pin is not None and tls_pin not in self.server_pins():
            return TlsPinMismatch()
        institution = session.get(Institution, row.institution_id)
        if institution is None or institution.region != self.settings.region:
            return RegionMismatch()
        if session.scalar(select(Device.id).where(Device.jkt == proof.jkt)) is not None:
            return DeviceKeyInUse()
        return None

    def _register(
        self,
        session: Session,
        row: ActivationCode,
        proof: dpop.DpopProof,
        serial: str | None,
        context: RequestContext,
        now: datetime,
    ) -> DeviceGrant:
        device = Device(
            id=new_id(),
            institution_id=row.institution_id,
            serial=serial or row.serial,
            jkt=proof.jkt,
            public_jwk=proof.jwk,
            activated_at=now,
            last_seen_at=now,
            revoked_at=None,
        )
        session.add(device)
        row.used_at = now
        row.device_id = device.id
        session.flush()
        self._remember(session, proof, now)
        record(
            session,
            AuditAction.DEVICE_ACTIVATE,
            device_principal(device.id, device.institution_id),
            Target("device", device.id),
            Outcome.SUCCESS,
            now=now,
            context=context,
        )
        schedule_housekeeping(session, now)
        return self._grant(session, device, now)

    def issue_token(
        self, proofs: Sequence[str], target: ProofTarget, context: RequestContext = NO_CONTEXT
    ) -> DeviceGrant:
        """A fresh access token for the device whose registered key signed the proof."""
        now = self.clock.now()
        proof = self._checked_proof(proofs, target, now, token=None, device=None, context=context)
        refusal: DeviceUnauthenticated | None = None
        device: Device | None = None
        with self.db.transaction() as session:
            device = session.scalars(select(Device).where(Device.jkt == proof.jkt)).first()
            institution = session.get(Institution, device.institution_id) if device is not None else None
            if device is None or institution is None:
                refusal = DeviceNotActivated()
            elif device.revoked_at is not None:
                refusal = DeviceRevoked()
            elif institution.region != self.settings.region:
                raise RegionMismatch
            else:
                try:
                    self._remember(session, proof, now)
                except ProofReplayed as exc:
                    refusal = exc
            if refusal is None and device is not None:
                session.execute(
                    delete(DeviceToken).where(
                        DeviceToken.device_id == device.id, DeviceToken.expires_at <= now
                    )
                )
                schedule_housekeeping(session, now)
                return self._grant(session, device, now)
        raise self._refused(refusal, device, context, now)

    def _grant(self, session: Session, device: Device, now: datetime) -> DeviceGrant:
        token = new_token()
        session.add(
            DeviceToken(
                digest=token_digest(token),
                device_id=device.id,
                jkt=device.jkt,
                expires_at=now + self.token_ttl,
            )
        )
        return DeviceGrant(
            device.id,
            device.institution_id,
            token,
            int(self.token_ttl.total_seconds()),
            self._nonces(session).current(now.timestamp()),
        )

    # -- requests -----------------------------------------------------------------------

    def authenticate(
        self,
        token: str,
        proofs: Sequence[str],
        target: ProofTarget,
        context: RequestContext = NO_CONTEXT,
    ) -> DeviceAuthentication:
        """Resolve ``Authorization: DPoP <token>`` and its proof to the device's principal.

        Checked on every request, so a revocation takes effect on the next one, on every
        replica. Any failure is a 401 problem with its own code, and an audit event.
        """
        now = self.clock.now()
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise self._refused(InvalidDeviceToken(), None, context, now)
        proof = self._checked_proof(proofs, target, now, token=token, device=None, context=context)
        refusal: DeviceUnauthenticated | None = None
        device: Device | None = None
        with self.db.transaction() as session:
            found = session.execute(
                select(DeviceToken, Device)
                .join(Device, DeviceToken.device_id == Device.id)
                .where(DeviceToken.digest == token_digest(token))
            ).first()
            if found is None or found[0].expires_at <= now:
                refusal = InvalidDeviceToken()
                device = found[1] if found is not None else None
            else:
                bound, device = found
                if device.revoked_at is not None:
                    refusal = DeviceRevoked()
                elif not secrets.compare_digest(bound.jkt, proof.jkt):
                    refusal = KeyMismatch()
                else:
                    try:
                        self._remember(session, proof, now)
                    except ProofReplayed as exc:
                        refusal = exc
                if refusal is None and now - device.last_seen_at >= TOUCH_INTERVAL:
                    device.last_seen_at = now
            if refusal is None and device is not None:
                principal = device_principal(device.id, device.institution_id)
                return DeviceAuthentication(principal, self._nonces(session).current(now.timestamp()))
        raise self._refused(refusal, device, context, now)

    def is_device_token(self, token: str) -> bool:
        """Whether ``token`` is a device token (one presented as Bearer is refused)."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return False
        with self.db.transaction() as session:
            return session.get(DeviceToken, token_digest(token)) is not None

    def current_nonce(self) -> str:
        return (self._nonce_maker or self._load_nonces()).current(self.clock.now().timestamp())

    def _checked_proof(
        self,
        proofs: Sequence[str],
        target: ProofTarget,
        now: datetime,
        *,
        token: str | None,
        device: Device | None,
        context: RequestContext,
    ) -> dpop.DpopProof:
        """RFC 9449 §4.3 checks 1-11 (and 12's ath when a token is sent); the replay cache
        (jti) is checked in the caller's transaction by ``_remember``.
        """
        try:
            return self._judge_proof(proofs, target, now, token)
        except NonceRequired:
            # Part of the protocol, not an attack: the client retries with the nonce.
            raise
        except DeviceUnauthenticated as exc:
            raise self._refused(exc, device, context, now) from None

    def _judge_proof(
        self, proofs: Sequence[str], target: ProofTarget, now: datetime, token: str | None
    ) -> dpop.DpopProof:
        if len(proofs) != 1:
            raise ProofMissing
        proof = dpop.parse_proof(proofs[0])
        if proof.htm != target.method:
            raise ProofMethodMismatch
        if dpop.normalise_htu(proof.htu) not in target.urls:
            raise ProofUrlMismatch
        moment = now.timestamp()
        nonces = self._nonce_maker or self._load_nonces()
        if proof.nonce is None or not nonces.valid(proof.nonce, moment, self.settings.max_clock_skew_seconds):
            raise NonceRequired(nonces.current(moment))
        if abs(proof.iat - moment) > self.proof_max_age:
            raise ProofExpired
        if token is not None and (
            proof.ath is None or not secrets.compare_digest(proof.ath, dpop.access_token_hash(token))
        ):
            raise ProofTokenHashMismatch
        return proof

    def _remember(self, session: Session, proof: dpop.DpopProof, now: datetime) -> None:
        """Add the proof's (key, jti) to the replay cache; ``ProofReplayed`` if present."""
        digest = hashlib.sha256(f"{proof.jkt}\x00{proof.jti}".encode()).hexdigest()
        # Kept while a proof with this iat could still be accepted.
        until = max(now.timestamp(), proof.iat) + self.proof_max_age + self.settings.max_clock_skew_seconds
        try:
            with session.begin_nested():
                session.add(
                    DpopProofSeen(digest=digest, expires_at=datetime.fromtimestamp(until, tz=now.tzinfo))
                )
        except IntegrityError:
            raise ProofReplayed from None

    def _refused(
        self,
        refusal: DeviceUnauthenticated | None,
        device: Device | None,
        context: RequestContext,
        now: datetime,
    ) -> DeviceUnauthenticated:
        """Audit a failed proof in a transaction of its own and attach the current nonce
        (the client's retry needs one); returns the refusal to raise.
        """
        assert refusal is not None  # noqa: S101  # nosec B101  # callers pass a refusal
        subject: Subject = (
            device_principal(device.id, device.institution_id) if device is not None else _ANONYMOUS
        )
        with self.db.transaction() as session:
            record(
                session,
                AuditAction.DEVICE_PROOF_FAIL,
                subject,
                Target("device", device.id) if device is not None else None,
                Outcome.DENIED,
                now=now,
                context=context,
            )
            refusal.headers.setdefault("DPoP-Nonce", self._nonces(session).current(now.timestamp()))
        return refusal

    def _load_nonces(self) -> dpop.NonceMaker:
        with self.db.transaction() as session:
            return self._nonces(session)

    def _nonces(self, session: Session) -> dpop.NonceMaker:
        with self._lock:
            if self._nonce_maker is not None:
                return self._nonce_maker
            row = session.get(DeviceSecretKey, _NONCE_KEY_ID)
            if row is None:
                row = self._create_nonce_key(session)
            key = self.keyring.unwrap(WrappedKey.from_bytes(row.wrapped_key), aad=_NONCE_KEY_AAD)
            self._nonce_maker = dpop.NonceMaker(key, self.settings.dpop_nonce_seconds)
            return self._nonce_maker

    def _create_nonce_key(self, session: Session) -> DeviceSecretKey:
        raw = secrets.token_bytes(32)
        wrapped = self.keyring.wrap(raw, aad=_NONCE_KEY_AAD)
        row = DeviceSecretKey(id=_NONCE_KEY_ID, wrapped_key=wrapped.to_bytes(), created_at=self.clock.now())
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            # Another replica made it first: use theirs.
            existing = session.get(DeviceSecretKey, _NONCE_KEY_ID, populate_existing=True)
            if existing is None:
                raise
            return existing
        return row

    # -- management ---------------------------------------------------------------------

    def list_devices(self, actor: Authority, institution_id: str | None = None) -> list[DeviceInfo]:
        _require(actor, Permission.DEVICE_MANAGE)
        if isinstance(actor, Principal):
            institution_id = actor.institution_id
            if institution_id is None:
                return []
        query = select(Device).order_by(Device.activated_at, Device.id)
        if institution_id is not None:
            query = query.where(Device.institution_id == institution_id)
        with self.db.transaction() as session:
            return [_device_info(row) for row in session.scalars(query)]

    def get_device(self, actor: Authority, device_id: str) -> DeviceInfo:
        _require(actor, Permission.DEVICE_MANAGE)
        with self.db.transaction() as session:
            return _device_info(self._device_in_scope(session, actor, device_id))

    def revoke(self, actor: Authority, device_id: str, context: RequestContext = NO_CONTEXT) -> DeviceInfo:
        """Revoke a device: its next request is refused (401 ``device_revoked``) on every
        replica, it gets no new token, and its unfinished uploads are cancelled.
        """
        _require(actor, Permission.DEVICE_MANAGE)
        now = self.clock.now()
        with self.db.transaction() as session:
            device = self._device_in_scope(session, actor, device_id, for_update=True)
            if device.revoked_at is None:
                # Its tokens stay until they expire, so its next request is told why it is
                # refused (device_revoked) rather than that its token is unknown.
                device.revoked_at = now
                record(
                    session,
                    AuditAction.DEVICE_REVOKE,
                    actor,
                    Target("device", device.id),
                    Outcome.SUCCESS,
                    now=now,
                    context=context,
                    institution_id=device.institution_id,
                )
                self._cancel_uploads(session, device.id, actor, context, now)
            return _device_info(device)

    def _device_in_scope(
        self, session: Session, actor: Authority, device_id: str, *, for_update: bool = False
    ) -> Device:
        device = session.get(Device, device_id, with_for_update=for_update) if len(device_id) <= 64 else None  # noqa: PLR2004
        if device is None or not _in_scope(actor, device.institution_id):
            raise NotFound
        return device

    @staticmethod
    def _cancel_uploads(
        session: Session, device_id: str, actor: Authority, context: RequestContext, now: datetime
    ) -> None:
        """A revoked device's unfinished uploads end with it; housekeeping shreds their keys
        and deletes their chunks.
        """
        uploads = session.scalars(
            select(Upload)
            .where(Upload.device_id == device_id, Upload.status.in_(UNFINISHED))
            .with_for_update()
        ).all()
        for upload in uploads:
            upload.status = UploadStatus.CANCELLED.value
            upload.updated_at = now
            upload.lease_token = None
            record(
                session,
                AuditAction.UPLOAD_CANCEL,
                actor,
                Target("upload", upload.id),
                Outcome.SUCCESS,
                now=now,
                context=context,
                institution_id=upload.institution_id,
            )
        if uploads:
            schedule_housekeeping(session, now)

    # -- housekeeping -------------------------------------------------------------------

    def forget_expired(self, session: Session, now: datetime) -> int:
        """Drop replay-cache entries and tokens that can no longer be used; unused codes a
        week after they expired. Returns how many rows went.
        """
        removed = 0
        for statement in (
            delete(DpopProofSeen).where(DpopProofSeen.expires_at <= now),
            delete(DeviceToken).where(DeviceToken.expires_at <= now),
            delete(ActivationCode).where(
                ActivationCode.used_at.is_(None), ActivationCode.expires_at <= now - timedelta(days=7)
            ),
        ):
            result = session.execute(statement.execution_options(synchronize_session=False))
            removed += int(result.rowcount or 0)  # type: ignore[attr-defined]
        return removed
