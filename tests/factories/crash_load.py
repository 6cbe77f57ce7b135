"""Device uploads and share links as load for the crash harness, and the invariants they
keep across a SIGKILL of ``phivault serve`` (issue 9, item 4).

Each load runs in a thread against one round's server and records only what the server
acknowledged: a request sent but not answered may or may not have taken effect, and the
checks accept both. The database checks run with every server stopped; what only the HTTP
surface shows (a link opens, or answers 404) is checked on the next round's server before
the next kill is armed, and unfinished uploads are resumed under the next round's load.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from factories.devices import TUS, DeviceKey, DeviceSession
from factories.dicom_factory import make_instance, to_bytes
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.models import AuditRecord
from phivault.crypto.models import PatientKey
from phivault.crypto.service import ObjectContext
from phivault.devices.models import UNFINISHED, Upload, UploadChunk, UploadStatus
from phivault.devices.uploads import OBJECT_KIND
from phivault.exams.models import Instance
from phivault.exams.outbound_models import ShareItem, ShareLink
from phivault.ids import token_digest
from phivault.runtime import Runtime
from servers.phivault import PhivaultServer

UPLOAD_CHUNK = 8 * 1024  # the ~23 KB instances go up in three PATCHes each
UPLOAD_OBJECTS = f"{OBJECT_KIND}/"  # chunk objects are upload/<upload id>/…
ENDED_BY = (AuditAction.UPLOAD_FINALIZE, AuditAction.UPLOAD_CANCEL, AuditAction.UPLOAD_EXPIRE)

Events = Counter[tuple[str, str | None, str]]


def _events(session: Session, object_type: str) -> Events:
    """How many audit records each (action, object id, outcome) of ``object_type`` has."""
    rows = session.execute(
        select(AuditRecord.action, AuditRecord.object_id, AuditRecord.outcome).where(
            AuditRecord.object_type == object_type
        )
    )
    return Counter((action, object_id, outcome) for action, object_id, outcome in rows)


# -- device uploads -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceReceipt:
    status: str
    instance_id: str
    sha256: str


@dataclass
class PlannedUpload:
    """One exam the device sends, and what the server acknowledged of it so far."""

    client_ref: str
    data: bytes = field(repr=False)
    abandoned: bool = False  # the device gives up after its first chunk: only expiry ends it
    attempted: bool = False
    upload_id: str | None = None  # known once a creation was acknowledged
    acknowledged_offset: int = 0  # the offset the last acknowledged PATCH answered
    receipt: DeviceReceipt | None = None  # the acknowledged finalize's answer

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class DeviceUploads:
    """An activated device sending small exams in chunks (tus) the way ``phivault-agent``
    does: open the upload under a client-ref (a repeated creation finds the same upload),
    ask the server's offset, send the rest, finalize with the SHA-256 of the whole. What a
    kill interrupted is resumed in a later round from the server's offset.
    """

    key: DeviceKey = field(default_factory=DeviceKey)
    token: str | None = None
    nonce: str | None = None
    device_id: str | None = None
    plans: list[PlannedUpload] = field(default_factory=list)
    # Answers no crash may cause: an acknowledged upload the server no longer knows.
    violations: list[str] = field(default_factory=list)

    def _session(self, server: PhivaultServer, http: httpx.Client) -> DeviceSession:
        return DeviceSession(
            http, self.key, base=server.base_url, token=self.token, nonce=self.nonce, device_id=self.device_id
        )

    def _keep(self, session: DeviceSession) -> None:
        self.token, self.nonce, self.device_id = session.token, session.nonce, session.device_id

    def activate(self, server: PhivaultServer, code: str) -> None:
        with server.client() as http:
            session = self._session(server, http)
            answer = session.activate(code)
            assert answer.status_code == 200, answer.text
            self._keep(session)

    def plan_round(self, round_number: int, count: int) -> None:
        """``count`` exams to upload in this round, and one the device abandons."""
        for number in range(count + 1):
            root = f"1.2.826.0.1.3680043.10.1444.78.{round_number + 1}.{number + 1}"
            dataset, _ = make_instance(
                study_uid=root, series_uid=f"{root}.1", sop_uid=f"{root}.1.1", rows=16, columns=16
            )
            dataset.PatientID = f"MRN-DEVICE-{round_number}-{number}"
            self.plans.append(
                PlannedUpload(f"crash-{round_number}-{number}", to_bytes(dataset), abandoned=number == count)
            )

    def send_again(self, plan: PlannedUpload) -> PlannedUpload:
        """The same exam once more under a new client-ref (the device lost its records)."""
        again = PlannedUpload(f"{plan.client_ref}-again", plan.data)
        self.plans.append(again)
        return again

    def unfinished(self) -> list[PlannedUpload]:
        return [plan for plan in self.plans if plan.receipt is None and not plan.abandoned]

    def run(self, server: PhivaultServer) -> None:
        """Thread body: a fresh token, then every upload not yet acknowledged (the
        interrupted ones first), until the server dies.
        """
        with server.client() as http:
            session = self._session(server, http)
            try:
                session.refresh_token()  # the previous token may have run out; a failure keeps it
                for plan in self.plans:
                    if plan.receipt is None and not (plan.abandoned and plan.attempted):
                        self._send(session, plan)
            except httpx.TransportError:
                pass  # the server is gone
            finally:
                self._keep(session)

    def _send(self, session: DeviceSession, plan: PlannedUpload) -> None:
        plan.attempted = True
        if plan.upload_id is None:
            created = session.create_upload(len(plan.data), plan.client_ref)
            if created.status_code not in (200, 201):
                return
            plan.upload_id = created.json()["id"]
        path = f"/api/v1/uploads/{plan.upload_id}"
        head = session.send("HEAD", path, headers=TUS)
        if head.status_code in (404, 410):
            self.violations.append(f"acknowledged upload {plan.upload_id} answered HEAD {head.status_code}")
            return
        if head.status_code != 200:
            return
        offset = int(head.headers["upload-offset"])
        end = min(UPLOAD_CHUNK, len(plan.data)) if plan.abandoned else len(plan.data)
        while offset < end:
            sent = session.patch(plan.upload_id, offset, plan.data[offset : offset + UPLOAD_CHUNK])
            if sent.status_code != 204:
                return  # resumed from the server's offset next time
            offset = int(sent.headers["upload-offset"])
            plan.acknowledged_offset = offset
        if plan.abandoned:
            return
        answer = session.finalize(plan.upload_id, plan.sha256)
        if answer.status_code == 200:
            body = answer.json()
            plan.receipt = DeviceReceipt(body["status"], body["instance_id"], body["sha256"])


def check_uploads(runtime: Runtime, device: DeviceUploads, acknowledged: set[str]) -> None:
    """The device's uploads after a crash, the upload housekeeping (a worker's job) and
    the sweeper; adds the digest of every acknowledged finalize to ``acknowledged`` (for
    ``check_consistent``, which reads each instance back).

    * an acknowledged finalize: its receipt names the bytes sent, its instance is there,
      once, and its ``upload.finalize`` event exists;
    * no exam arrives twice, however often its upload was resumed or re-finalized;
    * an acknowledged creation survives (with its ``upload.create`` event), an acknowledged
      chunk is never lost, and what an unfinished upload holds is exactly a prefix of the
      bytes sent, readable: it can be resumed from the server's offset;
    * every upload row has its creation event, and an ended one its ending event, its key
      shredded and its chunks gone: no upload object outlives its upload.
    """
    assert device.violations == [], device.violations
    with runtime.db.transaction() as session:
        uploads = {
            upload.id: upload
            for upload in session.scalars(select(Upload).where(Upload.device_id == device.device_id))
        }
        events = _events(session, "upload")
        for plan in device.plans:
            arrived = list(
                session.scalars(select(Instance.id).where(Instance.received_sha256 == plan.sha256))
            )
            assert len(arrived) <= 1, f"upload {plan.client_ref} arrived {len(arrived)} times"
            if plan.receipt is not None:
                assert plan.receipt.sha256 == plan.sha256, f"{plan.client_ref}: the receipt names other bytes"
                assert arrived == [plan.receipt.instance_id], f"{plan.client_ref}: acknowledged, not stored"
                assert events[(AuditAction.UPLOAD_FINALIZE, plan.upload_id, Outcome.SUCCESS)] >= 1, (
                    f"{plan.client_ref}: an acknowledged finalize without its event"
                )
                acknowledged.add(plan.sha256)
            if plan.upload_id is None:
                continue  # never acknowledged: present (found again by client-ref) or absent
            upload = uploads.get(plan.upload_id)
            assert upload is not None, f"{plan.client_ref}: an acknowledged upload is gone"
            assert upload.offset >= plan.acknowledged_offset, (
                f"{plan.client_ref}: an acknowledged chunk was lost"
            )
            if plan.receipt is not None:
                assert upload.status == UploadStatus.FINISHED.value, f"{plan.client_ref}: {upload.status}"
            elif upload.status in UNFINISHED:
                _check_resumable(runtime, session, upload, plan.data)
        for upload in uploads.values():
            assert events[(AuditAction.UPLOAD_CREATE, upload.id, Outcome.SUCCESS)] == 1, (
                f"upload {upload.id} without its creation event"
            )
            if upload.status in UNFINISHED:
                continue
            assert any(events[(action, upload.id, outcome)] for action in ENDED_BY for outcome in Outcome), (
                f"upload {upload.id} ended ({upload.status}) without an event"
            )
            assert upload.objects_deleted, f"upload {upload.id} ended, its chunks not deleted"
            key = session.get(PatientKey, upload.patient_key_id)
            assert key is not None, upload.patient_key_id
            assert key.destroyed_at is not None, f"upload {upload.id} ended, its key not shredded"
        live = {upload.id for upload in uploads.values() if upload.status in UNFINISHED}
    # Only an unfinished upload may still have objects.
    stray = [
        key
        for key in runtime.store.keys(UPLOAD_OBJECTS)
        if key.removeprefix(UPLOAD_OBJECTS).split("/", 1)[0] not in live
    ]
    assert stray == [], f"{len(stray)} objects of ended or unknown uploads are left: {stray[:3]}"


def _check_resumable(runtime: Runtime, session: Session, upload: Upload, data: bytes) -> None:
    """The recorded chunks cover ``[0, offset)`` without a gap, and each reads back as the
    bytes sent there (objects a crash left without a row may sit beside them until the
    upload ends).
    """
    chunks = session.scalars(
        select(UploadChunk).where(UploadChunk.upload_id == upload.id).order_by(UploadChunk.start)
    ).all()
    context = ObjectContext(upload.institution_id, upload.patient_key_id, f"{OBJECT_KIND}/{upload.id}")
    position = 0
    for chunk in chunks:
        assert chunk.start == position, f"upload {upload.id}: a gap or overlap at {position}"
        opened = runtime.keys.open_object(runtime.store, chunk.object_key, session=session, context=context)
        stored = b"".join(opened.iter_plaintext())
        assert stored == data[chunk.start : chunk.start + chunk.length], f"upload {upload.id}: chunk differs"
        position += chunk.length
    assert position == upload.offset, f"upload {upload.id}: chunks end at {position}, offset {upload.offset}"


def finalizer_leases_ran_out(runtime: Runtime) -> int:
    """Let the finalize leases held by the killed server run out.

    A finalize interrupted by the kill holds its lease for ten minutes and more (the
    device is told 409 ``upload_finalizing`` with ``Retry-After``, then takes over).
    Moving ``lease_until`` to now stands for that wait, so the next round's device takes
    over at once; the server holding the lease is provably dead (killed and reaped).
    """
    now = datetime.now(UTC)
    with runtime.db.transaction() as session:
        result = session.execute(
            update(Upload)
            .where(Upload.status == UploadStatus.FINALIZING.value, Upload.lease_until > now)
            .values(lease_until=now)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def check_expired(runtime: Runtime, device: DeviceUploads) -> None:
    """After the expiry (housekeeping with the clock past ``PHIVAULT_UPLOAD_EXPIRY_HOURS``)
    nothing of an unfinished upload is left: every upload ended with its event, keys
    shredded, no object under ``upload/``; an abandoned upload is cleanly absent.
    """
    with runtime.db.transaction() as session:
        uploads = list(session.scalars(select(Upload).where(Upload.device_id == device.device_id)))
        events = _events(session, "upload")
    assert [upload.id for upload in uploads if upload.status in UNFINISHED] == [], "uploads left open"
    for plan in device.plans:
        if plan.abandoned and plan.upload_id is not None:
            assert events[(AuditAction.UPLOAD_EXPIRE, plan.upload_id, Outcome.SUCCESS)] == 1, plan.client_ref
    assert list(runtime.store.keys(UPLOAD_OBJECTS)) == [], "upload objects outlived their uploads"
    check_uploads(runtime, device, set())


# -- share links ------------------------------------------------------------------------------------


@dataclass
class SharedLink:
    """A share whose creation was acknowledged: its token, and what was done with it."""

    share_id: str
    exam_id: str
    token: str
    round_number: int
    opens_sent: int = 0  # every GET sent, answered or not: the most the server may count
    opens_answered: int = 0  # 200 answers: each was counted and audited before it was sent
    revocation_sent: bool = False
    revoked: bool = False  # the revocation was acknowledged
    revoked_in_db: bool = False  # as the last check found it


@dataclass(frozen=True, slots=True)
class ShareStep:
    """One share the clinician makes in a round: of which exam, how often opened, revoked or not."""

    exam_id: str
    opens: int
    revoke: bool


@dataclass
class ShareLinks:
    """A clinician sharing exams stored before the round: makes links, opens them without
    credentials (``/share/{token}``), revokes some; records every acknowledgement and
    every open sent.
    """

    exam_ids: list[str]
    links: list[SharedLink] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def plan_round(self, rng: random.Random, count: int) -> list[ShareStep]:
        return [
            ShareStep(rng.choice(self.exam_ids), rng.randint(1, 2), rng.random() < 0.5) for _ in range(count)
        ]

    def run(self, server: PhivaultServer, token: str, round_number: int, steps: list[ShareStep]) -> None:
        """Thread body: the round's steps, until the server dies."""
        headers = {"Authorization": f"Bearer {token}"}
        with server.client() as http:
            try:
                for step in steps:
                    self._step(http, headers, round_number, step)
            except httpx.TransportError:
                pass  # the server is gone

    def _step(self, http: httpx.Client, headers: dict[str, str], round_number: int, step: ShareStep) -> None:
        expires = datetime.now(UTC) + timedelta(days=1)
        created = http.post(
            f"/api/v1/exams/{step.exam_id}/shares",
            json={"expires_at": expires.isoformat(), "mode": "view"},
            headers=headers,
        )
        if created.status_code != 201:
            return
        body = created.json()
        link = SharedLink(body["id"], step.exam_id, body["url"].rsplit("/", 1)[1], round_number)
        self.links.append(link)
        for _ in range(step.opens):
            if self.open(http, link) == 404:
                self.violations.append(f"share {link.share_id}, never revoked, answered 404")
        if not step.revoke:
            return
        link.revocation_sent = True
        revoked = http.delete(f"/api/v1/exams/{step.exam_id}/shares/{link.share_id}", headers=headers)
        if revoked.status_code == 200:
            link.revoked = True
            if (answer := self.open(http, link)) != 404:
                self.violations.append(f"share {link.share_id}, revoked, answered {answer}")

    @staticmethod
    def open(http: httpx.Client, link: SharedLink) -> int:
        link.opens_sent += 1  # before sending: the server may count it even if the answer is lost
        answer = http.get(f"/share/{link.token}", headers={"Accept": "application/json"})
        if answer.status_code == 200:
            link.opens_answered += 1
        return answer.status_code

    def reopen(self, server: PhivaultServer, links: list[SharedLink]) -> None:
        """After a restart: each link opens, unless the database holds it revoked (then 404,
        the answer of a dead link). Called before the next kill is armed.
        """
        with server.client() as http:
            for link in links:
                answer = self.open(http, link)
                expected = 404 if link.revoked_in_db else 200
                assert answer == expected, (
                    f"share {link.share_id} (revoked: {link.revoked}) answered {answer}"
                )


