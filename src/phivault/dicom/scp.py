"""The DIMSE C-STORE SCP (PS3.4 Annex B; PS3.7 §9.1.1): modalities and PACS push to phivault.

Runs inside ``phivault serve`` beside the HTTPS server (pynetdicom, one thread per
association). An association is accepted only from a calling AE title registered as a DICOM
node (``dicom_nodes``); any other is refused with A-ASSOCIATE-RJ "calling AE title not
recognized" (PS3.8 §9.3.4) and audited. A called AE title other than ours is refused too.
Each received instance goes, as a PS3.10 file (File Meta + the data set as received, in its
transfer syntax), through the one ingest pipeline; the C-STORE response status is:

========  ======================================================================
0000      stored, or stored before (a re-send is idempotent)
B000      quarantined: burned-in text no pixel rule covers; kept apart until an
          institution admin releases (de-identified, stored) or rejects it
A700      refused: too large, the storage quota, or the storage itself is full
A900      refused: a required UID is missing (the data set does not match its class)
C000      refused: not understood (not DICOM, truncated, a value breaking its VR)
0122      refused: SOP Class not supported
0110      refused: processing failure (e.g. the study belongs to another patient)
========  ======================================================================

Failures and warnings carry Error Comment (0000,0902) with phivault's problem ``code``.

Nothing of an instance is ever logged: pynetdicom's own event logging is switched off, its
loggers stay at WARNING, and their records lose arguments and tracebacks (which can quote
element values) before any handler sees them.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from phivault.audit.actions import ActorType, AuditAction, Outcome
from phivault.audit.service import Actor, RequestContext, SystemSubject, Target, record
from phivault.clock import Clock
from phivault.config.settings import Settings
from phivault.config.tls import server_context
from phivault.db.engine import Database
from phivault.dicom.errors import DicomRejected, DimseStatus
from phivault.dicom.nodes import DicomNodes, NodeInfo
from phivault.dicom.stow import CODE_QUARANTINED, CODE_QUOTA, CODE_STORAGE_FULL, Ingest
from phivault.dicom.validation import SUPPORTED_SOP_CLASSES, SUPPORTED_TRANSFER_SYNTAXES
from phivault.exams.errors import QuotaExceeded
from phivault.exams.types import IngestChannel, IngestOrigin, ReceiptStatus
from phivault.storage.errors import StorageFull

log = logging.getLogger(__name__)

SUCCESS: Final = 0x0000
WARNING_QUARANTINED: Final = 0xB000  # PS3.4 Table B.2-1 "Coercion of Data Elements"; see above
# PS3.8 §9.3.4 A-ASSOCIATE-RJ: result, source, reason.
_REJECTED_PERMANENT: Final = 0x01
_REJECTED_TRANSIENT: Final = 0x02
_SERVICE_USER: Final = 0x01
_NO_REASON: Final = 0x01
_CALLING_AE_NOT_RECOGNIZED: Final = 0x03
# Larger PDUs than pynetdicom's 16 KiB default: fewer round trips for image data.
MAX_PDU_BYTES: Final = 1024 * 1024
SOCKET_TIMEOUT_SECONDS: Final = 60.0
STOP_GRACE_SECONDS: Final = 10.0
_UNKNOWN_CALLER: Final = SystemSubject(Actor(ActorType.ANONYMOUS, "dicom-peer"))


class ScpStartError(Exception):
    """The SCP cannot listen (address in use, bad TLS material); the message names what."""


class NodeDirectory(Protocol):
    """How the SCP finds the node of a calling AE title (``DicomNodes`` is one)."""

    def by_ae_title(self, ae_title: str) -> NodeInfo | None: ...


@dataclass(frozen=True, slots=True)
class ScpConfig:
    ae_title: str
    host: str
    port: int
    max_associations: int
    ssl_context: ssl.SSLContext | None = None


def tls_context(cert_file: Path, key_file: Path, client_ca_file: Path | None) -> ssl.SSLContext:
    """DICOM TLS (PS3.15 Annex B.1, here TLS 1.2+ with phivault's policy, config/tls.py);
    with a client CA, peers must present a certificate it issued (mutual authentication).
    """
    context = server_context(cert_file, key_file)
    if client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ScpStartError(f"cannot load the DICOM TLS client CA {client_ca_file}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def build_scp(settings: Settings, *, ingest: Ingest, db: Database, clock: Clock) -> StoreScp:
    """The SCP ``serve`` runs, from the settings (docs/dicom.md)."""
    context = None
    if settings.dicom_tls:
        context = tls_context(
            settings.dicom_cert_path, settings.dicom_key_path, settings.dicom_tls_client_ca_file
        )
    config = ScpConfig(
        ae_title=settings.dicom_ae_title,
        host=settings.bind,
        port=settings.dicom_port,
        max_associations=settings.dicom_max_associations,
        ssl_context=context,
    )
    return StoreScp(config, ingest=ingest, nodes=DicomNodes(db, clock), db=db, clock=clock)


def storage_contexts() -> list[PresentationContext]:
    """One presentation context per supported Storage SOP Class, each with every supported
    transfer syntax (kept as received, never converted), plus Verification (C-ECHO).
    """
    syntaxes = sorted(SUPPORTED_TRANSFER_SYNTAXES)
    contexts = [build_context(sop_class, syntaxes) for sop_class in sorted(SUPPORTED_SOP_CLASSES)]
    contexts.append(build_context(Verification))
    return contexts


def quiet_pynetdicom() -> None:
    """Keep instance contents out of logs (see the module docstring)."""
    _config.LOG_HANDLER_LEVEL = "none"  # no per-PDU/DIMSE event logging (identifiers, UIDs)
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if name == "pynetdicom" or name.startswith("pynetdicom."):
            logger = logging.getLogger(name)
            if not any(isinstance(existing, _WithoutValues) for existing in logger.filters):
                logger.addFilter(_WithoutValues())


class _WithoutValues(logging.Filter):
    """Reduce a pynetdicom record to its message template: no arguments, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, BaseException):  # LOGGER.exception(exc): its text may quote data
            record.msg = f"{type(record.msg).__name__} (details withheld)"
        elif record.args:
            record.msg = f"{record.msg} (arguments withheld)"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


