"""Zero trust end to end: a model sidecar and two client sidecars, real Envoys, mTLS with
SVIDs issued by the control plane over SDS, AccessPolicy enforced by identity, API key
and JWT, Audit mode, live policy edits, rotation under traffic, and bad bootstrap tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from polling import eventually

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.identity.service import IdentityConfig
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.sidecar.bootstrap import XdsCredentials, build_bootstrap
from tests.conftest import DIGITS_REFERENCE

pytestmark = pytest.mark.envoy

MODEL_ID = "spiffe://cluster.local/ns/demo/sa/digits-model"
CHECKOUT_ID = "spiffe://cluster.local/ns/web/sa/checkout"
INTRUDER_ID = "spiffe://cluster.local/ns/web/sa/intruder"
INSTANCE = json.dumps({"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}).encode()
ISSUER = "https://login.example.com"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass
class Issuer:
    """A JWT issuer of our own: an RSA key, its JWKS, and tokens signed with it."""

    key: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()

        def enc(n: int) -> str:
            return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        key = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "k1",
               "n": enc(numbers.n), "e": enc(numbers.e)}
        return json.dumps({"keys": [key]})

    def token(self, **claims: Any) -> str:
        header = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
        body = _b64(json.dumps({"iss": ISSUER, "exp": int(time.time()) + 600, **claims}).encode())
        signature = self.key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{body}.{_b64(signature)}"


def policy(rules: str, *, mode: str = "Enforce", mtls: str = "Strict", name: str = "model") -> str:
    return f"""\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  mode: {mode}
  mtls: {{mode: {mtls}}}
  defaultAction: Deny
  rules:
{rules}"""


ALLOW_CHECKOUT = f"""\
  - name: checkout
    action: Allow
    from: {{identities: ["{CHECKOUT_ID}"]}}
    to: {{methods: [POST], paths: [/v1/predict]}}
"""

KEYS = """\
apiVersion: v1
kind: Secret
metadata: {name: partner-keys, namespace: demo}
stringData:
  partner-a: partner-a-secret-key
  partner-b: "sha256:%s"
