"""The composition root: builds databases, object store, clock and job handlers from
``Settings``. The CLI and the web app both start here, so each thing is built one way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from pathlib import Path

from sqlalchemy.exc import ArgumentError

from phivault.accounts.service import Accounts
from phivault.audit.export import Observer
from phivault.audit.service import AuditLog, CheckpointPolicy
from phivault.audit.siem import (
    SiemConfigError,
    SiemDestination,
    SiemForwarder,
    TlsSyslogTransport,
    tls_context,
)
from phivault.clock import Clock, SystemClock
from phivault.config.settings import Settings, SettingsError
from phivault.crypto.keyring import Keyring, open_keyring
from phivault.crypto.keyring.errors import KeyringConfigError
from phivault.crypto.rotation import ROTATION_JOB, rotation_job_handler
from phivault.crypto.service import KeyHierarchy
from phivault.db.engine import Database
from phivault.db.jobs import JobContext, JobRegistry, Worker
from phivault.db.migrate import upgrade_all
from phivault.devices.service import HOUSEKEEPING_JOB, Devices
from phivault.devices.uploads import Uploads
from phivault.exams.exports import ExportService, PacsDestinations
from phivault.exams.ingest import IngestService
from phivault.exams.quarantine import Quarantine
from phivault.exams.reading import ExamReader
from phivault.exams.search import Searcher
from phivault.exams.service import ExamService
from phivault.exams.shares import ShareService
from phivault.exams.sweeper import SWEEP_JOB, Sweeper, ensure_scheduled, sweep_job_handler
from phivault.storage.base import ObjectStore
from phivault.storage.factory import open_object_store

SELFTEST_JOB = "system.selftest"


@dataclass
class Runtime:
    """Everything a running phivault process shares."""

    settings: Settings
    clock: Clock
    db: Database
    phi_db: Database
    store: ObjectStore
    keyring: Keyring
    audit: AuditLog
    jobs: JobRegistry = field(default_factory=JobRegistry)
    siem: SiemForwarder | None = None
    accounts: Accounts = field(init=False)

    @cached_property
    def keys(self) -> KeyHierarchy:
        """The key hierarchy: object and field encryption, patient keys, shredding."""
        return KeyHierarchy(self.keyring, self.clock, alarm_db=self.db)

    @cached_property
    def ingest(self) -> IngestService:
        """The one ingest pipeline (STOW-RS, C-STORE, device uploads)."""
        return IngestService(self.settings, self.db, self.phi_db, self.store, self.keys, self.clock)

    @cached_property
    def reading(self) -> ExamReader:
        """The read core: finds, opens and re-identifies exams for every read path."""
        ingest = self.ingest
        return ExamReader(self.db, self.phi_db, self.store, self.keys, ingest.secrets, ingest.phi, self.clock)

    @cached_property
    def search(self) -> Searcher:
        """QIDO-RS searches over the index and the PHI store's blind indexes."""
        return Searcher(self.reading, max_date_range_days=self.settings.qido_max_date_range_days)

    @cached_property
    def exams(self) -> ExamService:
        """The exam API: list, detail, comments, archive, legal hold, deletion."""
        retention = timedelta(days=self.settings.exam_retention_days)
        return ExamService(self.reading, self.search, retention=retention)

    @cached_property
    def shares(self) -> ShareService:
        """Share links: de-identified exams outside the institution, behind the egress guard."""
        accounts, policies = self.accounts, self.ingest.policies
        return ShareService(self.settings, self.reading, policies, accounts.hasher, accounts.mailer)

    @cached_property
    def pacs_destinations(self) -> PacsDestinations:
        return PacsDestinations(self.reading)

    @cached_property
    def exports(self) -> ExportService:
        """Export to PACS: re-identified instances sent with C-STORE by a job."""
        return ExportService(self.settings, self.reading)

    @cached_property
    def devices(self) -> Devices:
        """Activation codes, device tokens, and the authentication of device requests."""
        return Devices(self.settings, self.db, self.clock, self.keyring)

    @cached_property
    def uploads(self) -> Uploads:
        """Resumable uploads of devices, finalized into the ingest pipeline."""
        return Uploads(self.settings, self.db, self.clock, self.keys, self.store, self.devices, self.ingest)

    @cached_property
    def quarantine(self) -> Quarantine:
        """Review of instances held back for burned-in text."""
        return Quarantine(self.settings, self.db, self.store, self.keys, self.clock, self.ingest)

    @cached_property
    def sweeper(self) -> Sweeper:
        """Removes what a crash between the ingest pipeline's writes left unreferenced."""
        grace = timedelta(seconds=self.settings.ingest_orphan_grace_seconds)
        return Sweeper(self.db, self.phi_db, self.store, self.keys, self.clock, grace)

    def new_worker(self, name: str | None = None) -> Worker:
        return Worker(
            self.db,
            self.jobs,
            self.clock,
            name=name,
            lease=timedelta(seconds=self.settings.job_lease_seconds),
            poll_interval=self.settings.job_poll_seconds,
            tick=self._integrate_audit,
        )

    def _integrate_audit(self) -> None:
        self.audit.integrate_pending(self.clock.now())
        if self.siem is not None:
            # Bounded by its time budget and socket timeouts; a SIEM outage costs one quick
            # failed connect per back-off period, so the sequencer keeps its pace.
            self.siem.forward()

    def close(self) -> None:
        if "keys" in self.__dict__:  # built: let pending integrity alerts reach the audit log
            self.keys.wait_for_alarms()
        self.db.dispose()
        self.phi_db.dispose()
        self.keyring.close()


