"""An institution's ingest policy: de-identification options, private-tag allow-list, pixel
rules, and storage quotas; and the quota check every ingest and upload goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from phivault.accounts.errors import Forbidden
from phivault.accounts.permissions import Permission
from phivault.accounts.principal import Principal
from phivault.audit.actions import AuditAction, Outcome
from phivault.audit.service import NO_CONTEXT, RequestContext, Target, record
from phivault.clock import Clock
from phivault.config.settings import Settings
from phivault.db.engine import Database
from phivault.dicom.deid import DeidOptions, PrivateTag
from phivault.dicom.pixels import PixelRule, Region, default_rules
from phivault.exams.errors import InvalidRequest, NotFound, QuotaExceeded
from phivault.exams.models import DeviceQuota, IngestPolicy, Instance, QuarantinedInstance, QuarantineStatus

_UNLIMITED = 0


class RegionModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    x: int = Field(ge=0, le=65535)
    y: int = Field(ge=0, le=65535)
    width: int = Field(ge=1, le=65535)
    height: int = Field(ge=1, le=65535)


class PixelRuleModel(BaseModel):
    """A pixel rule as the API and the database hold it (``dicom.pixels.PixelRule``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    regions: list[RegionModel] = Field(min_length=1, max_length=32)
    manufacturer: str | None = Field(default=None, max_length=64)
    model_pattern: str = Field(default="*", min_length=1, max_length=64)
    rows: int | None = Field(default=None, ge=1, le=65535)
    columns: int | None = Field(default=None, ge=1, le=65535)
    modality: str | None = Field(default=None, pattern=r"^[A-Z0-9_]{1,16}$")

    def to_rule(self) -> PixelRule:
        return PixelRule(
            regions=tuple(Region(r.x, r.y, r.width, r.height) for r in self.regions),
            manufacturer=self.manufacturer,
            model_pattern=self.model_pattern,
            rows=self.rows,
            columns=self.columns,
            modality=self.modality,
        )


class PrivateTagModel(BaseModel):
    """An allowed private attribute: group (odd), Private Creator, element within the block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: int = Field(ge=0x0009, le=0xFFFF)
    creator: str = Field(min_length=1, max_length=64)
    element: int = Field(ge=0x00, le=0xFF)

    def to_tag(self) -> PrivateTag:
        if self.group % 2 == 0:
            raise InvalidRequest("invalid_private_tag", "a private tag has an odd group number")
        return PrivateTag(self.group, self.creator, self.element)


class PolicyModel(BaseModel):
    """``GET``/``PUT /api/v1/ingest/policy``: what an institution admin configures."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "retain_modified_dates": True,
                    "retain_device_identity": False,
                    "retain_patient_characteristics": False,
                    "clean_descriptors": False,
                    "private_allow_list": [{"group": 9, "creator": "ACME 1.0", "element": 16}],
                    "pixel_rules": [
                        {
                            "manufacturer": "Acme Sonics",
                            "model_pattern": "Sono*",
                            "regions": [{"x": 0, "y": 0, "width": 640, "height": 48}],
                        }
                    ],
                    "institution_quota_bytes": None,
                    "device_quota_bytes": 2147483648,
                }
            ]
        },
    )

    retain_modified_dates: bool = False
    retain_device_identity: bool = False
    retain_patient_characteristics: bool = False
    clean_descriptors: bool = False
    private_allow_list: list[PrivateTagModel] = Field(default_factory=list, max_length=256)
    pixel_rules: list[PixelRuleModel] = Field(default_factory=list, max_length=256)
    institution_quota_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Storage for the whole institution; null: the deployment default, 0: none.",
    )
    device_quota_bytes: int | None = Field(
        default=None, ge=0, description="Default per device; null: the deployment default, 0: none."
    )


@dataclass(frozen=True, slots=True)
class Policy:
    """What an ingest applies for one institution."""

    options: DeidOptions
    rules: tuple[PixelRule, ...]  # the institution's first, then the default rules
    institution_quota: int  # bytes; 0 = unlimited
    device_quota: int


def policy_model(row: IngestPolicy | None) -> PolicyModel:
    if row is None:
        return PolicyModel()
    return PolicyModel(
        retain_modified_dates=row.retain_modified_dates,
        retain_device_identity=row.retain_device_identity,
        retain_patient_characteristics=row.retain_patient_characteristics,
        clean_descriptors=row.clean_descriptors,
        private_allow_list=[PrivateTagModel.model_validate(item) for item in row.private_allow_list],
        pixel_rules=[PixelRuleModel.model_validate(item) for item in row.pixel_rules],
        institution_quota_bytes=row.institution_quota_bytes,
        device_quota_bytes=row.device_quota_bytes,
    )


def parse_rule(data: dict[str, Any]) -> PixelRule:
    """A pixel rule from its JSON form, or ``InvalidRequest``."""
    try:
        return PixelRuleModel.model_validate(data).to_rule()
    except ValidationError as exc:
        raise InvalidRequest(
            "invalid_pixel_rule", f"invalid pixel rule: {exc.error_count()} error(s)"
        ) from None