class _Server(ThreadedAssociationServer):
    """pynetdicom's server, with TCP_NODELAY and the TLS handshake moved off the accept loop."""

    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None  # noqa: S101  # nosec B101  # bound by the constructor
        client, address = self.socket.accept()
        # Without it small DIMSE responses wait for delayed ACKs (DESIGN.md §10: ~10x slower).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(SOCKET_TIMEOUT_SECONDS)
        if self.ssl_context is not None:
            # Handshake on first read, in the association's own thread: a client that stalls
            # the handshake must not stall the accept loop (pynetdicom handshakes here).
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


class StoreScp:
    """Start with :meth:`start`; :meth:`stop_accepting`, then :meth:`stop` to shut down."""

    def __init__(  # the SCP's collaborators, named at the one call site
        self,
        config: ScpConfig,
        *,
        ingest: Ingest,
        nodes: NodeDirectory,
        db: Database,
        clock: Clock,
    ) -> None:
        self._config = config
        self._ingest = ingest
        self._nodes = nodes
        self._db = db
        self._clock = clock
        self._callers: weakref.WeakKeyDictionary[Association, NodeInfo] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._ae = AE(ae_title=config.ae_title)
        self._ae.maximum_associations = config.max_associations
        self._ae.maximum_pdu_size = MAX_PDU_BYTES
        self._ae.require_called_aet = True
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The port listened on (the configured one, or the one chosen for port 0)."""
        if self._server is None:
            return self._config.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        quiet_pynetdicom()
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, _on_echo),
        ]
        try:
            server = self._ae.make_server(
                (self._config.host, self._config.port),
                contexts=storage_contexts(),
                ssl_context=self._config.ssl_context,
                evt_handlers=handlers,
                server_class=_Server,
            )
        except OSError as exc:
            where = f"{self._config.host}:{self._config.port}"
            raise ScpStartError(f"cannot listen for DICOM on {where}: {exc.strerror or exc}") from None
        self._ae._servers.append(server)  # noqa: SLF001  # what AE.start_server does, for AE.shutdown
        thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
        thread.start()
        self._server = server
        scheme = "DICOM TLS" if self._config.ssl_context is not None else "DICOM"
        log.info(
            "phivault receiving %s (C-STORE SCP %s) on %s:%d",
            scheme,
            self._config.ae_title,
            self._config.host,
            self.port,
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress continue."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop accepting, let open associations finish for up to ``grace`` seconds, then
        abort the rest (their senders get no response for what was in flight, and resend).
        """
        self.stop_accepting()
        deadline = time.monotonic() + grace
        while self._active() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._ae.shutdown()

    def _active(self) -> list[Association]:
        return [assoc for assoc in self._ae.active_associations if assoc.is_acceptor and assoc.is_alive()]

    # -- association (PS3.8 §7.1) -------------------------------------------------------

    def _on_requested(self, event: Event) -> None:
        assoc = event.assoc
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "") or "")
        address = str(assoc.requestor.address)
        try:
            node = self._nodes.by_ae_title(calling)
        except Exception as exc:  # noqa: BLE001  # the database is down: try again later
            log.warning("DICOM association refused: the node directory failed (%s)", type(exc).__name__)
            self._reject(assoc, _REJECTED_TRANSIENT, _NO_REASON)
            return
        if node is None:
            self._audit_unknown_caller(calling, address)
            log.info("DICOM association refused: calling AE title not registered (from %s)", address)
            self._reject(assoc, _REJECTED_PERMANENT, _CALLING_AE_NOT_RECOGNIZED)
            return
        with self._lock:
            self._callers[assoc] = node

    @staticmethod
    def _reject(assoc: Association, result: int, reason: int) -> None:
        assoc.acse.send_reject(result, _SERVICE_USER, reason)
        assoc.kill()  # as pynetdicom does after its own rejections

    def _audit_unknown_caller(self, calling: str, address: str) -> None:
        # An AE title is a device's name, not PHI; kept printable and within PS3.5's 16.
        title = "".join(c for c in calling.strip() if " " <= c <= "~")[:16] or "(empty)"
        try:
            with self._db.transaction() as session:
                record(
                    session,
                    AuditAction.DICOM_ASSOCIATION_REJECT,
                    _UNKNOWN_CALLER,
                    Target("dicom_ae_title", title),
                    Outcome.DENIED,
                    now=self._clock.now(),
                    context=RequestContext(ip=address),
                )
        except Exception as exc:  # noqa: BLE001  # refusing matters more than recording it
            log.warning("could not audit a refused DICOM association: %s", type(exc).__name__)

    # -- C-STORE (PS3.4 §B.2.3) ---------------------------------------------------------

    def _on_store(self, event: Event) -> int | Dataset:
        with self._lock:
            node = self._callers.get(event.assoc)
        if node is None:  # cannot happen: associations start only for known nodes
            return _status(DimseStatus.PROCESSING_FAILURE, "processing_failure")
        origin = IngestOrigin(
            node.institution_id,
            subject=SystemSubject(Actor(ActorType.DICOM_NODE, node.id), node.institution_id),
            channel=IngestChannel.DIMSE,
            device_id=node.device_id,
        )
        context = RequestContext(ip=str(event.assoc.requestor.address))
        # PS3.10 file: preamble, File Meta (SOP Class/Instance UIDs of the request, the
        # context's transfer syntax), then the data set exactly as received.
        return self._ingest_status(event.encoded_dataset(), origin, context)

    def _ingest_status(self, data: bytes, origin: IngestOrigin, context: RequestContext) -> int | Dataset:
        try:
            receipt = self._ingest.ingest(data, origin, context=context)
        except DicomRejected as exc:
            return _status(exc.dimse_status, exc.code.value)
        except QuotaExceeded:
            return _status(DimseStatus.REFUSED_OUT_OF_RESOURCES, CODE_QUOTA)
        except StorageFull:
            log.error("object store is full: a C-STORE was refused")  # noqa: TRY400  # no traceback: values
            return _status(DimseStatus.REFUSED_OUT_OF_RESOURCES, CODE_STORAGE_FULL)
        except Exception as exc:  # noqa: BLE001  # else pynetdicom logs the traceback (values)
            log.error("C-STORE failed: %s", type(exc).__name__)  # noqa: TRY400  # by type only
            return _status(DimseStatus.PROCESSING_FAILURE, "processing_failure")
        if receipt.status is ReceiptStatus.QUARANTINED:
            return _status(WARNING_QUARANTINED, CODE_QUARANTINED)
        return SUCCESS


def _status(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = int(status)
    response.ErrorComment = comment  # PS3.7 §C.4: the stable code, never a value
    return response


def _on_echo(_event: Event) -> int:
    return SUCCESS
