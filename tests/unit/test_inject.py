"""Sidecar injection: `modelguard inject` goldens, idempotence, the injected bootstrap
through `envoy --mode validate`, and the admission webhook over HTTPS.

Goldens: tests/testdata/inject/<case>/in.yaml → out.yaml; regenerate with
``UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_inject.py``.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import os
import socket
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.app import cli
from controlplane.local.envoy import validate_config
from controlplane.sidecar import inject
from controlplane.sidecar import webhook as webhook_module
from controlplane.sidecar.inject import InjectConfig, InjectionError, inject_yaml

CASES_DIR = Path(__file__).resolve().parents[1] / "testdata" / "inject"
CASES = sorted(p.name for p in CASES_DIR.iterdir() if (p / "in.yaml").is_file())
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
CONFIG = InjectConfig()


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    out = inject_yaml((CASES_DIR / case / "in.yaml").read_text(), CONFIG)
    golden = CASES_DIR / case / "out.yaml"
    if UPDATE:
        golden.write_text(out)
    assert golden.is_file(), (
        f"no golden; run: UPDATE_GOLDEN=1 .venv/bin/python -m pytest {__file__}"
    )
    assert out == golden.read_text(), (
        f"{case}: injection output changed; if intended, run: "
        f"UPDATE_GOLDEN=1 .venv/bin/python -m pytest {__file__}"
    )


@pytest.mark.parametrize("case", CASES)
def test_injecting_twice_changes_nothing(case: str) -> None:
    once = inject_yaml((CASES_DIR / case / "in.yaml").read_text(), CONFIG)
    assert inject_yaml(once, CONFIG) == once


def test_reinjecting_applies_a_new_configuration() -> None:
    once = inject_yaml((CASES_DIR / "pod" / "in.yaml").read_text(), CONFIG)
    again = inject_yaml(once, InjectConfig(image="envoyproxy/envoy:v1.40.1"))
    pod = yaml.safe_load(again)
    images = [c["image"] for c in pod["spec"]["containers"]]
    assert images == ["example/scorer:1.2", "envoyproxy/envoy:v1.40.1"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["modelguard-token", "modelguard-ca-root"]


def test_a_pod_injected_before_identity_is_upgraded_cleanly() -> None:
    """An older injection (token volume only, no init containers in its status) is
    stripped by its own status annotation and injected anew, once."""
    once = yaml.safe_load(inject_yaml((CASES_DIR / "pod" / "in.yaml").read_text(), CONFIG))
    old = copy.deepcopy(once)
    old["spec"]["volumes"] = [v for v in old["spec"]["volumes"] if v["name"] != inject.CA_VOLUME]
    old["metadata"]["annotations"][inject.STATUS] = json.dumps(
        {"containers": [inject.CONTAINER], "volumes": [inject.TOKEN_VOLUME]}
    )
    assert inject.inject_object(old, CONFIG) == once


def test_egress_is_opt_in_and_its_init_container_goes_first() -> None:
    docs = yaml.safe_load_all((CASES_DIR / "egress-enabled" / "out.yaml").read_text())
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == [inject.EGRESS_INIT, "fetch-weights"]
    init = pod["initContainers"][0]
    env = {e["name"]: e["value"] for e in init["env"]}
    sidecar = next(c for c in pod["containers"] if c["name"] == inject.CONTAINER)
    assert env["OUTBOUND_PORT"] == "15001"
    # The redirect spares the sidecar's own traffic: PROXY_UID must be the sidecar's UID.
    assert env["PROXY_UID"] == str(sidecar["securityContext"]["runAsUser"])
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    bootstrap = json.loads(sidecar["args"][1])
    assert bootstrap["node"]["metadata"]["modelguard"]["outbound_port"] == 15001
    # Without the annotation: no outbound listener and no init container.
    plain = yaml.safe_load(inject_yaml((CASES_DIR / "pod" / "in.yaml").read_text(), CONFIG))
    assert "initContainers" not in plain["spec"]
    plain_sidecar = _sidecar(plain)
    plain_meta = json.loads(plain_sidecar["args"][1])["node"]["metadata"]["modelguard"]
    assert "outbound_port" not in plain_meta
    # Re-injecting with another port moves both the listener and the redirect.
    source = (CASES_DIR / "egress-enabled" / "out.yaml").read_text()
    moved = yaml.safe_load(inject_yaml(source, InjectConfig(outbound_port=15100)))
    spec = moved["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [inject.EGRESS_INIT, "fetch-weights"]
    assert {"name": "OUTBOUND_PORT", "value": "15100"} in spec["initContainers"][0]["env"]
    # Turning it off removes the init container again.
    off = copy.deepcopy(moved)
    off["spec"]["template"]["metadata"]["annotations"][inject.EGRESS] = "disabled"
    spec = inject.inject_object(off, CONFIG)["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["fetch-weights"]


def test_insecure_control_plane_gets_plaintext_sidecars() -> None:
    config = InjectConfig(identity=False)
    pod = yaml.safe_load(inject_yaml((CASES_DIR / "pod" / "in.yaml").read_text(), config))
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["modelguard-token"]
    bootstrap = json.loads(_sidecar(pod)["args"][1])
    xds = bootstrap["static_resources"]["clusters"][0]
    assert "transport_socket" not in xds
    assert "http_filters" not in json.dumps(xds)


def _sidecar(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"] if "template" in doc["spec"] else doc["spec"]
    return next(c for c in spec["containers"] if c["name"] == inject.CONTAINER)


def _expand(text: str, env: dict[str, str]) -> str:
    for name, value in env.items():
        text = text.replace(f"$({name})", value)
    assert "$(" not in text, text
    return text


def test_injected_sidecar_carries_identity_and_a_bootstrap_envoy_accepts(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((CASES_DIR / "demo-deployment" / "out.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = _sidecar(deployment)
    volume = next(v for v in pod["volumes"] if v["name"] == inject.TOKEN_VOLUME)
    token = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "modelguard" and token["path"] == "token"
    mount = sidecar["volumeMounts"][0]
    assert f"{mount['mountPath']}/{token['path']}" == "/var/run/secrets/modelguard/token"
    bundle = next(v for v in pod["volumes"] if v["name"] == inject.CA_VOLUME)
    assert bundle["configMap"] == {"name": "modelguard-ca-root"}
    assert {"name": inject.CA_VOLUME, "mountPath": "/etc/modelguard/ca", "readOnly": True} in (
        sidecar["volumeMounts"]
    )
    assert sidecar["ports"] == [
        {"name": "mg-inbound", "containerPort": 15006, "protocol": "TCP"},
        {"name": "mg-stats", "containerPort": 15090, "protocol": "TCP"},
    ]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "SERVICE_ACCOUNT": "spec.serviceAccountName",
    }
    # What the kubelet does with $(VAR) in args, then what Envoy does with the result.
    raw = sidecar["args"][sidecar["args"].index("--config-yaml") + 1]
    bootstrap = json.loads(
        _expand(
            raw,
            {
                "POD_NAME": "digits-model-7d9f-abcde",
                "POD_NAMESPACE": "demo",
                "SERVICE_ACCOUNT": "digits-model",
            },
        )
    )
    assert bootstrap["node"]["id"] == "digits-model-7d9f-abcde.demo"
    meta = bootstrap["node"]["metadata"]["modelguard"]
    assert meta["identity"] == "spiffe://cluster.local/ns/demo/sa/digits-model"
    assert (meta["service"], meta["app_port"], meta["inbound_port"]) == (
        "digits-model",
        8080,
        15006,
    )
    xds = bootstrap["static_resources"]["clusters"][0]
    assert xds["type"] == "STRICT_DNS"
    address = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {
        "address": "modelguard.modelguard-system.svc",
        "port_value": 18000,
    }
    # xDS over TLS: the server must be the control plane's SPIFFE ID under the mounted root.
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert tls["trusted_ca"] == {"filename": "/etc/modelguard/ca/root-cert.pem"}
    assert tls["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "spiffe://cluster.local/ns/modelguard-system/sa/modelguard"
    }
    protocol = xds["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    generic = protocol["http_filters"][0]["typed_config"]["credential"]["typed_config"]
    assert (generic["header"], generic["header_value_prefix"]) == ("authorization", "Bearer ")
    source = generic["credential"]["sds_config"]["path_config_source"]
    assert source == {
        "path": "/etc/modelguard/ca/xds-token.sds.yaml",
        "watched_directory": {"path": "/var/run/secrets/modelguard"},
    }
    # Envoy reads those files when it loads the bootstrap: give it a pod's mounts.
    ok, output = validate_config(_with_mounts(bootstrap, tmp_path))
    assert ok, output


def _with_mounts(bootstrap: dict[str, Any], root: Path) -> dict[str, Any]:
    """The bootstrap with the pod's mount paths moved under ``root``, and the files the
    kubelet would put there (the trust-bundle ConfigMap and a token)."""
    from controlplane.identity import kubernetes as k8s_identity
    from controlplane.identity.ca import CertificateAuthority

    ca_dir, token_dir = root / "ca", root / "token"
    ca_dir.mkdir()
    token_dir.mkdir()
    (token_dir / "token").write_text("a-token")
    data = k8s_identity.trust_bundle_data(
        CertificateAuthority.generate("cluster.local").root_pem, str(token_dir / "token")
    )
    for name, text in data.items():
        (ca_dir / name).write_text(text)
    text = json.dumps(bootstrap)
    text = text.replace("/etc/modelguard/ca", str(ca_dir))
    text = text.replace("/var/run/secrets/modelguard", str(token_dir))
    result: dict[str, Any] = json.loads(text)
    return result


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {
                "kind": "Deployment",
                "metadata": {"name": "d"},
                "spec": {
                    "template": {
                        "metadata": {"labels": {"app": "d"}},
                        "spec": {"containers": [{"name": "c", "image": "i"}]},
                    }
                },
            },
            "Deployment d: spec.template.metadata.annotations['sidecar.modelguard.io/app-port']:"
            " required when no container declares a TCP port",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {
                    "name": "p",
                    "annotations": {"sidecar.modelguard.io/app-port": "http"},
                },
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
            "Pod p: metadata.annotations['sidecar.modelguard.io/app-port']: must be a port "
            "number, got 'http'",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {"name": "p", "labels": {"app": "p"}},
                "spec": {
                    "containers": [{"name": "c", "image": "i", "ports": [{"containerPort": 15006}]}]
                },
            },
            "Pod p: metadata.annotations['sidecar.modelguard.io/app-port']: the application "
            "port 15006 is taken by the sidecar; set another sidecar.modelguard.io/inbound-port",
        ),
    ],
)
def test_bad_workloads_are_refused_with_the_field_to_fix(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InjectionError) as err:
        inject.inject_object(doc, CONFIG)
    assert str(err.value) == message


def test_cli_writes_the_injected_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = CASES_DIR / "demo-deployment" / "in.yaml"
    out = tmp_path / "injected.yaml"
    assert cli.main(["inject", "-f", str(source), "-o", str(out)]) == 0
    assert out.read_text() == (CASES_DIR / "demo-deployment" / "out.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\n")
    assert cli.main(["inject", "-f", str(bad)]) == 1
    assert "modelguard inject: " in capsys.readouterr().err


# --- the admission webhook --------------------------------------------------------------


def _apply(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON Patch, as far as the webhook uses it: add/remove of /metadata/* and /spec/*."""
    out = copy.deepcopy(obj)
    for op in ops:
        _, top, key = op["path"].split("/")
        if op["op"] == "add":
            out.setdefault(top, {})[key] = op["value"]
        else:
            assert op["op"] == "remove"
            del out[top][key]
    return out


