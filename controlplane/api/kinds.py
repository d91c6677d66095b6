"""The policy kinds by name, as the loader and the Kubernetes source read them: derived
from the registry (``controlplane/policies/registry.py``), where a kind is registered."""

from __future__ import annotations

from typing import Final, cast

from controlplane.api.crd import Names
from controlplane.policies.registry import REGISTRY, Policy

__all__ = ["KINDS", "NAMES", "RULE_LISTS", "Policy"]

KINDS: Final[dict[str, type[Policy]]] = {
    kind.name: cast("type[Policy]", kind.model) for kind in REGISTRY
}
NAMES: Final[dict[str, Names]] = {kind.name: kind.crd.names for kind in REGISTRY}
# The spec's list field of each kind that grows with a policy's size (api/limits.py).
RULE_LISTS: Final[dict[str, str | None]] = {kind.name: kind.model.RULE_LIST for kind in REGISTRY}
