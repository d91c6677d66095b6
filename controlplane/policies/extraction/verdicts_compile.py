"""Extraction verdicts → VerdictsIR: the quarantines and throttles in force on one sidecar.

Verdicts are an input of compile beside policies and inventory. An enforcement applies to
the sidecars its ExtractionPolicy targets now; when that policy is deleted, so is the
enforcement's effect (it stays in the verdict store until it expires).
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.compile.inputs.verdicts import Enforcement
from controlplane.ir import PolicyRef
from controlplane.policies.extraction.api import ExtractionPolicy
from controlplane.policies.extraction.ir import ClientVerdictIR, VerdictsIR
from controlplane.policies.rate.compile import client_key

# Sources a sidecar can match a client by (API keys and JWT claims are read as the headers
# the sidecar sets itself: compile.rate.client_key).
ENFORCEABLE = ("header", "sourceIP", "identity")


def _client(policy: ExtractionPolicy, e: Enforcement) -> ClientVerdictIR | None:
    key = client_key(policy.spec.client_key)
    if key.source not in ENFORCEABLE or not e.client.key:
        return None
    if (key.source == "header") != e.client.digested:
        return None  # a header verdict carries the key's digest (``ClientRef.of``), never a key
    return ClientVerdictIR(
        policy=PolicyRef(*policy.ref),
        client_key=key,
        value=e.client.key,  # a header key's SHA-256: the sidecar matches digests
        requests=e.requests,
        window_seconds=e.per_seconds,
    )


def compile_verdicts(
    policies: Sequence[ExtractionPolicy], enforcements: Sequence[Enforcement]
) -> VerdictsIR | None:
    by_key = {f"{p.metadata.namespace}/{p.metadata.name}": p for p in policies}
    quarantined: list[ClientVerdictIR] = []
    throttled: list[ClientVerdictIR] = []
    for e in enforcements:
        policy = by_key.get(e.client.policy)
        if policy is None:
            continue
        client = _client(policy, e)
        if client is None:
            continue
        (quarantined if e.kind == "quarantine" else throttled).append(client)
    if not quarantined and not throttled:
        return None
    gone = {(c.policy, c.value) for c in quarantined}
    return VerdictsIR(
        quarantined=tuple(sorted(quarantined, key=lambda c: (str(c.policy), c.value))),
        # A quarantined client is denied before any limit: no throttle on top.
        throttled=tuple(
            sorted(
                (c for c in throttled if (c.policy, c.value) not in gone),
                key=lambda c: (str(c.policy), c.value),
            )
        ),
    )
