"""Warnings: valid policies that give something away, said where they are written.

A warning never rejects a policy (an unauthenticated set-up may have no better client key
than a raw header); ``modelguard validate`` prints it and status shows it beside the
policy, in the same ``<path>: <message>`` form as violations.
"""

from __future__ import annotations

from controlplane.api.kinds import Policy
from controlplane.policies.extraction.api import ExtractionPolicy
from controlplane.policies.rate.api import RatePolicy


def policy_warnings(policy: Policy) -> list[str]:
    """Every warning of one policy, each with its field path."""
    out: list[str] = []
    if isinstance(policy, RatePolicy):
        for i, limit in enumerate(policy.spec.limits):
            out += [f"spec.limits[{i}].clientKey.{w}" for w in limit.client_key.warnings()]
    elif isinstance(policy, ExtractionPolicy):
        out += [f"spec.clientKey.{w}" for w in policy.spec.client_key.warnings()]
    return out