def check_shares(runtime: Runtime, shares: ShareLinks) -> None:
    """The share links after a crash.

    * an acknowledged creation exists, with its token, exam and instances; an
      acknowledged revocation stays revoked;
    * an access count is at least the opens answered and at most the opens sent, and
      every counted open has its ``share.use`` event (one transaction holds both);
    * every share row has its ``share.create`` event, a revoked one its single
      ``share.revoke``, an unrevoked one none; a share whose creation was never
      acknowledged was opened by nobody (nobody holds its token).
    """
    assert shares.violations == [], shares.violations
    with runtime.db.transaction() as session:
        rows = {row.id: row for row in session.scalars(select(ShareLink))}
        items = {
            share_id: int(count)
            for share_id, count in session.execute(
                select(ShareItem.share_id, func.count()).group_by(ShareItem.share_id)
            )
        }
        events = _events(session, "share")
    for link in shares.links:
        row = rows.get(link.share_id)
        assert row is not None, f"acknowledged share {link.share_id} is gone"
        assert (row.token_digest, row.study_id) == (token_digest(link.token), link.exam_id), link.share_id
        if link.revoked:
            assert row.revoked_at is not None, f"acknowledged revocation of {link.share_id} was lost"
        assert link.opens_answered <= row.access_count <= link.opens_sent, (
            f"share {link.share_id}: counted {row.access_count}, "
            f"{link.opens_answered} answered of {link.opens_sent} sent"
        )
        link.revoked_in_db = row.revoked_at is not None
    known = {link.share_id for link in shares.links}
    for row in rows.values():
        assert items.get(row.id, 0) >= 1, f"share {row.id} without its instances"
        assert events[(AuditAction.SHARE_CREATE, row.id, Outcome.SUCCESS)] == 1, (
            f"share {row.id}: create event"
        )
        revocations = events[(AuditAction.SHARE_REVOKE, row.id, Outcome.SUCCESS)]
        assert revocations == int(row.revoked_at is not None), f"share {row.id}: {revocations} revoke events"
        # No passcodes here, so every successful share.use is a counted open.
        uses = events[(AuditAction.SHARE_USE, row.id, Outcome.SUCCESS)]
        assert uses == row.access_count, f"share {row.id}: {uses} use events, counted {row.access_count}"
        if row.id not in known:
            assert row.access_count == 0, f"unacknowledged share {row.id} was opened"