"""


@dataclass
class Mesh:
    root: Path
    policies: Path
    plane: ControlPlane
    model: EnvoyProcess
    clients: dict[str, EnvoyProcess]
    model_port: int
    mesh_ports: dict[str, int]

    def write_policy(self, text: str, name: str = "access.yaml") -> None:
        (self.policies / name).write_text(text)

    async def via(self, client: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """POST /v1/predict from a client workload through its sidecar (mTLS to the model)."""
        status, _, body = await asyncio.to_thread(
            http_request, "POST", f"http://127.0.0.1:{self.mesh_ports[client]}/v1/predict",
            INSTANCE, {"host": "digits-model.demo", "content-type": "application/json",
                       **(headers or {})},
        )
        return status, body

    async def direct(self, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """POST /v1/predict straight to the model sidecar in plaintext (an outside caller)."""
        status, _, body = await asyncio.to_thread(
            http_request, "POST", f"http://127.0.0.1:{self.model_port}/v1/predict", INSTANCE,
            {"content-type": "application/json", **(headers or {})},
        )
        return status, body




def sidecar(node_id: str, service: str, namespace: str, app_port: int, **extra: Any) -> Sidecar:
    return Sidecar(
        node_id=node_id, service=service, namespace=namespace,
        identity=f"spiffe://cluster.local/ns/{namespace}/sa/{service}",
        app_port=app_port, inbound_port=free_port(), inbound_address="127.0.0.1", **extra,
    )


def start_envoy(tmp: Path, side: Sidecar, xds_port: int, credentials: XdsCredentials | None) -> (
    EnvoyProcess
):
    admin = free_port()
    envoy = EnvoyProcess(
        build_bootstrap(side, xds_host="127.0.0.1", xds_port=xds_port, admin_port=admin,
                        credentials=credentials),
        admin_port=admin, log_path=tmp / f"{side.node_id}.log",
    )
    return envoy.start()


async def start_mesh(tmp: Path, demo_model: tuple[str, int], lifetime: float) -> Mesh:
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "access.yaml").write_text(policy(ALLOW_CHECKOUT))
    secrets = tmp / "secrets"
    secrets.mkdir()
    identity_dir = tmp / "identity"
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(policies),), xds_port=0, admin_port=0,
            debounce_quiet=0.02, debounce_max=0.2,
            identity=IdentityConfig(
                directory=str(identity_dir), svid_lifetime=lifetime,
                api_key_paths=(str(secrets),),
            ),
        )
    )
    await plane.start()
    model = sidecar("digits-model-0", "digits-model", "demo", demo_model[1])
    envoys = {}
    mesh_ports = {}
    sides = {"model": model}
    for name in ("checkout", "intruder"):
        mesh_ports[name] = free_port()
        sides[name] = sidecar(f"{name}-0", name, "web", demo_model[1], mesh_port=mesh_ports[name])
    for name, side in sides.items():
        creds = XdsCredentials.for_sidecar(side, identity_dir)
        envoys[name] = start_envoy(tmp, side, plane.xds_port, creds)
    for envoy in envoys.values():
        await asyncio.to_thread(envoy.wait_ready, 20)
    return Mesh(tmp, policies, plane, envoys.pop("model"), envoys, model.inbound_port, mesh_ports)


@pytest.fixture
async def mesh(tmp_path: Path, demo_model: tuple[str, int]) -> AsyncIterator[Mesh]:
    m = await start_mesh(tmp_path, demo_model, lifetime=3600)
    try:
        yield m
    finally:
        for envoy in [m.model, *m.clients.values()]:
            envoy.stop()
        await m.plane.stop(grace=0)


async def _is(mesh: Mesh, client: str, code: int, headers: dict[str, str] | None = None) -> bool:
    return (await mesh.via(client, headers))[0] == code


async def test_identity_allowed_denied_and_plaintext_refused(mesh: Mesh) -> None:
    await eventually(lambda: _is(mesh, "checkout", 200))
    status, body = await mesh.via("checkout")
    assert status == 200 and "predictions" in json.loads(body)
    status, body = await mesh.via("intruder")
    assert status == 403, body
    reply = json.loads(body)
    # No Allow rule matched the intruder: the reason says so, in Envoy's words.
    assert reply["reason"] == "rbac_access_denied_matched_policy[none]", reply
    # STRICT: a plaintext caller never gets an HTTP answer.
    with pytest.raises(OSError):
        await mesh.direct()
    # The model's sidecar counted one allowed and one denied request by its allow filter.
    stats = await asyncio.to_thread(mesh.model.stats, "rbac")
    assert stats[f"http.inbound_{mesh.model_port}.rbac.allow_.denied"] == 1, stats
    assert stats[f"http.inbound_{mesh.model_port}.rbac.allow_.allowed"] >= 1, stats


async def test_api_keys_and_jwt_for_outside_callers(mesh: Mesh) -> None:
    issuer = Issuer()
    stored_digest = __import__("hashlib").sha256(b"partner-b-key").hexdigest()
    (mesh.root / "secrets" / "keys.yaml").write_text(KEYS % stored_digest)
    rules = ALLOW_CHECKOUT + f"""\
  - name: partners
    action: Allow
    from: {{apiKeys: {{secretRef: partner-keys}}}}
    to: {{methods: [POST], paths: [/v1/predict]}}
  - name: ml-users
    action: Allow
    from:
      jwt:
        issuer: {ISSUER}
        jwks: {json.dumps(issuer.jwks())}
        claims: {{groups: [ml-users]}}
