"""phivault's settings: one pydantic-settings class, read from ``PHIVAULT_*`` variables
and, optionally, a TOML file named by ``PHIVAULT_CONFIG``.

Precedence, highest first: explicit overrides (CLI flags), environment, TOML file,
defaults. Paths left unset are derived from the data directory, so the embedded default
(SQLite, file object store, local keyring) needs no configuration at all.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "PHIVAULT_"
CONFIG_ENV = "PHIVAULT_CONFIG"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(Exception):
    """A setting could not be read or is invalid; ``setting`` names it as users write it."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


class Settings(BaseSettings):
    """Every knob of a phivault deployment. docs/configuration.md describes each one."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    profile: Literal["dev", "prod"] = "dev"
    data_dir: Path = Path("phivault-data")
    database_url: str = ""
    phi_database_url: str = ""
    object_store_url: str = ""
    keyring_url: str = "local://"
    master_key_file: Path | None = None
    region: str = Field(default="local", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    hsts_max_age: int = Field(default=63_072_000, ge=0)  # two years, Mozilla's recommendation

    bind: str = "127.0.0.1"
    port: int = Field(default=8443, ge=1, le=65535)
    dicom_port: int = Field(default=11112, ge=1, le=65535)
    # DICOM ingest (phivault.dicom): larger instances are refused with C-STORE status A700 /
    # STOW-RS failure reason A700; ultrasound top banner blanked by the default pixel rule.
    dicom_max_instance_bytes: int = Field(default=1_073_741_824, ge=1024)
    dicom_us_banner_rows: int = Field(default=60, ge=0, le=4096)
    # DICOM receivers (docs/dicom.md): the C-STORE SCP in `serve` (calling AE titles must be
    # registered nodes), optional DICOM TLS (PS3.15 B.1; the HTTPS certificate unless its
    # own is set; client certificates required when a CA is named), and STOW-RS's body limit.
    dicom_scp_enabled: bool = True
    dicom_ae_title: str = Field(default="PHIVAULT", min_length=1, max_length=16)
    dicom_max_associations: int = Field(default=20, ge=1, le=1000)
    dicom_tls: bool = False
    dicom_tls_cert_file: Path | None = None
    dicom_tls_key_file: Path | None = None
    dicom_tls_client_ca_file: Path | None = None
    dicomweb_max_request_bytes: int = Field(default=8 * 1024**3, ge=1024)
    # Ingest (docs/ingest.md): storage quotas (0 = none; institutions may set their own),
    # and the sweeper that removes what a crash between writes left unreferenced.
    ingest_device_quota_bytes: int = Field(default=2 * 1024**3, ge=0)
    ingest_institution_quota_bytes: int = Field(default=0, ge=0)
    ingest_orphan_grace_seconds: int = Field(default=3600, ge=0)
    ingest_sweep_interval_seconds: int = Field(default=3600, ge=60)
    # Reading exams (docs/exams.md): QIDO-RS page size cap and the widest StudyDate range a
    # PHI reader may search (the PHI index is searched day by day); the minimum time an
    # exam is kept before it may be deleted (0: no minimum; legal holds apply regardless).
    qido_max_results: int = Field(default=1000, ge=1, le=10_000)
    qido_max_date_range_days: int = Field(default=366, ge=1, le=3660)
    exam_retention_days: int = Field(default=0, ge=0, le=36_500)
    # Shares and PACS export (docs/exams.md): the longest a share link may live; how often an
    # export is tried (back-off 2, 4, 8 … s, at most 30 min apart) before it fails, and the
    # network timeout of each DICOM association with a PACS.
    share_max_days: int = Field(default=7, ge=1, le=90)
    pacs_export_max_attempts: int = Field(default=10, ge=1, le=30)
    pacs_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    admin_allow_cidrs: Annotated[tuple[IPNetwork, ...], NoDecode] = (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )

    debug: bool = False
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    run_worker: bool = True
    job_lease_seconds: int = Field(default=60, ge=5, le=3600)
    job_poll_seconds: float = Field(default=1.0, gt=0, le=60)

    max_clock_skew_seconds: float = Field(default=5.0, gt=0)

    # Slow clients: request headers must arrive within this time; beyond this many open
    # connections new requests get 503 instead of exhausting the process.
    http_header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    http_max_connections: int = Field(default=1000, ge=10)

    audit_checkpoint_records: int = Field(default=1000, ge=1)
    audit_checkpoint_seconds: int = Field(default=10, ge=1)
    # Six months is the floor (also written into the database's delete trigger).
    audit_retention_days: int = Field(default=183, ge=183)
    # Root and institution keys older than this make `doctor` warn (keys rotate).
    key_rotation_days: int = Field(default=365, ge=1, le=3650)

    # Accounts (docs/accounts.md). Floors are the ones OWASP's password storage guidance
    # and NIST SP 800-63B set; a deployment may only raise them.
    fips: bool = False
    argon2_memory_kib: int = Field(default=19_456, ge=19_456)
    argon2_time_cost: int = Field(default=2, ge=2)
    pbkdf2_iterations: int = Field(default=600_000, ge=600_000)
    access_token_seconds: int = Field(default=300, ge=60, le=900)
    session_absolute_hours: int = Field(default=12, ge=1, le=12)
    operator_idle_minutes: int = Field(default=15, ge=5, le=60)
    reauth_minutes: int = Field(default=10, ge=1, le=60)
    max_sessions_per_user: int = Field(default=10, ge=1, le=100)
    one_time_password_hours: int = Field(default=72, ge=1, le=720)
    bootstrap_operator_email: str = Field(
        default="operator@localhost", max_length=254, pattern=r"^[^@\s]+@[^@\s]+$"
    )
    public_url: str = Field(default="https://127.0.0.1:8443", pattern=r"^https://[^\s/?#]+(/[^\s?#]*)?$")

    # Outgoing mail (password reset). No host: reset requests are accepted and answered
    # alike, but no message is sent (a warning is logged once per request).
    smtp_host: str = ""
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_tls: Literal["starttls", "implicit", "none"] = "starttls"
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_from: str = Field(default="phivault@localhost", max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
    smtp_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    smtp_ca_file: Path | None = None  # trust this CA (PEM) instead of the system store

    # SIEM forwarding of the audit log: RFC 5424 syslog over TLS (RFC 5425), off when empty.
    siem_url: str = Field(default="", pattern=r"^(syslog\+tls://[^/?#\s]+)?$")
    siem_ca_file: Path | None = None
    siem_client_cert_file: Path | None = None
    siem_client_key_file: Path | None = None
    siem_batch_records: int = Field(default=2000, ge=1, le=10_000)
    siem_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    siem_tick_budget_seconds: float = Field(default=2.0, gt=0, le=60)

    # Devices (docs/devices.md): activation codes, DPoP-bound device tokens (RFC 9449),
    # resumable uploads. Pins: of the certificate a load balancer shows devices, when it is
    # not phivault's own (sha256//<base64 SPKI digest>, comma-separated).
    device_code_hours: int = Field(default=24, ge=1, le=168)
    device_token_seconds: int = Field(default=600, ge=60, le=3600)
    dpop_proof_max_age_seconds: int = Field(default=300, ge=10, le=3600)
    dpop_nonce_seconds: int = Field(default=300, ge=30, le=3600)
    upload_expiry_hours: int = Field(default=24, ge=1, le=168)
    device_tls_pins: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("bind")
    @classmethod
    def _bind_is_an_address(cls, value: str) -> str:
        ipaddress.ip_address(value)  # raises ValueError with a clear message
        return value

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title_is_valid(cls, value: str) -> str:
        from phivault.dicom.aetitle import normalise_ae_title  # noqa: PLC0415  # the one AE title rule

        return normalise_ae_title(value)

    @field_validator("admin_allow_cidrs", mode="before")
    @classmethod
    def _split_cidrs(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("device_tls_pins", mode="before")
    @classmethod
    def _split_pins(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("device_tls_pins", mode="after")
    @classmethod
    def _pins_are_sha256(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pin in value:
            if not re.fullmatch(r"sha256//[A-Za-z0-9+/]{43}=", pin):
                msg = "each pin is sha256//<base64 of the SHA-256 of a SubjectPublicKeyInfo>"
                raise ValueError(msg)
        return value

    @field_validator("admin_allow_cidrs", mode="after")
    @classmethod
    def _strict_networks(cls, value: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(net, strict=True) for net in value)

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        # Frozen model: derived defaults are set once here, through object.__setattr__.
        data_dir = self.data_dir.expanduser().absolute()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'phivault.sqlite3'}")
        if not self.phi_database_url:
            object.__setattr__(self, "phi_database_url", f"sqlite:///{data_dir / 'phi.sqlite3'}")
        if not self.object_store_url:
            object.__setattr__(self, "object_store_url", (data_dir / "objects").as_uri())
        if self.master_key_file is None:
            object.__setattr__(self, "master_key_file", data_dir / "master.key")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            msg = "PHIVAULT_TLS_CERT_FILE and PHIVAULT_TLS_KEY_FILE must be set together"
            raise ValueError(msg)
        if (self.dicom_tls_cert_file is None) != (self.dicom_tls_key_file is None):
            msg = "PHIVAULT_DICOM_TLS_CERT_FILE and PHIVAULT_DICOM_TLS_KEY_FILE must be set together"
            raise ValueError(msg)
        if (self.siem_client_cert_file is None) != (self.siem_client_key_file is None):
            msg = "PHIVAULT_SIEM_CLIENT_CERT_FILE and PHIVAULT_SIEM_CLIENT_KEY_FILE must be set together"
            raise ValueError(msg)
        return self

    @property
    def uses_generated_tls(self) -> bool:
        """True when no certificate was configured and phivault makes its own (dev only)."""
        return self.tls_cert_file is None

    @property
    def audit_origin(self) -> str:
        """The audit log's name in its checkpoints (one log per deployment region)."""
        return f"phivault/{self.region}/audit"

    @property
    def cert_path(self) -> Path:
        return self.tls_cert_file or self.data_dir / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.tls_key_file or self.data_dir / "tls" / "key.pem"

    @property
    def dicom_cert_path(self) -> Path:
        """The DICOM TLS certificate: its own, else the HTTPS one."""
        return self.dicom_tls_cert_file or self.cert_path

    @property
    def dicom_key_path(self) -> Path:
        return self.dicom_tls_key_file or self.key_path

    @property
    def master_key_path(self) -> Path:
        if self.master_key_file is None:  # _derive_paths always sets it
            msg = "master_key_file was not derived"
            raise RuntimeError(msg)
        return self.master_key_file

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        del dotenv_settings, file_secret_settings  # not supported: one documented way in
        return (init_settings, env_settings, _TomlFileSource(settings_cls))


class _TomlFileSource(PydanticBaseSettingsSource):
    """Settings from the TOML file named by ``PHIVAULT_CONFIG`` (keys without the prefix)."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        self._values = _read_toml(os.environ.get(CONFIG_ENV, ""))

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # noqa: ANN401
        del field
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def _read_toml(path_text: str) -> dict[str, Any]:
    if not path_text:
        return {}
    path = Path(path_text)
    try:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
    except OSError as exc:
        raise SettingsError(CONFIG_ENV, f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(CONFIG_ENV, f"{path} is not valid TOML: {exc}") from None
    known = set(Settings.model_fields)
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(CONFIG_ENV, f"{path} has unknown setting {unknown[0]!r}")
    return values


def load_settings(**overrides: Any) -> Settings:  # noqa: ANN401
    """Read the settings, raising ``SettingsError`` that names the first bad setting."""
    explicit = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**explicit)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        name = ENV_PREFIX + field.upper() if field else CONFIG_ENV
        reason = str(error["msg"]).removeprefix("Value error, ")
        raise SettingsError(name, reason) from None
