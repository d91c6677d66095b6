"""What a policy kind adds to its generated CRD beyond its pydantic model: its names and
the rules pydantic checks in code, as CEL (``x-kubernetes-validations``).

Each kind declares its own in ``controlplane/policies/<kind>/crd.py``; ``crdgen`` merges
them with the shared rules (``SHARED``) of the models in ``controlplane/api/common.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

Rule = dict[str, str]


@dataclass(frozen=True)
class Names:
    plural: str
    singular: str
    short: tuple[str, ...]


@dataclass(frozen=True)
class CrdExtras:
    """One kind's CRD names, CEL rules keyed by model (JSON Schema def) name, and list
    types keyed by (model, field)."""

    names: Names
    validations: dict[str, list[Rule]] = field(default_factory=dict)
    list_types: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def rule(rule: str, message: str, field_path: str | None = None) -> Rule:
    out = {"rule": rule, "message": message}
    if field_path is not None:
        out["fieldPath"] = field_path
    return out


def is_set(field: str) -> str:
    return f"has(self.{field}) && size(self.{field}) > 0"


def is_true(field: str) -> str:
    return f"(has(self.{field}) && self.{field})"


# The models every kind shares (controlplane/api/common.py).
SHARED: Final[dict[str, list[Rule]]] = {
    "TargetRef": [
        rule(
            "has(self.service) != has(self.selector)",
            "exactly one of service, selector must be set",
        )
    ],
    "ClientKey": [
        rule(
            "(has(self.apiKey) ? 1 : 0) + (has(self.header) ? 1 : 0) + ("
            + is_true("identity") + " ? 1 : 0) + "
            "(has(self.jwtClaim) ? 1 : 0) + (" + is_true("sourceIP") + " ? 1 : 0) == 1",
            "exactly one of apiKey, header, identity, jwtClaim, sourceIP must be set",
        )
    ],
}
