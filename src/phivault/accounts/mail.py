"""Outgoing e-mail: an SMTP mailer, and a null one when no SMTP host is configured.

Messages carry links and ids, never PHI. TLS: ``starttls`` (submission, port 587, RFC
3207), ``implicit`` (port 465, RFC 8314) or ``none`` (a relay on the same host only);
the server certificate is verified against the system's trust store.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from email.message import EmailMessage
from typing import Protocol

from phivault.config.settings import Settings

log = logging.getLogger(__name__)


class MailError(Exception):
    """The message could not be handed to the SMTP server (retried by the job queue)."""


class Mailer(Protocol):
    def send(self, to: str, subject: str, body: str) -> None: ...


class SmtpMailer:
    def __init__(self, settings: Settings, context: ssl.SSLContext | None = None) -> None:
        self.host = settings.smtp_host
        self.port = settings.smtp_port
        self.tls = settings.smtp_tls
        self.username = settings.smtp_username
        self.password = settings.smtp_password.get_secret_value()
        self.sender = settings.smtp_from
        self.timeout = settings.smtp_timeout_seconds
        self.context = context or ssl.create_default_context(
            cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
        )

    def send(self, to: str, subject: str, body: str) -> None:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = to
        message["Subject"] = subject
        message.set_content(body)
        try:
            with self._connect() as smtp:
                if self.username:
                    smtp.login(self.username, self.password)
                smtp.send_message(message)
        except (OSError, smtplib.SMTPException) as exc:
            # The type only: SMTP replies can quote the recipient.
            raise MailError(f"SMTP delivery failed: {type(exc).__name__}") from None

    def _connect(self) -> smtplib.SMTP:
        if self.tls == "implicit":
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=self.context)
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            if self.tls == "starttls":
                smtp.starttls(context=self.context)
        except BaseException:
            smtp.close()
            raise
        return smtp


class NullMailer:
    """No SMTP host configured: nothing is sent; a warning says so (never the content)."""

    def send(self, to: str, subject: str, body: str) -> None:
        del to, subject, body
        log.warning("password reset requested but PHIVAULT_SMTP_HOST is not set: no e-mail sent")


def mailer_for(settings: Settings) -> Mailer:
    return SmtpMailer(settings) if settings.smtp_host else NullMailer()
