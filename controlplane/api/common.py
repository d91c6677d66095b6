"""Building blocks several policy kinds share: targets, client keys, windows, durations."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from controlplane.api.base import DnsLabel, Model, exactly_one

Mode = Literal["Enforce", "Audit"]
"""Enforce, or Audit: evaluate and log the verdict, but let the request through."""

Window = Literal["second", "minute", "hour", "day", "month"]

WINDOW_SECONDS: dict[str, int] = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 30 * 86400,  # budgets are rolling windows, not calendar months
}

PositiveInt = Annotated[int, Field(gt=0)]


class Selector(Model):
    match_labels: dict[str, str] = {}


class TargetRef(Model):
    """The workloads a policy applies to, in the policy's namespace: one Service by name,
    or every workload whose labels match."""

    service: DnsLabel | None = None
    selector: Selector | None = None

    @model_validator(mode="after")
    def _one_target(self) -> TargetRef:
        exactly_one({"service": self.service, "selector": self.selector})
        return self


# RFC 9110 token characters.
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_name(value: str) -> str:
    if not _HEADER.fullmatch(value):
        raise ValueError("must be an HTTP header name")
    # Envoy matches lowercased header names; accept what users write, store what it needs.
    return value.lower()


HeaderName = Annotated[str, AfterValidator(_header_name)]


# The verified caller identity the sidecar sets (issue 14; controlplane/translate/apikey.py
# sets them after dropping every x-modelguard-* header a caller sent).
KEY_ID_HEADER = "x-modelguard-key-id"
TENANT_HEADER = "x-modelguard-tenant"
TIER_HEADER = "x-modelguard-tier"
CLAIM_HEADER_PREFIX = "x-modelguard-jwt-"


def claim_header(claim: str) -> str:
    """The header the sidecar copies a verified JWT claim into (one per claim read)."""
    return CLAIM_HEADER_PREFIX + re.sub(r"[^a-z0-9-]", "-", claim.lower())


class ApiKeyClient(Model):
    """Clients named by their verified, registered API key (never by the raw header)."""

    # key: each key is a client. tenant: all keys of one tenant are one client (a cohort:
    # one budget, one detector state, one quarantine), so more keys buy an attacker nothing.
    group_by: Literal["key", "tenant"] = "key"


class ClientKey(Model):
    """What identifies one client for budgets and detection. Exactly one is set."""

    api_key: ApiKeyClient | None = None
    header: HeaderName | None = None
    identity: bool = False  # the caller's SPIFFE ID (mTLS)
    jwt_claim: str | None = Field(default=None, min_length=1)
    source_ip: bool = Field(default=False, alias="sourceIP")

    @model_validator(mode="after")
    def _one_key(self) -> ClientKey:
        exactly_one(
            {
                "apiKey": self.api_key,
                "header": self.header,
                "identity": self.identity,
                "jwtClaim": self.jwt_claim,
                "sourceIP": self.source_ip,
            }
        )
        return self

    @property
    def source(self) -> Literal["apiKey", "header", "identity", "jwtClaim", "sourceIP"]:
        """Which of the five sources this key reads (its YAML field name)."""
        if self.api_key is not None:
            return "apiKey"
        if self.header is not None:
            return "header"
        if self.identity:
            return "identity"
        if self.jwt_claim is not None:
            return "jwtClaim"
        return "sourceIP"

    @property
    def read_as(self) -> tuple[Literal["header", "identity", "sourceIP"], str]:
        """Where a sidecar reads this key: a verified key and a JWT claim are headers the
        sidecar sets itself (after dropping any the caller sent), so budgets, the query feed
        and verdicts see a key id, tenant or claim value and never a secret."""
        if self.api_key is not None:
            return "header", TENANT_HEADER if self.api_key.group_by == "tenant" else KEY_ID_HEADER
        if self.jwt_claim is not None:
            return "header", claim_header(self.jwt_claim)
        if self.header is not None:
            return "header", self.header
        return ("identity", "") if self.identity else ("sourceIP", "")

    def warnings(self) -> list[str]:
        """What this key gives away (a warning: unauthenticated set-ups may need it)."""
        if self.header is None:
            return []
        if self.header.startswith("x-modelguard-"):
            return [
                f"header {self.header}: the sidecar sets x-modelguard-* headers itself; "
                "use apiKey: {} (key id) or apiKey: {groupBy: tenant}"
            ]
        return [
            f"header {self.header}: any caller picks its own value, so a new value is a new "
            "client with a fresh budget, detector state and no quarantine; use apiKey, "
            "jwtClaim or identity when callers authenticate"
        ]


_DURATION_PART = re.compile(r"(\d+)([smhd])")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> int:
    """Seconds in a duration like ``30s``, ``15m``, ``24h``, ``7d`` or ``1h30m``."""
    if not _DURATION.fullmatch(value):
        raise ValueError("must be a duration such as 30s, 15m, 24h or 7d")
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(value))
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


def _duration(value: str) -> str:
    parse_duration(value)
    return value


def _bare_number(value: object) -> object:
    # YAML reads `duration: 90` as an int; "must be a string" would not say what to write.
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(
            f"must be a duration with a unit, e.g. {int(value)}s (a bare number has none)"
        )
    return value


Duration = Annotated[
    str,
    BeforeValidator(_bare_number),
    AfterValidator(_duration),
    Field(json_schema_extra={"pattern": f"^{_DURATION.pattern}$"}),
]
