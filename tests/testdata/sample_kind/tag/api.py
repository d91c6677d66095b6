"""TagPolicy: response headers the sidecar adds to its workload's answers (a sample kind)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from controlplane.api.base import FieldError, Model, PolicyBase
from controlplane.api.common import TargetRef


class TagPolicySpec(Model):
    target_ref: TargetRef
    headers: dict[str, str] = Field(min_length=1)

    @field_validator("headers")
    @classmethod
    def _prefixed(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not name.startswith("x-"):
                raise FieldError((name,), "header names must start with x-")
        return headers


class TagPolicy(PolicyBase):
    """Response headers the sidecar adds to its workload's answers."""

    KIND: ClassVar[str] = "TagPolicy"

    kind: Literal["TagPolicy"] = "TagPolicy"
    spec: TagPolicySpec
