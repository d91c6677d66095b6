"""Policies × registered keys → CallerIR: how the sidecar names a verified caller (issue 14).

Budgets, the query feed and verdicts key on a client. A raw header is whatever the caller
writes, so a fresh value is a fresh client; the sidecar's caller filter instead names a
caller by what it verified: the registered API key's id, tenant and tier, a verified JWT
claim, or (no registered key) its source address. The filter is present whenever one of
those is read, or an AccessPolicy matches keys or JWTs, and then also drops every
``x-modelguard-*`` header a caller sent, before any other filter reads one.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.api import AccessPolicy, ClientKey, ExtractionPolicy, RatePolicy
from controlplane.compile.mesh import MeshInputs
from controlplane.ir import ApiKeyIR, CallerIR, MtlsIR
from controlplane.policies.access.ir import AccessIR
from controlplane.policies.extraction.ir import ExtractionIR

INTERNAL_PREFIX = "x-modelguard-"


def _client_keys(
    rate: Sequence[RatePolicy], extraction: Sequence[ExtractionPolicy]
) -> list[ClientKey]:
    keys = [limit.client_key for p in rate for limit in p.spec.limits]
    return keys + [p.spec.client_key for p in extraction]


def _keys(access: Sequence[AccessPolicy], mesh: MeshInputs | None) -> tuple[ApiKeyIR, ...]:
    """Every key of the Secrets the sidecar's AccessPolicies name; a digest listed twice
    keeps its first definition (Secrets in name order)."""
    refs = sorted(
        {
            (p.metadata.namespace, rule.from_.api_keys.secret_ref)
            for p in access
            for rule in p.spec.rules
            if rule.from_ is not None and rule.from_.api_keys is not None
        }
    )
    found: dict[str, ApiKeyIR] = {}
    for ref in refs:
        for key in (mesh.api_keys if mesh else {}).get(ref, ()):
            found.setdefault(
                key.digest,
                ApiKeyIR(
                    digest=key.digest,
                    id=key.id,
                    tenant=key.tenant or key.id,
                    tier=key.tier,
                    principals=tuple(sorted(key.principals)),
                ),
            )
    return tuple(found[d] for d in sorted(found))


def compile_caller(
    access_policies: Sequence[AccessPolicy],
    rate: Sequence[RatePolicy],
    extraction_policies: Sequence[ExtractionPolicy],
    mesh: MeshInputs | None,
    access: AccessIR | None,
    mtls: MtlsIR | None,
    extraction: Sequence[ExtractionIR],
) -> CallerIR | None:
    client_keys = _client_keys(rate, extraction_policies)
    claims = tuple(sorted({k.jwt_claim for k in client_keys if k.jwt_claim is not None}))
    by_key = any(k.api_key is not None for k in client_keys)
    internal_tier = any(
        e.tier_header is not None and e.tier_header.startswith(INTERNAL_PREFIX) for e in extraction
    )
    jwt = access is not None and bool(access.jwt_providers)
    keys_matched = access is not None and access.api_keys
    if not (by_key or claims or internal_tier or jwt or keys_matched):
        return None
    keys = _keys(access_policies, mesh)
    return CallerIR(
        keys=keys,
        jwt_claims=claims,
        anonymous_by_address=by_key,
        bind_jwt=jwt and bool(keys),
        bind_peer=mtls is not None and bool(keys),
    )
