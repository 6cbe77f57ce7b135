"""C-STORE SCU (PS3.4 Annex B, PS3.7 §9.1.1): phivault sending instances to a PACS.

One association per export attempt carries every instance still to send; each instance is
confirmed or refused by the PACS's C-STORE response status (PS3.4 Table B.2-1): success
(0000) and warnings (B000, B006, B007: stored with coercion or elements discarded) count as
stored; anything else, or no response, does not.

DICOM TLS (PS3.15 Annex B.1) uses phivault's TLS policy (1.2+, ECDHE + AEAD on 1.2), checks
the PACS's certificate against the destination's CA (PEM) or the system's trust store, and
its name against the destination's host. Sockets set TCP_NODELAY (DESIGN.md §10).
Nothing of an instance is logged: pynetdicom's event logging is switched off (``scp``).
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from phivault.config.tls import TLS12_CIPHERS
from phivault.dicom.scp import quiet_pynetdicom

MAX_CONTEXTS: Final = 128  # PS3.8 §9.3.2.2: presentation context ids are odd numbers 1-255
STORED: Final = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_UNCOMPRESSED: Final = (dicom_uid.ExplicitVRLittleEndian, dicom_uid.ImplicitVRLittleEndian)


class AssociationFailed(Exception):
    """No association with the PACS; the message is safe to store (no values)."""


class ContextsExhausted(AssociationFailed):
    """More SOP class / transfer syntax pairs than one association can carry."""


@dataclass(frozen=True, slots=True)
class StorePeer:
    """A PACS as its export destination describes it."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    tls: bool = False
    ca_pem: str | None = None
    timeout: float = 30.0


def client_context(ca_pem: str | None) -> ssl.SSLContext:
    """TLS for a DICOM association to a PACS (see the module docstring)."""
    context = (
        ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
        if ca_pem
        else (ssl.create_default_context(ssl.Purpose.SERVER_AUTH))
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def ca_problem(ca_pem: str) -> str | None:
    """Why ``ca_pem`` cannot be used as a trust anchor; ``None`` if it can."""
    try:
        ssl.create_default_context(cadata=ca_pem)
    except (ssl.SSLError, ValueError):
        return "ca_pem is not a PEM certificate"
    return None


def presentation_contexts(pairs: set[tuple[str, str]]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) pair; uncompressed syntaxes may be
    converted into each other by the SCU, so they are offered together.
    """
    contexts = []
    for sop_class, syntax in sorted(pairs):
        offered = (
            [syntax, *(s for s in _UNCOMPRESSED if s != syntax)] if syntax in _UNCOMPRESSED else [syntax]
        )
        contexts.append(build_context(sop_class, offered))
    if len(contexts) > MAX_CONTEXTS:
        raise ContextsExhausted(f"more than {MAX_CONTEXTS} kinds of instance in one export")
    return contexts


class StoreAssociation:
    """An association with a PACS for C-STORE; use as a context manager."""

    def __init__(self, peer: StorePeer, contexts: list[PresentationContext]) -> None:
        quiet_pynetdicom()
        self._peer = peer
        self._ae = AE(ae_title=peer.calling_ae_title)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self._ae, timeout, peer.timeout)
        self._ae.requested_contexts = contexts
        self._assoc: Association | None = None

    def __enter__(self) -> Self:
        peer = self._peer
        _reachable(peer)
        tls_args = (client_context(peer.ca_pem), peer.host) if peer.tls else None
        assoc = self._ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise AssociationFailed(
                    "the PACS rejected the association (is the calling AE title registered?)"
                )
            raise AssociationFailed(
                "no association with the PACS (unreachable, refused, TLS failure or timeout)"
            )
        _no_delay(assoc)
        self._assoc = assoc
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, trace: TracebackType | None
    ) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if assoc.is_established:
            if kind is None:
                assoc.release()
            else:
                assoc.abort()
        self._ae.shutdown()

    def store(self, dataset: Dataset) -> int | None:
        """Send one instance; the C-STORE response status, or ``None`` without a response."""
        assoc = self._assoc
        if assoc is None or not assoc.is_established:
            raise AssociationFailed("the association with the PACS was lost")
        try:
            response = assoc.send_c_store(dataset)
        except (ValueError, AttributeError):
            return None  # no accepted presentation context, or the instance cannot be encoded
        status = response.get("Status") if response else None
        if status is None and not assoc.is_established:
            raise AssociationFailed("the association with the PACS was lost")
        return None if status is None else int(status)


def _reachable(peer: StorePeer) -> None:
    """Fail early, with the reason, when nothing accepts connections at the peer's address
    (pynetdicom would leave the refused socket open and say less).
    """
    try:
        with socket.create_connection((peer.host, peer.port), timeout=peer.timeout):
            pass
    except TimeoutError:
        raise AssociationFailed("the PACS did not answer (connection timed out)") from None
    except OSError as exc:
        raise AssociationFailed(f"the PACS is unreachable (no association: {type(exc).__name__})") from None


def _no_delay(assoc: Association) -> None:
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if isinstance(raw, socket.socket):
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            return
