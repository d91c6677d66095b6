"""RatePolicy: per-client token buckets and long-window query budgets.

``Local`` limits are enforced by each sidecar alone (fast, per replica); ``Global`` limits
are shared by every replica through the quota service, which is what bounds a patient
extraction attack spread over days.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import InitErrorDetails

from controlplane.api.base import DnsLabel, FieldError, Model, PolicyBase, duplicate_names
from controlplane.api.common import ClientKey, PositiveInt, TargetRef, Window


class Limit(Model):
    name: DnsLabel  # unique within the policy; names the bucket in metrics and headers
    client_key: ClientKey
    requests: PositiveInt
    per: Window
    burst: PositiveInt | None = None  # bucket size when larger than `requests`
    scope: Literal["Local", "Global"] = "Local"
    # What one request costs: 1 (``requests``), or the number of instances its body carries
    # (``instances``: ``requests`` is then a budget of instances). Only budgets (Global,
    # per hour/day/month) can charge instances: they are counted by the quota service from
    # bucket ids, which carry the request's instance class; per-request limits stay per
    # request.
    cost: Literal["requests", "instances"] = "requests"

    @field_validator("cost", mode="before")
    @classmethod
    def _cost_any_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _burst_covers_rate(self) -> Limit:
        if self.burst is not None and self.burst < self.requests:
            raise FieldError(("burst",), f"must be at least requests ({self.requests})")
        if self.cost == "instances" and (
            self.scope != "Global" or self.per not in ("hour", "day", "month")
        ):
            raise FieldError(
                ("cost",),
                "instances can be charged only by a budget (scope: Global, per: hour, day "
                "or month); per-second and per-minute limits count requests",
            )
        return self


class RatePolicySpec(Model):
    target_ref: TargetRef
    limits: list[Limit] = Field(min_length=1)
    shadow: bool = False  # count and report, never reject
    # What sidecars do while the quota service is unreachable.
    failure_mode: Literal["FailOpen", "FailClosed"] = "FailOpen"

    @classmethod
    def precheck(cls, data: dict[str, Any]) -> list[InitErrorDetails]:
        return duplicate_names(data, "limits", "name")


class RatePolicy(PolicyBase):
    KIND: ClassVar[str] = "RatePolicy"
    RULE_LIST: ClassVar[str | None] = "limits"

    kind: Literal["RatePolicy"] = "RatePolicy"
    spec: RatePolicySpec
