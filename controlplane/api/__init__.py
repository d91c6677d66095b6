"""The policy API (``modelguard.io/v1alpha1``): typed models, defaults and validation.

One module per kind; :mod:`~controlplane.api.loader` turns YAML into policies and
:class:`Violation` s, every one of them with its YAML path.
"""

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
from controlplane.api.kinds import KINDS, Policy
from controlplane.api.loader import (
    LoadedPolicy,
    load_paths,
    parse_documents,
    policy_files,
    validate_cross,
    validate_document,
)
from controlplane.api.violations import Violation
from controlplane.policies.access.api import (
    AccessPolicy,
    AccessPolicySpec,
    AccessRule,
    ApiKeys,
    From,
    JwtRule,
    To,
)
from controlplane.policies.egress.api import ByteBudget, EgressPolicy, EgressPolicySpec, EgressRule
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
