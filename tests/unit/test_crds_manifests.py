"""k8s/ renders with kustomize and every object in it is valid, offline.

Built-in kinds are checked against Kubernetes' own schemas (kubernetes-validate, strict:
unknown fields fail); our policy objects against their CRD's schema and CEL rules. The
rendering uses `kubectl kustomize` where kubectl is installed, and a small renderer of the
kustomize features k8s/ uses otherwise; where both exist, they must agree.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.app import cli
from controlplane.policies.registry import REGISTRY
from tests.unit.test_crds import K8S_VERSION, cel_errors, schema_errors, schema_of

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
# Kinds of other projects: no schema is available offline; their fields are checked below.
FOREIGN = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate")}


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(directory: Path) -> list[dict[str, Any]]:
    """The kustomize features k8s/ uses: resources, namespace, labels, images."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        assert path.is_relative_to(directory.resolve()), f"{resource}: outside {directory}"
        objects += render(path) if path.is_dir() else _load(path)
    for generator in kustomization.get("configMapGenerator", []):  # files, no name hash
        assert generator.get("options", {}).get("disableNameSuffixHash") is True
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        objects.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
             "data": data}
        )
    namespace = kustomization.get("namespace")
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = namespace
        if namespace and obj["kind"] in ("ClusterRoleBinding", "RoleBinding"):
            for subject in obj.get("subjects", []):
                # As kustomize: a subject naming another namespace keeps it.
                if subject.get("kind") == "ServiceAccount" and subject.get("namespace") in (
                    None,
                    "default",
                ):
                    subject["namespace"] = namespace
        for group in kustomization.get("labels", []):
            meta.setdefault("labels", {}).update(group["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
}


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("containers", []), *spec.get("initContainers", [])]


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (obj["kind"], meta.get("namespace", ""), meta["name"])


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(K8S)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_same_objects(objects: list[dict[str, Any]]) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = {_key(o): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {_key(o): o for o in objects}
    assert sorted(theirs) == sorted(ours)
    for key, obj in ours.items():
        assert theirs[key] == obj, key


def test_every_object_is_valid(objects: list[dict[str, Any]]) -> None:
    problems = []
    for obj in objects:
        where = "/".join(_key(obj))
        if obj["apiVersion"] == "modelguard.io/v1alpha1":
            problems += [f"{where}: {e}" for e in schema_errors(obj["kind"], obj)]
            problems += [f"{where}: {e}" for e in cel_errors(schema_of(obj["kind"]), obj)]
        elif (obj["apiVersion"], obj["kind"]) in FOREIGN:
            continue
        else:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                problems.append(f"{where}: {err.message} at {list(err.path)}")
    assert problems == []


def test_the_kustomization_has_every_part(objects: list[dict[str, Any]]) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Namespace", "modelguard-system"),
        ("Namespace", "demo"),
        ("Deployment", "modelguard"),
        ("Service", "modelguard"),
        ("Deployment", "redis"),
        ("Deployment", "otel-collector"),
        ("Service", "redis"),
        ("Deployment", "digits-model"),
        ("Service", "digits-model"),
        ("MutatingWebhookConfiguration", "modelguard-sidecar-injector"),
    } <= kinds
    # Every registered kind: its CRD, and the demo's example policy of it.
    registered = {kind.name for kind in REGISTRY}
    assert {(name, "digits-model") for name in registered} <= kinds
    crds = {o["spec"]["names"]["kind"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert crds == registered


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def test_rbac_is_least_privilege(objects: list[dict[str, Any]]) -> None:
    role = _one(objects, "ClusterRole", "modelguard-control-plane")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        writes = set(rule["verbs"]) - {"get", "list", "watch"}
        if not writes:
            continue
        # Written cluster-wide: the status of policies, TokenReviews (asking the API server
        # about a sidecar's token), and the one trust-bundle ConfigMap per namespace.
        if rule["apiGroups"] == ["modelguard.io"]:
            assert all(r.endswith("/status") for r in rule["resources"]), rule
        elif rule["apiGroups"] == ["authentication.k8s.io"]:
            assert rule["resources"] == ["tokenreviews"] and writes == {"create"}, rule
        else:
            assert rule["apiGroups"] == [""] and rule["resources"] == ["configmaps"], rule
            if writes != {"create"}:  # changing is limited to our own ConfigMap
                assert rule["resourceNames"] == ["modelguard-ca-root"], rule
    # Secrets: never cluster-wide; a namespaced Role where API-key Secrets live, read-only.
    assert not any("secrets" in rule["resources"] for rule in role["rules"])
    keys = _one(objects, "Role", "modelguard-api-keys")
    assert keys["metadata"]["namespace"] == "demo"
    (rule,) = keys["rules"]
    assert rule["resources"] == ["secrets"] and set(rule["verbs"]) == {"get", "list", "watch"}
    binding = _one(objects, "RoleBinding", "modelguard-api-keys")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "modelguard", "namespace": "modelguard-system"}
    ]
    deployment = _one(objects, "Deployment", "modelguard")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "--api-key-namespaces=demo" in container["args"]
    lease = _one(objects, "Role", "modelguard-leader-election")
    assert lease["metadata"]["namespace"] == "modelguard-system"
    for rule in lease["rules"]:
        assert rule["resources"] == ["leases"]
        if set(rule["verbs"]) - {"create"}:
            assert rule["resourceNames"] == ["modelguard-status-writer"]


