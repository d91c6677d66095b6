"""RatePolicy: per-client token buckets and long-window query budgets.

``Local`` limits are enforced by each sidecar alone (fast, per replica); ``Global`` limits
are shared by every replica through the quota service, which is what bounds a patient
extraction attack spread over days.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
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

    @model_validator(mode="after")
    def _burst_covers_rate(self) -> Limit:
        if self.burst is not None and self.burst < self.requests:
            raise FieldError(("burst",), f"must be at least requests ({self.requests})")
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

    kind: Literal["RatePolicy"] = "RatePolicy"
    spec: RatePolicySpec
