"""The caller filter in a real Envoy (issue 14): what the sidecar tells the filters after it
about the caller, and what a caller can no longer choose.

The generated filters (translate/caller.py and the RBAC filters) run in front of a stub
model; the route echoes the identity headers the sidecar set back as response headers, so
every case checks what the model would have been told.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench.lib.load import backend_bootstrap, bootstrap, cluster, hcm, listener
from controlplane.api import parse_documents
from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.compile.mesh import MeshInputs
from controlplane.identity.apikeys import ApiKey, digest
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.policies.access import translate as rbac
from controlplane.policies.access.ir import of as access_of
from controlplane.translate import caller, internal
from controlplane.translate.render import to_dict

pytestmark = pytest.mark.envoy

ISSUER = "https://login.example.com"
SEEN = ("x-modelguard-key-id", "x-modelguard-tenant", "x-modelguard-tier", "x-modelguard-jwt-sub")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


KEY = rsa.generate_private_key(65537, 2048)


def jwks() -> str:
    numbers = KEY.public_key().public_numbers()

    def enc(n: int) -> str:
        return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    return json.dumps(
        {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "k1",
                   "n": enc(numbers.n), "e": enc(numbers.e)}]}
    )


def token(**claims: Any) -> str:
    header = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
    body = _b64(json.dumps({"iss": ISSUER, "exp": int(time.time()) + 600, **claims}).encode())
    signature = KEY.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{body}.{_b64(signature)}"


POLICIES = f"""\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: p, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  defaultAction: Deny
  rules:
  - name: keys
    action: Allow
    from: {{apiKeys: {{secretRef: demo-keys}}}}
  - name: employees
    action: Allow
    from: {{jwt: {{issuer: "{ISSUER}", jwks: {json.dumps(jwks())}}}}}
  - name: anonymous
    action: Allow
    to: {{paths: ["/anon"]}}
