"""ExtractionPolicy → ExtractionIR: what the sidecar's hardening filter and query feed do.

Detection and its staged actions run in the control plane (``controlplane.extraction``),
which reads the policies itself; the sidecar only needs where the scores are, how to
harden them per tier, who the client is, and whether to feed the monitor (the feed ships
every answered request with its response body, so the monitor reads scores or labels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from controlplane.api.jsonpath import JsonPath, Step
from controlplane.compile.feature import FeatureInputs
from controlplane.compile.inputs.verdicts import Hardened
from controlplane.ir import PolicyRef
from controlplane.policies.extraction.api import ExtractionPolicy, Hardening
from controlplane.policies.extraction.ir import KIND as KIND  # the key of compile_feature's result
from controlplane.policies.extraction.ir import (
    ExtractionFeature,
    ExtractionIR,
    HardeningIR,
    QueryFeedIR,
)
from controlplane.policies.extraction.verdicts_compile import compile_verdicts
from controlplane.policies.rate.compile import client_key

log = logging.getLogger(__name__)


def parse_json_path(text: str) -> tuple[Step, ...]:
    """``$.predictions[*].probabilities`` → ``("predictions", None, "probabilities")``."""
    return JsonPath.parse(text).steps


def hardening(settings: Hardening) -> HardeningIR | None:
    """None when the settings change nothing (a tier may switch hardening off)."""
    ir = HardeningIR(
        top_k=settings.top_k,
        round_digits=settings.round_digits,
        label_only=settings.label_only,
        noise=settings.noise or None,
    )
    return None if ir == HardeningIR() else ir


def score_steps(policy: ExtractionPolicy) -> tuple[Step, ...] | None:
    """The scores path as steps the filter follows while it streams through a body.

    Negative indices need the array's length before its elements, which a single pass
    does not have: such a path hardens nothing, and compile says so in the log. None too
    for a policy without scores (a model that answers labels only: ``response.label``).
    """
    text = policy.spec.response.scores
    if text is None:
        return None
    try:
        steps = parse_json_path(text)
    except ValueError as err:
        log.error("%s/%s: spec.response.scores: %s", *_ref(policy), err)
        return None
    if any(isinstance(s, int) and s < 0 for s in steps):
        log.error(
            "%s/%s: spec.response.scores: %r: negative indices cannot be hardened in the "
            "sidecar; scores pass unchanged",
            *_ref(policy),
            text,
        )
        return None
    return steps


def instance_steps(policy: ExtractionPolicy) -> tuple[Step, ...] | None:
    """The features path as steps, for the sidecar to count a request's rows (kserveV2:
    the input tensors, whose rows it reads from their shape)."""
    try:
        steps = parse_json_path(policy.spec.request.features)
    except ValueError:
        return None
    return None if any(isinstance(s, int) and s < 0 for s in steps) else steps


def _ref(policy: ExtractionPolicy) -> tuple[str, str]:
    return policy.metadata.namespace, policy.metadata.name


# Clients per policy the sidecar's filter carries an override for (it scans them per request);
# beyond it, the highest estimates win and the rest keep their tier (and are logged).
MAX_OVERRIDES = 256


def _printable(key: str) -> bool:
    """Keys the filter can compare as written in its JSON configuration (it does not decode
    escapes): printable ASCII without quote or backslash, as header values and IPs are."""
    return key.isascii() and key.isprintable() and '"' not in key and "\\" not in key


def risk_overrides(
    policy: ExtractionPolicy, hardened: Sequence[Hardened]
) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    name = f"{policy.metadata.namespace}/{policy.metadata.name}"
    mine = [h for h in hardened if h.client.policy == name and h.client.key]
    usable = [h for h in mine if _printable(h.client.key)]
    if len(usable) < len(mine):
        unusable = len(mine) - len(usable)
        log.warning("%s: %d hardened client keys cannot be matched by the filter", name, unusable)
    if len(usable) > MAX_OVERRIDES:
        log.warning(
            "%s: %d hardened clients, the filter takes the %d highest estimates",
            *(name, len(usable), MAX_OVERRIDES),
        )
        usable = sorted(usable, key=lambda h: -h.fidelity)[:MAX_OVERRIDES]
    return tuple(sorted((h.client.key, h.tiers) for h in usable))


def compile_one(policy: ExtractionPolicy, hardened: Sequence[Hardened] = ()) -> ExtractionIR:
    spec = policy.spec
    output = spec.output
    tiers: tuple[tuple[str, HardeningIR], ...] = ()
    if output is not None:
        # A tier that hardens nothing is kept (as all-None settings): it must still replace
        # the default for its clients.
        tiers = tuple(
            (name, hardening(settings) or HardeningIR())
            for name, settings in sorted(output.tiers.items())
        )
    return ExtractionIR(
        policy=PolicyRef(*policy.ref),
        client_key=client_key(spec.client_key),
        features=spec.request.features,
        scores=score_steps(policy),
        label=spec.response.label,
        output=hardening(output) if output is not None else None,
        tier_header=output.tier_header if output is not None else None,
        tiers=tiers,
        # The feed ships whole every request the policy lets through: all are judged.
        feed=QueryFeedIR(max_body_bytes=max(QueryFeedIR.max_body_bytes, spec.request.max_bytes))
        if spec.detection is not None
        else None,
        max_request_bytes=spec.request.max_bytes,
        max_instances=spec.request.max_instances,
        max_depth=spec.request.max_depth,
        instances=instance_steps(policy),
        request_format=spec.request.format,
        response_format=spec.response.format,
        deny_unhardenable=spec.on_unhardenable == "Deny",
        risk_overrides=risk_overrides(policy, hardened) if output is not None else (),
    )


def compile_extraction(
    policies: Sequence[ExtractionPolicy], hardened: Sequence[Hardened] = ()
) -> tuple[ExtractionIR, ...]:
    return tuple(
        compile_one(p, hardened)
        for p in sorted(policies, key=lambda p: (p.metadata.namespace, p.metadata.name))
    )


def compile_feature(inputs: FeatureInputs) -> ExtractionFeature | None:
    policies = inputs.of_kind(ExtractionPolicy)
    hardening = compile_extraction(policies, inputs.hardened)
    verdicts = compile_verdicts(policies, inputs.verdicts)
    if not hardening and verdicts is None:
        return None
    return ExtractionFeature(hardening, verdicts)
