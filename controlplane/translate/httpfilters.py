"""The ordered registry of translation modules: HTTP filter order is data, visible here.

Each module turns its part of the IR into HTTP filters of the inbound connection manager,
may patch the inbound resources (the listener's filter chain, the connection manager, the
route configuration, the workload's cluster), and may add resources of its own (secrets,
extension configs, outbound listeners, clusters). A new feature is one module and one line
in ``REGISTRY``.
"""

from __future__ import annotations

from controlplane.translate import caller, egress, mtls, ratelimit, rbac, router, telemetry, wasm
from controlplane.translate import verdicts as extraction_verdicts
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
    ratelimit.HEADERS, ratelimit.LOCAL,
    # Request limits, output hardening and the query feed. Before the quota filters: it
    # holds each request until its body is checked and sets a budget's instance class
    # (cost: instances) from it, so no second filter reads the body for that. What the
    # filters behind it refuse the model never sees: the Wasm filter neither feeds nor
    # hardens those answers (wasm/src/filter.c, from_model).
    wasm.MODULE,
    ratelimit.QUOTA, ratelimit.EXACT,
    # Patches the connection manager only (tracer, access log): order-free.
    telemetry.MODULE,
    router.MODULE,
    # Adds the outbound listener only (no inbound HTTP filter): order-free.
    egress.MODULE,
    # mTLS: the inbound listener's TLS, SDS secrets, the mesh listener: order-free.
    mtls.MODULE,
)
