"""How a keyring test opens its keyring, and opens it again, whatever the backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from phivault.crypto.keyring import Keyring, open_keyring


@dataclass
class KeyringBackend:
    """One root key on one backend (``local``, ``pkcs11``, ``openbao``), named by ``url``."""

    name: str
    url: str
    data_dir: Path
    master_key_path: Path
    _opened: list[Keyring] = field(default_factory=list)

    def open(self) -> Keyring:
        """A new keyring object for the same root key (as another process would open it)."""
        keyring = open_keyring(self.url, data_dir=self.data_dir, master_key_path=self.master_key_path)
        self._opened.append(keyring)
        return keyring

    def close_all(self) -> None:
        for keyring in self._opened:
            keyring.close()
