"""The ordered registry of translation modules: HTTP filter order is data, visible here.

Each module turns its part of the IR into HTTP filters of the inbound connection manager,
may patch the inbound resources (the listener's filter chain, the connection manager, the
route configuration, the workload's cluster), and may add resources of its own (secrets,
extension configs, outbound listeners, clusters). A new feature is one module and one line
in ``REGISTRY``.
"""

from __future__ import annotations

from controlplane.policies.access import mtls_translate as mtls
from controlplane.policies.access import translate as rbac
from controlplane.policies.egress import translate as egress
from controlplane.policies.extraction import translate as wasm
from controlplane.policies.extraction import verdicts_translate as extraction_verdicts
from controlplane.policies.rate import translate as ratelimit
from controlplane.translate import caller, router, telemetry
from controlplane.translate.module import Inbound, Module

__all__ = ["REGISTRY", "Inbound", "Module"]

# Access control first (a denied request costs nothing further), the router last.
REGISTRY: tuple[Module, ...] = (
    # Who the caller is: caller-sent x-modelguard-* headers dropped, the verified key id,
    # tenant and tier (or source address) set, before anything reads them (issue 14).
    caller.MODULE,
    # Quarantined and throttled clients (extraction verdicts) before anything else: they
    # may key on the verified key id the caller filter just set.
    extraction_verdicts.MODULE,
    rbac.MODULE,
    # Rate limits: header renaming first (responses cross it last), then the free local
    # buckets, the locally enforced quota assignments, and the per-request service last.
    ratelimit.HEADERS, ratelimit.LOCAL, ratelimit.QUOTA, ratelimit.EXACT,
    # Output hardening and the query feed: only requests that were let through reach the
    # model, so only those are hardened and fed.
    wasm.MODULE,
    # Patches the connection manager only (tracer, access log): order-free.
    telemetry.MODULE,
    router.MODULE,
    # Adds the outbound listener only (no inbound HTTP filter): order-free.
    egress.MODULE,
    # mTLS: the inbound listener's TLS, SDS secrets, the mesh listener: order-free.
    mtls.MODULE,
)
