"""EgressPolicy: the only destinations a model workload may reach (default deny).

A compromised model server must not be able to phone home, pull tooling or exfiltrate
weights: everything not allow-listed here is refused (or, in Audit mode, logged).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, field_validator

from controlplane.api.base import FieldError, Model, PolicyBase
from controlplane.api.common import Mode, PositiveInt, TargetRef, Window

_HOST = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _host(value: str) -> str:
    if len(value) > 253 or not _HOST.fullmatch(value):
        raise ValueError(
            "must be a lowercase host name, optionally starting with '*.' "
            "(api.example.com, *.s3.example.com)"
        )
    return value


HostPattern = Annotated[
    str, AfterValidator(_host), Field(json_schema_extra={"pattern": f"^{_HOST.pattern}$"})
]
Port = Annotated[int, Field(ge=1, le=65535)]


class ByteBudget(Model):
    """Bytes the workload may send to this destination per window: bounds exfiltration.
    Not enforced yet: a policy that sets it is rejected."""

    # The shape is kept (reserved) so enforcing it later changes no schema.

    bytes: PositiveInt
    per: Window


class EgressRule(Model):
    host: HostPattern
    ports: list[Port] = Field(min_length=1)
    protocol: Literal["HTTP", "TLS"] | None = None  # how the host is matched: Host or SNI
    budget: ByteBudget | None = None

    @field_validator("budget")
    @classmethod
    def _budget_not_enforced(cls, budget: ByteBudget | None) -> ByteBudget | None:
        # Envoy counts no bytes per destination over a window without asking a service on
        # every request or connection (bandwidth_limit is a rate, not a budget), and TLS is
        # passed through. Accepting a budget and not enforcing it would mislead.
        if budget is not None:
            raise ValueError(
                "byte budgets are not enforced yet; remove `budget` (the rule itself is "
                "enforced without it)"
            )
        return budget

    @field_validator("ports")
    @classmethod
    def _unique_ports(cls, ports: list[int]) -> list[int]:
        for i, port in enumerate(ports):
            if port in ports[:i]:
                raise FieldError((i,), f"duplicate port {port}")
        return ports


class EgressPolicySpec(Model):
    target_ref: TargetRef
    mode: Mode = "Enforce"
    allow: list[EgressRule] = []


class EgressPolicy(PolicyBase):
    KIND: ClassVar[str] = "EgressPolicy"
    RULE_LIST: ClassVar[str | None] = "allow"

    kind: Literal["EgressPolicy"] = "EgressPolicy"
    spec: EgressPolicySpec