class Policies:
    def __init__(self, settings: Settings, db: Database, clock: Clock) -> None:
        self._settings = settings
        self._db = db
        self._clock = clock

    # -- what institution admins configure -------------------------------------------------

    def get(self, principal: Principal) -> PolicyModel:
        institution_id = _configurable(principal, Permission.INSTITUTION_CONFIGURE)
        with self._db.transaction() as session:
            return policy_model(session.get(IngestPolicy, institution_id))

    def update(
        self, principal: Principal, model: PolicyModel, *, context: RequestContext = NO_CONTEXT
    ) -> PolicyModel:
        institution_id = _configurable(principal, Permission.INSTITUTION_CONFIGURE)
        for tag in model.private_allow_list:
            tag.to_tag()  # odd groups only
        now = self._clock.now()
        with self._db.transaction() as session:
            row = session.get(IngestPolicy, institution_id, with_for_update=True)
            if row is None:
                row = IngestPolicy(institution_id=institution_id, updated_at=now)
                session.add(row)
            row.retain_modified_dates = model.retain_modified_dates
            row.retain_device_identity = model.retain_device_identity
            row.retain_patient_characteristics = model.retain_patient_characteristics
            row.clean_descriptors = model.clean_descriptors
            row.private_allow_list = [tag.model_dump() for tag in model.private_allow_list]
            row.pixel_rules = [rule.model_dump() for rule in model.pixel_rules]
            row.institution_quota_bytes = model.institution_quota_bytes
            row.device_quota_bytes = model.device_quota_bytes
            row.updated_at = now
            record(
                session,
                AuditAction.INGEST_POLICY_UPDATE,
                principal,
                Target("institution", institution_id),
                Outcome.SUCCESS,
                now=now,
                context=context,
            )
            return policy_model(row)

    def set_device_quota(
        self,
        principal: Principal,
        device_id: str,
        quota_bytes: int | None,
        *,
        context: RequestContext = NO_CONTEXT,
    ) -> None:
        """Give one device of the admin's institution its own quota (None: the default again)."""
        institution_id = _configurable(principal, Permission.DEVICE_MANAGE)
        now = self._clock.now()
        with self._db.transaction() as session:
            row = session.get(DeviceQuota, device_id, with_for_update=True)
            if row is not None and row.institution_id != institution_id:
                raise NotFound
            if quota_bytes is None:
                if row is not None:
                    session.delete(row)
            elif row is None:
                session.add(
                    DeviceQuota(
                        device_id=device_id,
                        institution_id=institution_id,
                        quota_bytes=quota_bytes,
                        updated_at=now,
                    )
                )
            else:
                row.quota_bytes = quota_bytes
                row.updated_at = now
            record(
                session,
                AuditAction.INGEST_POLICY_UPDATE,
                principal,
                Target("device", device_id),
                Outcome.SUCCESS,
                now=now,
                context=context,
            )

    # -- what the pipeline applies ----------------------------------------------------------

    def load(self, session: Session, institution_id: str) -> Policy:
        model = policy_model(session.get(IngestPolicy, institution_id))
        defaults = (
            default_rules(self._settings.dicom_us_banner_rows) if self._settings.dicom_us_banner_rows else ()
        )
        return Policy(
            options=DeidOptions(
                retain_modified_dates=model.retain_modified_dates,
                retain_device_identity=model.retain_device_identity,
                retain_patient_characteristics=model.retain_patient_characteristics,
                clean_descriptors=model.clean_descriptors,
                private_allow_list=frozenset(tag.to_tag() for tag in model.private_allow_list),
            ),
            rules=tuple(rule.to_rule() for rule in model.pixel_rules) + defaults,
            institution_quota=_or_default(
                model.institution_quota_bytes, self._settings.ingest_institution_quota_bytes
            ),
            device_quota=_or_default(model.device_quota_bytes, self._settings.ingest_device_quota_bytes),
        )

    def check_quota(
        self, session: Session, institution_id: str, device_id: str | None, incoming: int
    ) -> None:
        """Raise ``QuotaExceeded`` if storing ``incoming`` more bytes would pass a quota.

        Usage counts stored instances and instances waiting in quarantine, as received.
        """
        policy = self.load(session, institution_id)
        if device_id is not None:
            override = session.get(DeviceQuota, device_id)
            limit = override.quota_bytes if override is not None else policy.device_quota
            if limit != _UNLIMITED:
                used = _usage(
                    session, Instance.device_id == device_id, QuarantinedInstance.device_id == device_id
                )
                if used + incoming > limit:
                    raise QuotaExceeded("device", limit, used, incoming)
        if policy.institution_quota != _UNLIMITED:
            used = _usage(
                session,
                Instance.institution_id == institution_id,
                QuarantinedInstance.institution_id == institution_id,
            )
            if used + incoming > policy.institution_quota:
                raise QuotaExceeded("institution", policy.institution_quota, used, incoming)


def _configurable(principal: Principal, permission: Permission) -> str:
    if not principal.has(permission):
        raise Forbidden
    if principal.institution_id is None:
        raise NotFound
    return principal.institution_id


def _or_default(value: int | None, default: int) -> int:
    return default if value is None else value


def _usage(session: Session, instance_filter: Any, quarantine_filter: Any) -> int:  # noqa: ANN401  # SQL expressions
    stored = session.scalar(select(func.coalesce(func.sum(Instance.received_size), 0)).where(instance_filter))
    waiting = session.scalar(
        select(func.coalesce(func.sum(QuarantinedInstance.received_size), 0)).where(
            quarantine_filter, QuarantinedInstance.status == QuarantineStatus.PENDING.value
        )
    )
    return int(stored or 0) + int(waiting or 0)