"""
    # Permissive: outside callers come in plaintext with a key or a token.
    mesh.write_policy(policy(rules, mtls="Permissive"))
    await eventually(lambda: _direct_is(mesh, 200, {"x-api-key": "partner-a-secret-key"}))
    assert (await mesh.direct({"x-api-key": "partner-b-key"}))[0] == 200  # stored as a digest
    status, body = await mesh.direct({"x-api-key": "wrong-key"})
    assert status == 403 and json.loads(body)["reason"].endswith("[none]")
    assert (await mesh.direct())[0] == 403
    # A forged digest header is replaced by the digest of what was really sent.
    forged = {"x-modelguard-api-key-sha256": __import__("hashlib").sha256(
        b"partner-a-secret-key").hexdigest()}
    assert (await mesh.direct(forged))[0] == 403

    good = issuer.token(sub="alice", groups=["ml-users", "staff"])
    assert (await mesh.direct({"authorization": f"Bearer {good}"}))[0] == 200
    other = issuer.token(sub="bob", groups=["staff"])
    assert (await mesh.direct({"authorization": f"Bearer {other}"}))[0] == 403
    forged_token = Issuer().token(sub="eve", groups=["ml-users"])  # signed by another key
    assert (await mesh.direct({"authorization": f"Bearer {forged_token}"}))[0] == 401
    # Mesh callers still work over mTLS on the same port.
    assert (await mesh.via("checkout"))[0] == 200
    # No key is in the sidecar's configuration, only digests.
    dump = json.dumps(await asyncio.to_thread(mesh.model.config_dump))
    assert "partner-a-secret-key" not in dump and "partner-b-key" not in dump
    assert __import__("hashlib").sha256(b"partner-a-secret-key").hexdigest() in dump


BOUND_KEYS = f"""\
apiVersion: v1
kind: Secret
metadata:
  name: partner-keys
  namespace: demo
  annotations:
    modelguard.io/keys: |
      partner-a: {{principals: ["{CHECKOUT_ID}", alice]}}
stringData:
  partner-a: partner-a-secret-key
  partner-b: partner-b-secret-key
"""


async def test_a_key_beside_a_certificate_or_token_must_belong_to_that_principal(
    mesh: Mesh,
) -> None:
    """Issue 14: a key sent by a mesh caller (client certificate) or beside a verified JWT
    is refused unless its Secret entry lists that SPIFFE ID or subject."""
    issuer = Issuer()
    (mesh.root / "secrets" / "keys.yaml").write_text(BOUND_KEYS)
    rules = ALLOW_CHECKOUT + f"""\
  - name: partners
    action: Allow
    from: {{{{apiKeys: {{{{secretRef: partner-keys}}}}}}}}
  - name: ml-users
    action: Allow
    from: {{{{jwt: {{{{issuer: {ISSUER}, jwks: {json.dumps(issuer.jwks())}}}}}}}}}
""".replace("{{", "{").replace("}}", "}")
    mesh.write_policy(policy(rules, mtls="Permissive"))
    await eventually(lambda: _direct_is(mesh, 200, {"x-api-key": "partner-b-secret-key"}))
    unbound = "rbac_access_denied_matched_policy[api-key-not-bound-to-principal]"
    # checkout's own key over mTLS: admitted. Another key, or a made-up one: refused.
    assert (await mesh.via("checkout", {"x-api-key": "partner-a-secret-key"}))[0] == 200
    for key in ("partner-b-secret-key", "made-up"):
        status, body = await mesh.via("checkout", {"x-api-key": key})
        assert status == 403 and json.loads(body)["reason"] == unbound, body
    # The intruder (no rule for its identity) cannot borrow checkout's key either.
    status, body = await mesh.via("intruder", {"x-api-key": "partner-a-secret-key"})
    assert status == 403 and json.loads(body)["reason"] == unbound, body
    # Beside alice's token, only a key bound to alice.
    alice = {"authorization": f"Bearer {issuer.token(sub='alice')}"}
    bob = {"authorization": f"Bearer {issuer.token(sub='bob')}"}
    assert (await mesh.direct({**alice, "x-api-key": "partner-a-secret-key"}))[0] == 200
    status, body = await mesh.direct({**bob, "x-api-key": "partner-a-secret-key"})
    assert status == 403 and json.loads(body)["reason"] == unbound, body
    # A key alone, in plaintext (no principal presented): its own authority.
    assert (await mesh.direct({"x-api-key": "partner-b-secret-key"}))[0] == 200


async def _direct_is(mesh: Mesh, code: int, headers: dict[str, str] | None = None) -> bool:
    return (await mesh.direct(headers))[0] == code


async def test_policy_edits_apply_live_without_restart(mesh: Mesh) -> None:
    pid = mesh.model.pid
    await eventually(lambda: _is(mesh, "checkout", 200))
    # Add a Deny rule: Deny wins over the Allow, and the 403 names it.
    block = f"""\
  - name: block
    action: Deny
    from: {{identities: ["{CHECKOUT_ID}"]}}