def _pod_review(pod: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "7f1e",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": operation,
            "namespace": "demo",
            "object": pod,
        },
    }


def _demo_pod() -> dict[str, Any]:
    docs = yaml.safe_load_all((CASES_DIR / "demo-deployment" / "in.yaml").read_text())
    template = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **template["metadata"],
            "generateName": "digits-model-7d9f-",
            "namespace": "demo",
            "ownerReferences": [{"kind": "ReplicaSet", "name": "digits-model-7d9f"}],
        },
        "spec": template["spec"],
    }


def test_webhook_patch_gives_the_same_pod_as_inject() -> None:
    pod = _demo_pod()
    answer = webhook_module.review(_pod_review(pod), CONFIG)
    response = answer["response"]
    assert answer["kind"] == "AdmissionReview" and response["uid"] == "7f1e"
    assert response["allowed"] and response["patchType"] == "JSONPatch"
    patched = _apply(pod, json.loads(base64.b64decode(response["patch"])))
    expected = inject.inject_object(pod, CONFIG)
    assert patched == expected
    # An injected pod (webhook reinvocation, or `modelguard inject` output) gets no patch.
    again = webhook_module.review(_pod_review(patched), CONFIG)["response"]
    assert again["allowed"] and "patch" not in again


def test_webhook_refuses_a_pod_it_cannot_protect() -> None:
    pod = {
        "metadata": {"name": "p", "labels": {"app": "p"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    }
    response = webhook_module.review(_pod_review(pod), CONFIG)["response"]
    assert response["allowed"] is False
    assert "required when no container declares a TCP port" in response["status"]["message"]
    assert "patch" not in webhook_module.review(_pod_review(pod, "UPDATE"), CONFIG)["response"]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_webhook_serves_admission_reviews_over_https(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    ready = [False]
    webhook = webhook_module.InjectionWebhook(
        CONFIG, "127.0.0.1", 0, str(cert), str(key), ready=lambda: ready[0]
    )
    webhook.start()
    try:
        context = ssl.create_default_context(cafile=str(cert))
        base = f"https://localhost:{webhook.port}"

        def get(path: str) -> int:
            try:
                with urllib.request.urlopen(base + path, context=context, timeout=5) as resp:
                    return int(resp.status)
            except urllib.error.HTTPError as err:
                return err.code

        assert get("/healthz") == 200
        assert get("/readyz") == 503
        ready[0] = True
        assert get("/readyz") == 200
        body = json.dumps(_pod_review(_demo_pod())).encode()
        request = urllib.request.Request(
            base + "/inject?timeout=10s", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, context=context, timeout=5) as resp:
            answer = json.loads(resp.read())
        assert answer["response"]["allowed"] and answer["response"]["patchType"] == "JSONPatch"
        # Plain HTTP is not served.
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{webhook.port}/healthz", timeout=5)
    finally:
        webhook.stop()


@pytest.mark.parametrize("case", CASES)
def test_injected_manifests_are_valid_kubernetes_objects(case: str) -> None:
    import kubernetes_validate

    for doc in yaml.safe_load_all((CASES_DIR / case / "out.yaml").read_text()):
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_injected_pods_are_scraped_for_envoy_stats_unless_they_have_their_own() -> None:
    """Issue 17: the scrape annotations point Prometheus at Envoy's /stats/prometheus, served
    on the pod network by a static listener that routes only that path (GET) to the
    loopback admin; a pod's own prometheus.io settings are left alone."""
    pod = yaml.safe_load(inject_yaml((CASES_DIR / "pod" / "in.yaml").read_text(), CONFIG))
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15090"
    assert annotations["prometheus.io/path"] == "/stats/prometheus"
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == inject.CONTAINER)
    bootstrap = json.loads(sidecar["args"][sidecar["args"].index("--config-yaml") + 1])
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 15090
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert route["match"]["path"] == "/stats/prometheus"  # never the rest of the admin API
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    # Injecting again keeps them exactly once; a pod with its own scrape settings keeps them.
    assert inject.inject_object(pod, CONFIG) == pod
    own = yaml.safe_load((CASES_DIR / "pod" / "in.yaml").read_text())
    own["metadata"].setdefault("annotations", {})["prometheus.io/port"] = "9100"
    injected = inject.inject_object(own, CONFIG)["metadata"]["annotations"]
    assert injected["prometheus.io/port"] == "9100" and "prometheus.io/path" not in injected
    assert inject.inject_object(pod, CONFIG) == pod


def test_webhook_serves_a_renewed_certificate_without_a_restart(tmp_path: Path) -> None:
    """cert-manager renews the Secret and the kubelet swaps the files: the next handshake
    presents the new certificate (a server that read it once would serve an expired one)."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    first, _ = _self_signed(first_dir)
    second, _ = _self_signed(second_dir)
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for name in ("tls.crt", "tls.key"):
        (mounted / name).write_bytes((first_dir / name).read_bytes())
    webhook = webhook_module.InjectionWebhook(
        CONFIG, "127.0.0.1", 0, str(mounted / "tls.crt"), str(mounted / "tls.key")
    )
    webhook.start()
    try:

        def served() -> bytes:
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            with (
                socket.create_connection(("127.0.0.1", webhook.port), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der

        def der(path: Path) -> bytes:
            return ssl.PEM_cert_to_DER_cert(path.read_text())

        assert served() == der(first)
        # The kubelet's swap: new files replace the old ones (atomically, by rename).
        for name in ("tls.crt", "tls.key"):
            staged = mounted / f".{name}.new"
            staged.write_bytes((second_dir / name).read_bytes())
            staged.replace(mounted / name)
        assert served() == der(second)
        # A half-written pair keeps the last good certificate.
        (mounted / "tls.key").write_text("not a key")
        assert served() == der(second)
    finally:
        webhook.stop()
