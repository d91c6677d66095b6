"""ExtractionPolicy's part of one sidecar's IR: hardening and feed per policy, and the
monitor's verdicts in force (``policies_of``, ``verdicts_of`` read them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from controlplane.ir import ClientKeyIR, PolicyRef, SidecarIR

KIND: Final = "ExtractionPolicy"  # the key of this kind's feature in SidecarIR.features


@dataclass(frozen=True)
class HardeningIR:
    """How the sidecar perturbs a score vector; the model's top-1 class never changes."""

    top_k: int | None = None  # keep the k highest scores, the others become 0
    round_digits: int | None = None
    label_only: bool = False  # one-hot on the top-1 class
    noise: float | None = None  # each score moves by at most this much


@dataclass(frozen=True)
class QueryFeedIR:
    """How the sidecar ships queries to the extraction monitor: batched, off the request
    path; what it cannot ship is counted per client as unobserved."""

    max_body_bytes: int = 64 * 1024  # per request or response body; larger: unobserved
    batch_queries: int = 128  # a batch is shipped when it holds this many queries ...
    batch_bytes: int = 1024 * 1024  # ... or this many bytes ...
    flush_ms: int = 250  # ... or on this timer
    max_in_flight: int = 4  # batches per worker awaiting an answer; beyond: buffer_full
    timeout_ms: int = 5000


@dataclass(frozen=True)
class ExtractionIR:
    """One ExtractionPolicy as one sidecar applies it: output hardening and the query feed."""

    policy: PolicyRef
    client_key: ClientKeyIR
    features: str  # JSONPath of the query vectors in a request (read by the monitor)
    # Where the score vectors are in a response: keys, indices, None for the wildcard.
    # None when the path cannot be followed in the sidecar (hardening then matches nothing).
    scores: tuple[str | int | None, ...] | None
    label: str | None = None  # JSONPath of the predicted label, when the model returns one
    output: HardeningIR | None = None  # the default; None: scores pass unchanged
    tier_header: str | None = None
    tiers: tuple[tuple[str, HardeningIR], ...] = ()  # tier → settings replacing the default
    feed: QueryFeedIR | None = None  # present when the policy asks for detection
    # Clients answered with another tier (onRisk): client key → ((its tier, answered with), ...)
    risk_overrides: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    max_body_bytes: int = 512 * 1024  # larger responses cannot be hardened (counted)
    # Request limits the sidecar enforces before the model sees a request (413 / 400).
    max_request_bytes: int = 64 * 1024
    max_instances: int | None = None
    max_depth: int = 64
    # Where the rows are in a request (steps, as scores): counted for maxInstances and the
    # feed. None when the path cannot be followed in one pass (negative indices).
    instances: tuple[str | int | None, ...] | None = None
    request_format: str = "json"  # json | kserveV2 (rows from the tensors' shape)
    response_format: str = "json"
    deny_unhardenable: bool = True  # an answer too large to harden: 502, not passed


@dataclass(frozen=True)
class ClientVerdictIR:
    """One client under an extraction verdict: denied (quarantine) or slowed (throttle)."""

    policy: PolicyRef  # the ExtractionPolicy whose monitor decided
    client_key: ClientKeyIR
    value: str  # the client key's value: API key, SPIFFE ID or IP address
    requests: int = 0  # throttle only: requests per window_seconds
    window_seconds: int = 0


@dataclass(frozen=True)
class VerdictsIR:
    """Verdicts of the extraction monitor in force on this sidecar (an input of compile)."""

    quarantined: tuple[ClientVerdictIR, ...] = ()
    throttled: tuple[ClientVerdictIR, ...] = ()


@dataclass(frozen=True)
class ExtractionFeature:
    """Everything extraction enforces on one sidecar."""

    policies: tuple[ExtractionIR, ...] = ()  # one per ExtractionPolicy, sorted by name
    verdicts: VerdictsIR | None = None  # quarantines and throttles of single clients


def of(ir: SidecarIR) -> ExtractionFeature | None:
    value = ir.feature(KIND)
    return value if isinstance(value, ExtractionFeature) else None


def policies_of(ir: SidecarIR) -> tuple[ExtractionIR, ...]:
    feature = of(ir)
    return feature.policies if feature is not None else ()


def verdicts_of(ir: SidecarIR) -> VerdictsIR | None:
    feature = of(ir)
    return feature.verdicts if feature is not None else None