"""
    mesh.write_policy(policy(ALLOW_CHECKOUT + block))
    await eventually(lambda: _is(mesh, "checkout", 403))
    status, body = await mesh.via("checkout")
    assert status == 403
    assert json.loads(body)["reason"] == "rbac_access_denied_matched_policy[demo.model.block]"
    # Flip it to Allow, for the intruder: both get through.
    flipped = block.replace("Deny", "Allow").replace(CHECKOUT_ID, INTRUDER_ID)
    mesh.write_policy(policy(ALLOW_CHECKOUT + flipped))
    await eventually(lambda: _is(mesh, "intruder", 200))
    assert (await mesh.via("checkout"))[0] == 200
    # Remove the checkout rule: default deny.
    mesh.write_policy(policy(flipped))
    await eventually(lambda: _is(mesh, "checkout", 403))
    assert (await mesh.via("intruder"))[0] == 200
    assert mesh.model.pid == pid and mesh.model.alive()


async def test_audit_mode_lets_through_and_logs_the_would_be_denial(mesh: Mesh) -> None:
    await eventually(lambda: _is(mesh, "checkout", 200))
    audit = policy(
        f"""\
  - name: block-checkout
    action: Deny
    from: {{identities: ["{CHECKOUT_ID}"]}}
""",
        mode="Audit",
        name="audit",
    ).replace("defaultAction: Deny", "defaultAction: Allow")
    mesh.write_policy(audit, "audit.yaml")

    def logged() -> bool:
        return '"audit_deny_rule":"demo.audit.block-checkout"' in mesh.model.log_text()

    async def through_and_logged() -> bool:
        return await _is(mesh, "checkout", 200) and logged()

    await eventually(through_and_logged)
    line = next(
        json.loads(text[text.index("{"):])
        for text in mesh.model.log_text().splitlines()
        if "demo.audit.block-checkout" in text
    )
    assert line["audit_deny_result"] == "denied" and line["status"] == 200
    assert line["peer"] == CHECKOUT_ID


async def test_sidecar_with_bad_token_gets_nothing(mesh: Mesh, demo_model: tuple[str, int]) -> None:
    side = sidecar("impostor-0", "checkout", "web", demo_model[1], mesh_port=free_port())
    good = XdsCredentials.for_sidecar(side, mesh.root / "identity")
    # A token issued for another node (checkout-0) cannot be replayed by this one.
    stolen = XdsCredentials.for_sidecar(
        sidecar("checkout-0", "checkout", "web", 1), mesh.root / "identity"
    )
    bad = XdsCredentials(token=stolen.token, ca_pem=good.ca_pem, server_id=good.server_id)
    envoy = start_envoy(mesh.root, side, mesh.plane.xds_port, bad)
    try:
        await eventually(lambda: envoy.stat("control_plane.rq_error") + envoy.stat(
            "cluster_manager.cds.update_failure") >= 1 or "UNAUTHENTICATED" in envoy.log_text()
            or "bootstrap token" in envoy.log_text())
        assert envoy.server_state() == "PRE_INITIALIZING"
        dump = json.dumps(await asyncio.to_thread(envoy.config_dump))
        # Only the bootstrap: no secret (no SVID, no key), no listener, no cluster from us.
        assert "modelguard.svid" not in dump and "PRIVATE KEY" not in dump
        assert "dynamic_active_secrets" not in dump and "dynamic_listeners" not in dump
        assert "inbound|" not in dump and "outbound|" not in dump
        assert mesh.plane.identity is not None
        assert mesh.plane.identity.certificate("impostor-0") is None
        assert mesh.plane.inventory.get("impostor-0") is None
    finally:
        envoy.stop()


async def test_rotation_under_traffic_fails_no_request(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    m = await start_mesh(tmp_path, demo_model, lifetime=3.0)
    try:
        await eventually(lambda: _is(m, "checkout", 200))
        assert m.plane.identity is not None
        serials: set[int] = set()
        results: list[int | str] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    status, _, _ = http_request(
                        "POST", f"http://127.0.0.1:{m.mesh_ports['checkout']}/v1/predict",
                        INSTANCE, {"host": "digits-model.demo"}, timeout=5,
                    )
                    results.append(status)
                except OSError as err:
                    results.append(repr(err))

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            deadline = time.monotonic() + 30
            updates = 0
            while time.monotonic() < deadline:
                cert = m.plane.identity.certificate("digits-model-0")
                if cert is not None:
                    serials.add(cert.serial)
                updates = m.model.stat("sds.modelguard.svid.update_success")
                client_updates = m.clients["checkout"].stat("sds.modelguard.svid.update_success")
                if len(serials) >= 4 and updates >= 4 and client_updates >= 4:
                    break
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.to_thread(worker.join, 10)
        assert len(serials) >= 4 and updates >= 4, (serials, updates)  # first + 3 rotations
        failures = [r for r in results if r != 200]
        assert results and not failures, failures[:5]
        assert m.model.stat("listener_manager.listener_modified") == 0
        assert m.model.pid is not None and m.model.alive()
    finally:
        for envoy in [m.model, *m.clients.values()]:
            envoy.stop()
        await m.plane.stop(grace=0)


IDENTITY_EXTRACTION = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: by-workload, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {identity: true}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {file: REFERENCE, labelColumn: label}
  actions:
    onDetection: {quarantine: {duration: 1h}}
""".replace("REFERENCE", str(DIGITS_REFERENCE))


