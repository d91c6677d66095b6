"""The identity box without Envoy: CA, SVIDs, rotation, bootstrap tokens, TokenReview, API keys."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.identity import apikeys
from controlplane.identity.ca import CAError, CertificateAuthority
from controlplane.identity.kubernetes import AuthenticationPending, KubernetesTokenAuthenticator
from controlplane.identity.service import IdentityConfig, IdentityService
from controlplane.identity.tokens import (
    TOKEN_METADATA,
    AuthenticationError,
    BootstrapTokens,
    Caller,
)

ID = "spiffe://cluster.local/ns/ml/sa/fraud-model"
SIDECAR = Sidecar(
    node_id="fraud-model-0", service="fraud-model", namespace="ml", identity=ID,
    app_port=8080, inbound_port=15006,
)


def test_svid_has_exactly_the_spiffe_uri_san_and_chains_to_the_root(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    svid = ca.issue(ID, dt.timedelta(seconds=30))
    cert = x509.load_pem_x509_certificate(svid.certificate_pem.encode())
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=30)
    # openssl agrees that the root vouches for it.
    (tmp_path / "ca.pem").write_text(ca.root_pem)
    (tmp_path / "leaf.pem").write_text(svid.certificate_pem)
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ca_is_persisted_and_reloaded(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert oct(os.stat(tmp_path / "ca.key").st_mode & 0o777) == "0o600"
    again = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert again.root_pem == first.root_pem


def test_bring_your_own_ca_is_checked(tmp_path: Path) -> None:
    mine = CertificateAuthority.load_or_create(tmp_path / "mine", "example.org")
    loaded = CertificateAuthority.load(tmp_path / "mine" / "ca.crt", tmp_path / "mine" / "ca.key")
    assert loaded.root_pem == mine.root_pem
    other = CertificateAuthority.load_or_create(tmp_path / "other", "example.org")
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority.load(tmp_path / "mine" / "ca.crt", tmp_path / "other" / "ca.key")
    leaf = other.issue(ID, dt.timedelta(hours=1))
    (tmp_path / "leaf.crt").write_text(leaf.certificate_pem)
    (tmp_path / "leaf.key").write_text(leaf.private_key_pem)
    with pytest.raises(CAError, match=r"leaf\.crt: not a CA certificate"):
        CertificateAuthority.load(tmp_path / "leaf.crt", tmp_path / "leaf.key")
    with pytest.raises(CAError, match=r"missing\.crt"):
        CertificateAuthority.load(tmp_path / "missing.crt", tmp_path / "leaf.key")


def test_bootstrap_token_is_bound_to_node_and_identity(tmp_path: Path) -> None:
    tokens = BootstrapTokens.load_or_create(tmp_path)
    token = tokens.issue(SIDECAR.node_id, ID)
    tokens.authenticate(SIDECAR, {TOKEN_METADATA: token})
    assert BootstrapTokens.load_or_create(tmp_path).verify(token, SIDECAR.node_id, ID)
    other_node = Sidecar(**{**SIDECAR.__dict__, "node_id": "fraud-model-1"})
    other_id = Sidecar(**{**SIDECAR.__dict__, "identity": "spiffe://cluster.local/ns/ml/sa/x"})
    for sidecar, metadata in [
        (other_node, {TOKEN_METADATA: token}),
        (other_id, {TOKEN_METADATA: token}),
        (SIDECAR, {}),
        (SIDECAR, {TOKEN_METADATA: "mgt1.garbage"}),
    ]:
        with pytest.raises(AuthenticationError) as err:
            tokens.authenticate(sidecar, metadata)
        assert token not in str(err.value)


def test_rotation_replaces_certificates_at_half_their_lifetime(tmp_path: Path) -> None:
    service = IdentityService(IdentityConfig(directory=str(tmp_path), svid_lifetime=100))
    service.ensure(SIDECAR)
    first = service.certificate(SIDECAR.node_id)
    assert first is not None
    assert service.rotate_due(first.not_after - dt.timedelta(seconds=51)) == 0
    assert service.rotate_due(first.not_after - dt.timedelta(seconds=49)) == 1
    second = service.certificate(SIDECAR.node_id)
    assert second is not None and second.serial != first.serial
    inputs = service.mesh_inputs((SIDECAR,))
    assert inputs.certificates[SIDECAR.node_id].certificate_pem == second.certificate_pem
    assert [s.host for s in inputs.services] == ["fraud-model.ml"]
    service.forget(SIDECAR.node_id)
    assert service.certificate(SIDECAR.node_id) is None


def test_identity_outside_the_trust_domain_is_refused(tmp_path: Path) -> None:
    service = IdentityService(IdentityConfig(directory=str(tmp_path)))
    stranger = Sidecar(**{**SIDECAR.__dict__, "identity": "spiffe://evil.example/ns/ml/sa/x"})
    token = service.tokens.issue(stranger.node_id, stranger.identity)
    with pytest.raises(AuthenticationError, match="outside trust domain"):
        service.authenticate(stranger, {TOKEN_METADATA: token})


class FakeTokenReviews:
    """The TokenReview API as the API server answers it (what kmock would serve)."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status, self.calls = status, 0

    def create_token_review(self, body: Any, **_: Any) -> Any:
        self.calls += 1
        assert body.spec.audiences == ["modelguard"]
        user = SimpleNamespace(**self.status.get("user", {})) if "user" in self.status else None
        return SimpleNamespace(status=SimpleNamespace(**{**self.status, "user": user}))


