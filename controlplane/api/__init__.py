"""The policy API (``modelguard.io/v1alpha1``): typed models, defaults and validation.

What every kind shares lives here; each kind's model is ``api.py`` of its folder
(``controlplane/policies/<kind>/``, registered in ``policies/registry.py``) and is
re-exported below. :mod:`~controlplane.api.loader` turns YAML into policies and
:class:`Violation` s, every one of them with its YAML path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from controlplane.api.base import API_VERSION, Metadata, PolicyBase
from controlplane.api.common import (
    WINDOW_SECONDS,
    ClientKey,
    Mode,
    Selector,
    TargetRef,
    Window,
    parse_duration,
)
from controlplane.api.violations import Violation

# The kinds' models live in controlplane/policies/<kind>/ and import this package's base
# modules, so they (and the loader, which reads the registry of kinds) are loaded on first
# use: an eager import here would run a kind's module before the base it needs.
if TYPE_CHECKING:
    from controlplane.api.kinds import KINDS, Policy
    from controlplane.api.loader import (
        LoadedPolicy,
        load_paths,
        parse_documents,
        policy_files,
        validate_cross,
        validate_document,
    )
    from controlplane.policies.access.api import (
        AccessPolicy,
        AccessPolicySpec,
        AccessRule,
        ApiKeys,
        From,
        JwtRule,
        To,
    )
    from controlplane.policies.egress.api import (
        ByteBudget,
        EgressPolicy,
        EgressPolicySpec,
        EgressRule,
    )
    from controlplane.policies.extraction.api import (
        ALL_DETECTORS,
        Actions,
        Detection,
        ExtractionPolicy,
        ExtractionPolicySpec,
        Hardening,
        OnDetection,
        OnSuspicion,
        OutputHardening,
        Quarantine,
        RequestFields,
        ResponseFields,
        Throttle,
    )
    from controlplane.policies.rate.api import Limit, RatePolicy, RatePolicySpec

_LAZY: dict[str, str] = {
    "KINDS": "controlplane.api.kinds",
    "Policy": "controlplane.api.kinds",
    "LoadedPolicy": "controlplane.api.loader",
    "load_paths": "controlplane.api.loader",
    "parse_documents": "controlplane.api.loader",
    "policy_files": "controlplane.api.loader",
    "validate_cross": "controlplane.api.loader",
    "validate_document": "controlplane.api.loader",
    "AccessPolicy": "controlplane.policies.access.api",
    "AccessPolicySpec": "controlplane.policies.access.api",
    "AccessRule": "controlplane.policies.access.api",
    "ApiKeys": "controlplane.policies.access.api",
    "From": "controlplane.policies.access.api",
    "JwtRule": "controlplane.policies.access.api",
    "To": "controlplane.policies.access.api",
    "ByteBudget": "controlplane.policies.egress.api",
    "EgressPolicy": "controlplane.policies.egress.api",
    "EgressPolicySpec": "controlplane.policies.egress.api",
    "EgressRule": "controlplane.policies.egress.api",
    "ALL_DETECTORS": "controlplane.policies.extraction.api",
    "Actions": "controlplane.policies.extraction.api",
    "Detection": "controlplane.policies.extraction.api",
    "ExtractionPolicy": "controlplane.policies.extraction.api",
    "ExtractionPolicySpec": "controlplane.policies.extraction.api",
    "Hardening": "controlplane.policies.extraction.api",
    "OnDetection": "controlplane.policies.extraction.api",
    "OnSuspicion": "controlplane.policies.extraction.api",
    "OutputHardening": "controlplane.policies.extraction.api",
    "Quarantine": "controlplane.policies.extraction.api",
    "RequestFields": "controlplane.policies.extraction.api",
    "ResponseFields": "controlplane.policies.extraction.api",
    "Throttle": "controlplane.policies.extraction.api",
    "Limit": "controlplane.policies.rate.api",
    "RatePolicy": "controlplane.policies.rate.api",
    "RatePolicySpec": "controlplane.policies.rate.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ALL_DETECTORS",
    "API_VERSION",
    "KINDS",
    "WINDOW_SECONDS",
    "AccessPolicy",
    "AccessPolicySpec",
    "AccessRule",
    "Actions",
    "ApiKeys",
    "ByteBudget",
    "ClientKey",
    "Detection",
    "EgressPolicy",
    "EgressPolicySpec",
    "EgressRule",
    "ExtractionPolicy",
    "ExtractionPolicySpec",
    "From",
    "Hardening",
    "JwtRule",
    "Limit",
    "LoadedPolicy",
    "Metadata",
    "Mode",
    "OnDetection",
    "OnSuspicion",
    "OutputHardening",
    "Policy",
    "PolicyBase",
    "Quarantine",
    "RatePolicy",
    "RatePolicySpec",
    "RequestFields",
    "ResponseFields",
    "Selector",
    "TargetRef",
    "Throttle",
    "To",
    "Violation",
    "Window",
    "load_paths",
    "parse_documents",
    "parse_duration",
    "policy_files",
    "validate_cross",
    "validate_document",
]