async def test_an_identity_client_key_feeds_and_quarantines_by_spiffe_id(mesh: Mesh) -> None:
    """Issue 14: `clientKey: {identity: true}` end to end: the Wasm filter feeds a mesh
    caller's queries under its verified SPIFFE ID, the verdict names it, and the quarantine
    blocks that workload only."""
    import numpy as np

    from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc

    rules = """\
  - name: web
    action: Allow
    from: {namespaces: [web]}
"""
    mesh.write_policy(policy(rules))
    mesh.write_policy(IDENTITY_EXTRACTION, "extraction.yaml")
    await eventually(lambda: _is(mesh, "intruder", 200))

    def calibrated() -> bool:  # the policy's profile, from the demo's reference data
        found = mesh.plane.extraction.profiles.conditions().get("demo/by-workload")
        return found is not None and found.status == "True"

    await eventually(calibrated, timeout=180)

    async def quarantines() -> list[admin_pb2.QuarantineEntry]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.plane.admin_port}") as channel:
            listed = await admin_pb2_grpc.QuarantinesStub(channel).ListQuarantines(
                admin_pb2.ListQuarantinesRequest(), timeout=5
            )
        return [q for q in listed.entries if q.kind == "quarantine"]

    rng = np.random.default_rng(5)
    sent, found = 0, []
    while sent < 1000 and not found:
        for _ in range(10):
            row = [float(v) for v in rng.uniform(0, 16, 64)]
            body = json.dumps({"instances": [row]}).encode()
            await asyncio.to_thread(
                http_request, "POST", f"http://127.0.0.1:{mesh.mesh_ports['intruder']}/v1/predict",
                body, {"host": "digits-model.demo", "content-type": "application/json"},
            )
            sent += 1
        found = await quarantines()
    intruder = "spiffe://cluster.local/ns/web/sa/intruder"
    assert [(q.client_key, q.key_source) for q in found] == [(intruder, "identity")], sent
    await eventually(lambda: _is(mesh, "intruder", 403), timeout=15)
    assert (await mesh.via("checkout"))[0] == 200
