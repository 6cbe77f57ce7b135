"""A throwaway SoftHSM2 token for the PKCS#11 keyring tests.

SoftHSM2 is Debian's ``softhsm2`` package (module ``/usr/lib/softhsm/libsofthsm2.so`` and
``softhsm2-util``); ``scripts/install-test-deps.sh`` is where it gets installed. Each token
lives in a private directory with its own configuration file, named by ``SOFTHSM2_CONF``.
SoftHSM2 reads that variable once, when a process first initialises the module, so one
process sees one token directory: the fixture sets it for the whole test session and
makes every token there (``add_token``) before the module is loaded, or after (SoftHSM2
finds new tokens when slots are listed again).
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MODULE_PATH = Path("/usr/lib/softhsm/libsofthsm2.so")
DEBIAN_PACKAGE = "softhsm2"
_TIMEOUT = 30.0


class SoftHsmUnavailableError(Exception):
    """SoftHSM2 is not installed, or a token could not be made."""


@dataclass(frozen=True)
class SoftHsmToken:
    """One initialised token: its label and PINs, in the directory ``conf_path`` names."""

    module_path: Path
    label: str
    pin: str
    so_pin: str
    conf_path: Path

    def env(self) -> dict[str, str]:
        """Variables that make SoftHSM2 (here or in a child process) see this token."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    def keyring_url(self, key_label: str = "phivault-root") -> str:
        """The ``PHIVAULT_KEYRING_URL`` for root keys labelled ``key_label`` in this token."""
        return f"pkcs11://{self.module_path}?token={self.label}&label={key_label}"


class SoftHsm:
    """A token directory and its configuration file under ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        util = shutil.which("softhsm2-util")
        if not MODULE_PATH.is_file() or util is None:
            raise SoftHsmUnavailableError(
                f"SoftHSM2 is not installed (Debian package {DEBIAN_PACKAGE}: {MODULE_PATH}, softhsm2-util)"
            )
        self._util = util
        self.workdir = workdir
        self.token_dir = workdir / "tokens"
        self.token_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.conf_path = workdir / "softhsm2.conf"
        self.conf_path.write_text(
            f"directories.tokendir = {self.token_dir}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    def add_token(self, label: str, *, pin: str | None = None) -> SoftHsmToken:
        """Initialise a new token in the first free slot; return how to reach it."""
        token = SoftHsmToken(
            module_path=MODULE_PATH,
            label=label,
            pin=pin or secrets.token_hex(8),
            so_pin=secrets.token_hex(8),
            conf_path=self.conf_path,
        )
        command = [
            self._util,
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            token.pin,
            "--so-pin",
            token.so_pin,
        ]
        try:
            result = subprocess.run(
                command,
                env={**token.env(), "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SoftHsmUnavailableError(f"softhsm2-util --init-token: {exc}") from exc
        if result.returncode != 0:
            raise SoftHsmUnavailableError(
                f"softhsm2-util --init-token failed: {result.stderr.strip()[-500:]}"
            )
        return token