def _k8s(status: dict[str, Any]) -> tuple[KubernetesTokenAuthenticator, FakeTokenReviews]:
    api = FakeTokenReviews(status)
    return KubernetesTokenAuthenticator(api), api


def test_kubernetes_token_must_be_the_claimed_service_account() -> None:
    good = {
        "authenticated": True, "audiences": ["modelguard"], "error": None,
        "user": {"username": "system:serviceaccount:ml:fraud-model",
                 "extra": {"authentication.kubernetes.io/pod-name": ["fraud-model-0"]}},
    }
    auth, api = _k8s(good)
    auth.authenticate(SIDECAR, {"authorization": "Bearer t0ken"})
    auth.authenticate(SIDECAR, {"authorization": "Bearer t0ken"})
    assert api.calls == 1  # cached by the token's hash
    with pytest.raises(AuthenticationError, match="no service-account token"):
        auth.authenticate(SIDECAR, {})
    other = {**good, "user": {"username": "system:serviceaccount:web:checkout", "extra": {}}}
    with pytest.raises(AuthenticationError, match="service account web/checkout"):
        _k8s(other)[0].authenticate(SIDECAR, {"authorization": "Bearer x"})
    with pytest.raises(AuthenticationError, match="rejected: token expired"):
        _k8s({"authenticated": False, "audiences": [], "error": "token expired"})[0].authenticate(
            SIDECAR, {"authorization": "Bearer x"}
        )
    pod = {**good, "user": {**good["user"],
                            "extra": {"authentication.kubernetes.io/pod-name": ["other-pod"]}}}
    with pytest.raises(AuthenticationError, match=r"bound to pod ml/other-pod"):
        _k8s(pod)[0].authenticate(SIDECAR, {"authorization": "Bearer x"})


def test_in_the_control_plane_a_review_never_blocks_and_failures_are_cached() -> None:
    """background=True: the first attempt is refused as pending while a thread asks the API
    server; the sidecar's retry finds the answer. A refusal is remembered for a while."""
    good = {
        "authenticated": True, "audiences": ["modelguard"], "error": None,
        "user": {"username": "system:serviceaccount:ml:fraud-model", "extra": {}},
    }
    api = FakeTokenReviews(good)
    auth = KubernetesTokenAuthenticator(api, background=True)
    try:
        with pytest.raises(AuthenticationPending):
            auth.authenticate(SIDECAR, {"authorization": "Bearer t0ken"})
        deadline = time.monotonic() + 5
        while True:
            try:
                auth.authenticate(SIDECAR, {"authorization": "Bearer t0ken"})
                break
            except AuthenticationPending:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert api.calls == 1
        api.status = {"authenticated": False, "audiences": [], "error": "token expired"}
        while True:
            with pytest.raises(AuthenticationError) as err:
                auth.authenticate(SIDECAR, {"authorization": "Bearer old"})
            if not isinstance(err.value, AuthenticationPending):
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(3):
            with pytest.raises(AuthenticationError, match="token expired"):
                auth.authenticate(SIDECAR, {"authorization": "Bearer old"})
        assert api.calls == 2  # the refusal was cached, not asked again
    finally:
        auth.close()


def test_api_keys_are_loaded_as_digests_and_problems_name_the_file(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"b-key").hexdigest()
    (tmp_path / "keys.yaml").write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: partner-keys, namespace: ml}\n"
        f"stringData: {{a: a-key, b: 'sha256:{digest}', c: ''}}\n"
        "data: {d: ZC1rZXk=}\n"
    )
    (tmp_path / "broken.yaml").write_text("kind: [Secret\n")
    keys, problems = apikeys.load([tmp_path])
    # The format before tenants still loads: each key is its own tenant, with no tier.
    assert [(k.id, k.digest, k.tenant, k.tier) for k in keys[("ml", "partner-keys")]] == [
        ("a", hashlib.sha256(b"a-key").hexdigest(), "a", ""),
        ("b", digest, "b", ""),
        ("d", hashlib.sha256(b"d-key").hexdigest(), "d", ""),
    ]
    assert len(problems) == 2
    assert any("broken.yaml" in p for p in problems)
    assert any("keys.yaml[0] Secret ml/partner-keys: stringData.c" in p for p in problems)
    assert not any("a-key" in p for p in problems)