def test_control_plane_deployment(objects: list[dict[str, Any]]) -> None:
    deployment = _one(objects, "Deployment", "modelguard")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "modelguard"
    (container,) = pod["containers"]
    assert "--kubernetes" in container["args"]
    assert container["image"] == "modelguard:0.1.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"]
    # The arguments are ones `modelguard` knows (the kubelet expands $(VAR) first).
    args = [
        a.replace("$(POD_NAMESPACE)", "modelguard-system").replace("$(POD_NAME)", "mg-0")
        for a in container["args"]
    ]
    parsed = cli.build_parser().parse_args(args)
    assert parsed.kubernetes and parsed.webhook_port == 9443
    # Redis with its password from the Secret (the kubelet expands $(REDIS_PASSWORD)).
    assert parsed.rate_limit_backend.startswith(
        "redis://:$(REDIS_PASSWORD)@redis.modelguard-system.svc:"
    )
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "modelguard-redis"
    # The CA key is readable by the non-root process: group 65532 through fsGroup, 0440.
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 65532
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["ca"]["secret"]["defaultMode"] == 0o440
    # The admin API stays on loopback (kubectl port-forward) and out of the Service.
    assert parsed.admin_host == "127.0.0.1"
    assert "admin" not in {p["name"] for p in container["ports"]}
    service = _one(objects, "Service", "modelguard")
    assert 18001 not in {p["port"] for p in service["spec"]["ports"]}


def test_redis_is_private_persistent_and_password_protected(
    objects: list[dict[str, Any]],
) -> None:
    redis = _one(objects, "Deployment", "redis")
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "--requirepass" in container["args"] and "--protected-mode" not in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "modelguard-redis"
    (data,) = (v for v in pod["volumes"] if v["name"] == "data")
    claim = _one(objects, "PersistentVolumeClaim", data["persistentVolumeClaim"]["claimName"])
    assert claim["metadata"]["namespace"] == "modelguard-system"
    policy = _one(objects, "NetworkPolicy", "redis")
    assert policy["spec"]["podSelector"]["matchLabels"] == redis["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    control_plane = _one(objects, "Deployment", "modelguard")
    assert peer["podSelector"]["matchLabels"] == control_plane["spec"]["selector"]["matchLabels"]


def test_webhook_certificate_comes_from_a_ca_issuer(objects: list[dict[str, Any]]) -> None:
    """The injected caBundle is then the CA, valid across renewals of the serving cert."""
    leaf = _one(objects, "Certificate", "modelguard-webhook")
    issuer = _one(objects, "Issuer", leaf["spec"]["issuerRef"]["name"])
    ca = _one(objects, "Certificate", issuer["spec"]["ca"]["secretName"])
    assert ca["spec"]["isCA"] and not leaf["spec"].get("isCA")


def test_demo_probes_do_not_go_through_the_sidecar(objects: list[dict[str, Any]]) -> None:
    """A probe through the sidecar is a keyless client spending a budget."""
    model = _one(objects, "Deployment", "digits-model")
    for container in model["spec"]["template"]["spec"]["containers"]:
        for probe in ("readinessProbe", "livenessProbe"):
            spec = container.get(probe) or {}
            assert "mg-inbound" not in json.dumps(spec), (container["name"], probe)


def test_webhook_reaches_the_control_plane_over_a_certified_name(
    objects: list[dict[str, Any]],
) -> None:
    webhook = _one(objects, "MutatingWebhookConfiguration", "modelguard-sidecar-injector")
    (hook,) = webhook["webhooks"]
    target = hook["clientConfig"]["service"]
    service = _one(objects, "Service", target["name"])
    assert service["metadata"]["namespace"] == target["namespace"]
    port = next(p for p in service["spec"]["ports"] if p["port"] == target["port"])
    assert port["targetPort"] == "webhook"
    certificate = _one(objects, "Certificate", "modelguard-webhook")
    assert f"{target['name']}.{target['namespace']}.svc" in certificate["spec"]["dnsNames"]
    ca_from = webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert ca_from == f"{certificate['metadata']['namespace']}/modelguard-webhook"
    deployment = _one(objects, "Deployment", "modelguard")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == "webhook-tls")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"]
    assert hook["namespaceSelector"] == {"matchLabels": {"modelguard.io/inject": "enabled"}}
    demo = _one(objects, "Namespace", "demo")
    assert demo["metadata"]["labels"]["modelguard.io/inject"] == "enabled"


def test_replicas_share_one_ca_from_a_secret(
    objects: list[dict[str, Any]], tmp_path: Path
) -> None:
    import base64

    from controlplane.identity import kubernetes as k8s_identity
    from controlplane.identity.ca import CertificateAuthority

    deployment = _one(objects, "Deployment", "modelguard")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    parsed = cli.build_parser().parse_args(
        [a.replace("$(POD_NAMESPACE)", "x").replace("$(POD_NAME)", "y") for a in container["args"]]
    )
    mount = next(m for m in container["volumeMounts"] if m["name"] == "ca")
    assert parsed.ca_cert == f"{mount['mountPath']}/tls.crt"
    assert parsed.ca_key == f"{mount['mountPath']}/tls.key"
    assert not parsed.insecure
    volume = next(v for v in pod["volumes"] if v["name"] == "ca")
    certificate = _one(objects, "Certificate", "modelguard-ca")
    assert volume["secret"]["secretName"] == certificate["spec"]["secretName"] == "modelguard-ca"
    assert certificate["spec"]["isCA"] is True
    assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Never"
    # The alternative without cert-manager: `modelguard ca init` gives the same Secret shape,
    # valid for the API server, and what it holds loads as the CA on every replica.
    out = tmp_path / "ca.yaml"
    assert cli.main(["ca", "init", "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o077 == 0
    (secret,) = _load(out)
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (
        "modelguard-ca",
        "modelguard-system",
    )
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    ca = CertificateAuthority.load(tmp_path / "tls.crt", tmp_path / "tls.key")
    assert ca.root_pem == base64.b64decode(secret["data"]["ca.crt"]).decode()
    assert k8s_identity.CA_SECRET == "modelguard-ca"