---
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {{name: p, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  limits:
  - {{name: per-key, clientKey: {{apiKey: {{}}}}, requests: 1000, per: second}}
  - {{name: per-user, clientKey: {{jwtClaim: sub}}, requests: 1000, per: second}}
"""

KEYS = (
    ApiKey("acme-1", digest("key-1"), "acme", "premium"),
    ApiKey("acme-2", digest("key-2"), "acme", "standard"),
    ApiKey("alice-key", digest("key-alice"), "acme", "standard", ("alice",)),
)


def _filters() -> list[dict[str, Any]]:
    loaded, violations = parse_documents(POLICIES, "test")
    assert not violations, violations
    sidecar = Sidecar(
        node_id="m-0", service="digits-model", namespace="demo",
        identity="spiffe://cluster.local/ns/demo/sa/digits-model",
        app_port=1, inbound_port=2, inbound_address="127.0.0.1",
    )
    ir = compile_sidecar(
        sidecar,
        [lp.policy for lp in loaded],
        mesh=MeshInputs(api_keys={("demo", "demo-keys"): KEYS}),
    )
    assert ir.caller is not None and access_of(ir) is not None
    assert ir.caller.anonymous_by_address and ir.caller.bind_jwt
    assert ir.caller.jwt_claims == ("sub",)
    filters = caller.MODULE.http_filters(ir) + rbac.rbac_filters(access_of(ir), ir.caller)
    return [to_dict(f) for f in filters]


@pytest.fixture(scope="module")
def sidecar() -> Iterator[tuple[int, int]]:
    """Two listeners: one believes no X-Forwarded-For hop, one believes a single hop."""
    filters = _filters()
    route = {
        "route": {"cluster": "model"},
        "response_headers_to_add": [
            {"header": {"key": f"seen-{h}", "value": f"%REQ({h})%"}} for h in SEEN
        ],
    }
    direct, behind_ingress = free_port(), free_port()
    listeners = []
    for port, hops in ((direct, 0), (behind_ingress, 1)):
        manager = hcm(filters, route)
        manager["typed_config"]["use_remote_address"] = True
        manager["typed_config"]["xff_num_trusted_hops"] = hops
        manager["typed_config"]["local_reply_config"] = to_dict(rbac.denial_reply())
        # What Caller.patch adds to the connection manager: the prefix strip.
        manager["typed_config"]["early_header_mutation_extensions"] = [
            to_dict(internal.strip_internal_headers())
        ]
        manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0].update(route)
        listeners.append(listener(port, manager))
    backend_port, backend_admin, admin = free_port(), free_port(), free_port()
    backend = EnvoyProcess(backend_bootstrap(backend_port, backend_admin), admin_port=backend_admin)
    proxy = EnvoyProcess(
        bootstrap(admin, listeners, [cluster("model", backend_port)]), admin_port=admin
    )
    try:
        backend.start().wait_ready(20)
        proxy.start().wait_ready(20)
        yield direct, behind_ingress
    finally:
        proxy.stop()
        backend.stop()


def _call(
    port: int, headers: dict[str, str], path: str = "/v1/predict"
) -> tuple[int, dict[str, str], bytes]:
    status, got, body = http_request("POST", f"http://127.0.0.1:{port}{path}", b"{}", headers)
    return status, {h: got.get(f"seen-{h}", "") for h in SEEN}, body


def test_a_verified_key_is_named_by_its_id_tenant_and_tier(sidecar: tuple[int, int]) -> None:
    status, seen, _ = _call(sidecar[0], {"x-api-key": "key-1"})
    assert status == 200
    assert seen == {
        "x-modelguard-key-id": "acme-1", "x-modelguard-tenant": "acme",
        "x-modelguard-tier": "premium", "x-modelguard-jwt-sub": "addr:127.0.0.1",
    }


def test_caller_sent_internal_headers_are_dropped_before_anything_reads_them(
    sidecar: tuple[int, int],
) -> None:
    forged = {
        "x-modelguard-key-id": "globex-1", "x-modelguard-tenant": "globex",
        "x-modelguard-tier": "internal", "x-modelguard-jwt-sub": "root",
        "X-ModelGuard-Anything": "1", "x-modelguard-api-key-class": "keys-0",
    }
    status, seen, _ = _call(sidecar[0], {"x-api-key": "key-2", **forged})
    assert status == 200
    assert seen == {
        "x-modelguard-key-id": "acme-2", "x-modelguard-tenant": "acme",
        "x-modelguard-tier": "standard", "x-modelguard-jwt-sub": "addr:127.0.0.1",
    }
    # Without any key the forged identity buys nothing either: no rule admits it.
    assert _call(sidecar[0], forged)[0] == 403


def test_a_caller_without_a_registered_key_is_its_address_never_a_shared_client(
    sidecar: tuple[int, int],
) -> None:
    direct, behind_ingress = sidecar
    for headers in ({}, {"x-api-key": "made-up"}):
        status, seen, _ = _call(direct, headers, "/anon")
        assert status == 200
        assert seen["x-modelguard-key-id"] == seen["x-modelguard-tenant"] == "addr:127.0.0.1"
        assert seen["x-modelguard-tier"] == ""
        # A jwtClaim key without a verified token: the address too, never "" for all.
        assert seen["x-modelguard-jwt-sub"] == "addr:127.0.0.1"
    # X-Forwarded-For is a caller's word unless a trusted hop wrote it.
    xff = {"x-forwarded-for": "203.0.113.7"}
    assert _call(direct, xff, "/anon")[1]["x-modelguard-key-id"] == "addr:127.0.0.1"
    assert _call(behind_ingress, xff, "/anon")[1]["x-modelguard-key-id"] == "addr:203.0.113.7"
    # Behind one trusted hop, the caller's own XFF entries (left of the ingress's) are not.
    spoofed = {"x-forwarded-for": "198.51.100.1, 203.0.113.7"}
    assert _call(behind_ingress, spoofed, "/anon")[1]["x-modelguard-key-id"] == "addr:203.0.113.7"


def test_a_key_beside_a_jwt_must_belong_to_its_subject(sidecar: tuple[int, int]) -> None:
    port = sidecar[0]
    alice = {"authorization": f"Bearer {token(sub='alice')}"}
    mallory = {"authorization": f"Bearer {token(sub='mallory')}"}
    # A JWT alone: keyed by its verified claim.
    status, seen, _ = _call(port, alice)
    assert status == 200 and seen["x-modelguard-jwt-sub"] == "alice"
    # Alice's own key beside her token: admitted, named by the key.
    status, seen, _ = _call(port, {**alice, "x-api-key": "key-alice"})
    assert status == 200
    assert (seen["x-modelguard-key-id"], seen["x-modelguard-jwt-sub"]) == ("alice-key", "alice")
    # Anyone else's key, a key bound to nobody, or a made-up key: refused, with the reason.
    for headers in (
        {**mallory, "x-api-key": "key-alice"},
        {**alice, "x-api-key": "key-1"},
        {**alice, "x-api-key": "made-up-1"},
    ):
        status, _, body = _call(port, headers)
        assert status == 403, headers
        assert json.loads(body)["reason"] == (
            f"rbac_access_denied_matched_policy[{caller.UNBOUND_RULE}]"
        )
    # A token that does not verify is not a principal: 401 from the JWT filter.
    assert _call(port, {"authorization": "Bearer not.a.token"})[0] == 401


def test_generated_script_holds_digests_and_metadata_never_keys() -> None:
    text = yaml.safe_dump(_filters())
    assert digest("key-1") in text and "acme-1" in text
    assert "key-1\"" not in text.replace("acme-1", "") and "key-alice" not in text