def build_runtime(settings: Settings, clock: Clock | None = None) -> Runtime:
    """Connect to what ``settings`` name; nothing is created or migrated here.

    A URL that cannot be used raises ``SettingsError`` naming its setting.
    """
    clock = clock or SystemClock()
    db = _database(settings.database_url, "PHIVAULT_DATABASE_URL")
    keyring = _keyring(settings, clock)
    policy = CheckpointPolicy(
        every_records=settings.audit_checkpoint_records,
        every=timedelta(seconds=settings.audit_checkpoint_seconds),
    )
    runtime = Runtime(
        settings=settings,
        clock=clock,
        db=db,
        phi_db=_database(settings.phi_database_url, "PHIVAULT_PHI_DATABASE_URL"),
        store=_object_store(settings.object_store_url),
        keyring=keyring,
        audit=AuditLog(db, keyring, settings.audit_origin, policy),
        siem=_siem_forwarder(settings, db, clock),
    )
    _register_jobs(runtime)
    runtime.accounts = Accounts(settings, db, clock, keyring)
    runtime.accounts.register_jobs(runtime.jobs)
    runtime.shares.register_jobs(runtime.jobs)  # after accounts: shares use its hasher and mailer
    runtime.exports.register_jobs(runtime.jobs)
    return runtime


def _database(url: str, setting: str) -> Database:
    try:
        return Database(url)
    except (ValueError, ArgumentError) as exc:
        raise SettingsError(setting, str(exc)) from None


def _siem_forwarder(settings: Settings, db: Database, clock: Clock) -> SiemForwarder | None:
    if not settings.siem_url:
        return None
    try:
        destination = SiemDestination.parse(settings.siem_url)
    except SiemConfigError as exc:
        raise SettingsError("PHIVAULT_SIEM_URL", str(exc)) from None
    try:
        context = tls_context(
            settings.siem_ca_file, settings.siem_client_cert_file, settings.siem_client_key_file
        )
    except SiemConfigError as exc:
        raise SettingsError("PHIVAULT_SIEM_CA_FILE", str(exc)) from None
    return SiemForwarder(
        db,
        clock,
        destination,
        TlsSyslogTransport(destination, context, timeout=settings.siem_timeout_seconds),
        Observer.local(settings.audit_origin),
        batch_records=settings.siem_batch_records,
        budget_seconds=settings.siem_tick_budget_seconds,
        # Longer than one batch can take (connect, send, close: three timeouts).
        lease=timedelta(seconds=max(60.0, 4 * settings.siem_timeout_seconds)),
    )


def _object_store(url: str) -> ObjectStore:
    try:
        return open_object_store(url)
    except ValueError as exc:
        raise SettingsError("PHIVAULT_OBJECT_STORE_URL", str(exc)) from None


def _keyring(settings: Settings, clock: Clock) -> Keyring:
    try:
        return open_keyring(
            settings.keyring_url,
            data_dir=settings.data_dir,
            master_key_path=settings.master_key_path,
            clock=clock,
        )
    except KeyringConfigError as exc:
        raise SettingsError("PHIVAULT_KEYRING_URL", str(exc)) from None


def _register_jobs(runtime: Runtime) -> None:
    store = runtime.store

    def selftest(context: JobContext) -> None:
        # Proves a worker is alive and can reach the object store; the job's completion
        # row (in the same transaction) proves it can write the database.
        del context
        store.probe()

    runtime.jobs.register(SELFTEST_JOB, selftest)
    runtime.jobs.register(ROTATION_JOB, rotation_job_handler(runtime.keys))
    runtime.jobs.register(HOUSEKEEPING_JOB, runtime.uploads.housekeeping_job)
    runtime.jobs.register(
        SWEEP_JOB,
        sweep_job_handler(runtime.sweeper, timedelta(seconds=runtime.settings.ingest_sweep_interval_seconds)),
    )


def prepare_data_dir(settings: Settings) -> Path:
    """Create the data directory with owner-only permissions (0700) if it is missing."""
    data_dir = settings.data_dir
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return data_dir


def initialise(runtime: Runtime) -> list[str]:
    """First-start work, safe to repeat: data dir, dev TLS/master key, schema migrations.

    Returns a description of each thing it created.
    """
    from phivault.config.dev_defaults import ensure_dev_material  # noqa: PLC0415

    settings = runtime.settings
    prepare_data_dir(settings)
    created = ensure_dev_material(settings)
    runtime.store.prepare()
    upgrade_all(runtime.db, runtime.phi_db)
    ensure_scheduled(runtime.db, runtime.clock.now())
    return created


def umask_owner_only() -> None:
    """Files phivault creates are readable by its own user only."""
    os.umask(0o077)
