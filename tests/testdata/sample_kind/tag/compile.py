"""TagPolicies → TagIR."""

from __future__ import annotations

from controlplane.policies.tag.api import TagPolicy
from controlplane.policies.tag.ir import KIND as KIND  # the key of compile_feature's result
from controlplane.policies.tag.ir import TagIR

from controlplane.compile.feature import FeatureInputs


def compile_feature(inputs: FeatureInputs) -> TagIR | None:
    headers: dict[str, str] = {}
    for policy in inputs.of_kind(TagPolicy):
        headers.update(policy.spec.headers)
    return TagIR(tuple(sorted(headers.items()))) if headers else None