def test_bootstrap_token_names_its_sidecar_for_calls_without_a_node(tmp_path: Path) -> None:
    tokens = BootstrapTokens.load_or_create(tmp_path)
    token = tokens.issue(SIDECAR.node_id, ID)
    for metadata in ({"authorization": f"Bearer {token}"}, {TOKEN_METADATA: token}):
        caller = tokens.identify(metadata)
        assert caller == Caller(
            identity=ID, node_ids=frozenset({SIDECAR.node_id}),
            workload=(SIDECAR.service, SIDECAR.namespace),
        )
        assert caller.is_node(SIDECAR.node_id) and not caller.is_node("other-0")
        tokens.authenticate(SIDECAR, metadata)  # ADS: both header forms
    version, node, spiffe, service, namespace, mac = token.split(".")
    spiffe = ".".join([spiffe, service, namespace])
    forged = {
        "other node, same MAC": ".".join([version, "b3RoZXItMA", spiffe, mac]),
        "non-ASCII MAC": f"{version}.{node}.{spiffe}.\u00e9{mac[1:]}",
        "bad base64": f"{version}.!!.{spiffe}.{mac}",
        "three parts": f"{version}.{node}.{mac}",
    }
    for case, value in forged.items():
        with pytest.raises(AuthenticationError, match="not valid"):
            tokens.identify({"authorization": f"Bearer {value}"})
        assert not tokens.verify(value, SIDECAR.node_id, ID), case
    # A token from before (mgt1) still opens ADS, which names the node, but no other call.
    legacy = "mgt1." + tokens._mac("mgt1", SIDECAR.node_id, ID)
    tokens.authenticate(SIDECAR, {TOKEN_METADATA: legacy})
    with pytest.raises(AuthenticationError, match="re-run modelguard bootstrap"):
        tokens.identify({TOKEN_METADATA: legacy})


def test_kubernetes_token_identifies_its_pod() -> None:
    status = {
        "authenticated": True, "audiences": ["modelguard"], "error": None,
        "user": {"username": "system:serviceaccount:ml:fraud-model",
                 "extra": {"authentication.kubernetes.io/pod-name": ["fraud-model-0"]}},
    }
    auth, api = _k8s(status)
    caller = auth.identify({"authorization": "Bearer t0ken"})
    assert caller.identity == ID
    assert caller.is_node("fraud-model-0.ml") and not caller.is_node("other-0.ml")
    unbound = {**status, "user": {"username": "system:serviceaccount:ml:fraud-model", "extra": {}}}
    assert _k8s(unbound)[0].identify({"authorization": "Bearer t0ken"}).node_ids is None
    with pytest.raises(AuthenticationError, match="not a service-account token"):
        auth.identify({"authorization": "Bearer mgt2.a.b.c"})
    assert api.calls == 1  # a bootstrap token is never sent for review


def test_api_keys_carry_tenant_tier_and_principals_from_annotations(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text(
        "apiVersion: v1\nkind: Secret\n"
        "metadata:\n  name: demo-keys\n  namespace: demo\n"
        "  annotations:\n"
        "    modelguard.io/tenant: acme\n"
        "    modelguard.io/tier: standard\n"
        "    modelguard.io/keys: |\n"
        "      acme-premium: {tier: premium}\n"
        "      globex-1: {tenant: globex, principals: [spiffe://cluster.local/ns/a/sa/b]}\n"
        "      bad: {tenant: 'no spaces'}\n"
        "      ghost: {tier: premium}\n"
        "stringData: {acme-standard: k1, acme-premium: k2, globex-1: k3, bad: k4}\n"
    )
    keys, problems = apikeys.load([tmp_path])
    got = {k.id: (k.tenant, k.tier, k.principals) for k in keys[("demo", "demo-keys")]}
    assert got == {
        "acme-standard": ("acme", "standard", ()),
        "acme-premium": ("acme", "premium", ()),
        "globex-1": ("globex", "standard", ("spiffe://cluster.local/ns/a/sa/b",)),
        # A bad entry is reported and the key keeps the Secret's defaults.
        "bad": ("acme", "standard", ()),
    }
    assert all(k.digest != "k1" and len(k.digest) == 64 for k in keys[("demo", "demo-keys")])
    assert sorted(p.split(": ", 1)[1] for p in problems) == [
        "metadata.annotations.modelguard.io/keys.bad.tenant: must match [-._a-zA-Z0-9]{1,253}",
        "metadata.annotations.modelguard.io/keys.ghost: no such key",
    ]
