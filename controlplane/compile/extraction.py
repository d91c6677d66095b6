"""ExtractionPolicy → ExtractionIR: what the sidecar's hardening filter and query feed do.

Detection and its staged actions run in the control plane (``controlplane.extraction``),
which reads the policies itself; the sidecar only needs where the scores are, how to
harden them per tier, who the client is, and whether to feed the monitor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from controlplane.api import ExtractionPolicy
from controlplane.api.extraction import Hardening
from controlplane.compile.rate import client_key
from controlplane.ir import ExtractionIR, HardeningIR, PolicyRef, QueryFeedIR

log = logging.getLogger(__name__)

# The JSONPath subset a sidecar can follow in one pass over a body (the monitor reads the
# same subset): .name, ['name'], ["name"], [n], [*] and .*
_STEP = re.compile(
    r"\.(?P<name>[A-Za-z_][A-Za-z0-9_-]*)"
    r"|\.(?P<dotstar>\*)"
    r"|\[(?P<index>-?\d+)\]"
    r"|\[(?P<star>\*)\]"
    r"|\['(?P<quoted>[^']*)'\]"
    r'|\["(?P<dquoted>[^"]*)"\]'
)

Step = str | int | None  # a key, an index, or None for the wildcard


def parse_json_path(text: str) -> tuple[Step, ...]:
    """``$.predictions[*].probabilities`` → ``("predictions", None, "probabilities")``."""
    if not text.startswith("$"):
        raise ValueError(f"{text!r}: a JSONPath starts with '$'")
    steps: list[Step] = []
    pos = 1
    while pos < len(text):
        match = _STEP.match(text, pos)
        if match is None:
            raise ValueError(f"{text!r}: unsupported syntax at position {pos}")
        if match["index"] is not None:
            steps.append(int(match["index"]))
        elif match["star"] is not None or match["dotstar"] is not None:
            steps.append(None)
        else:
            steps.append(match["name"] or match["quoted"] or match["dquoted"] or "")
        pos = match.end()
    return tuple(steps)


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
    does not have: such a path hardens nothing, and compile says so in the log.
    """
    text = policy.spec.response.scores
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


def _ref(policy: ExtractionPolicy) -> tuple[str, str]:
    return policy.metadata.namespace, policy.metadata.name


def compile_one(policy: ExtractionPolicy) -> ExtractionIR:
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
        policy=PolicyRef(policy.kind, policy.metadata.namespace, policy.metadata.name),
        client_key=client_key(spec.client_key),
        features=spec.request.features,
        scores=score_steps(policy),
        label=spec.response.label,
        output=hardening(output) if output is not None else None,
        tier_header=output.tier_header if output is not None else None,
        tiers=tiers,
        feed=QueryFeedIR() if spec.detection is not None else None,
    )


def compile_extraction(policies: Sequence[ExtractionPolicy]) -> tuple[ExtractionIR, ...]:
    return tuple(
        compile_one(p)
        for p in sorted(policies, key=lambda p: (p.metadata.namespace, p.metadata.name))
    )
