"""Sidecar injection: add the Envoy sidecar to a pod. The pod mutation lives here; the
mutating admission webhook the control plane serves (``sidecar/webhook.py``) and
``modelguard inject`` (``app/inject_cli.py``, like ``istioctl kube-inject``) apply it.

What a pod gets:

* a container ``modelguard-sidecar`` running Envoy. Its whole bootstrap travels in
  ``--config-yaml``; the per-pod parts (node id = pod name, namespace, SPIFFE ID from the
  service account) are ``$(VAR)`` references that the kubelet expands from downward-API
  environment variables, so one Deployment template serves every replica and no ConfigMap
  or init container is needed. Clients reach the workload through the sidecar's named port
  ``mg-inbound``: point the Service's ``targetPort`` at it (no traffic redirection).
* a projected service-account token with audience ``modelguard``, mounted at
  ``/var/run/secrets/modelguard/token``: the sidecar's proof of identity towards the control
  plane, which checks it with a TokenReview. Envoy sends it on every xDS stream as
  ``authorization: Bearer`` and re-reads it when the kubelet rotates it
  (``controlplane.identity.kubernetes.sidecar_xds_auth``).
* the ConfigMap ``modelguard-ca-root`` (published in every namespace by the control plane)
  at ``/etc/modelguard/ca``: the CA root the sidecar trusts for xDS over TLS, and the file
  SDS source of its token. With ``identity=False`` (a control plane run ``--insecure``)
  neither TLS nor the token is used.
* with the annotation ``modelguard.io/egress: enabled``: an outbound listener
  (``outbound_port``, default 15001) and the init container of ``k8s/egress/`` that
  redirects the pod's outbound TCP to it, so ``EgressPolicy`` applies.
* the annotation ``sidecar.modelguard.io/status`` naming what was added.

Injection is idempotent: an injected pod is first stripped of what the annotation names,
then injected again, so injecting twice changes nothing and re-injecting applies a new
configuration. Pods opt out with the annotation ``sidecar.modelguard.io/inject: "false"``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from typing import Any, Final

import yaml

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.contracts.trust_bundle import (
    TOKEN_AUDIENCE,
    TOKEN_DIR,
    TOKEN_FILE,
    TRUST_BUNDLE_CONFIGMAP,
    TRUST_BUNDLE_DIR,
)
from controlplane.sidecar.bootstrap import STATS_PATH as STATS_PATH
from controlplane.sidecar.bootstrap import STATS_PORT as STATS_PORT
from controlplane.sidecar.bootstrap import (
    add_stats_listener,
    build_bootstrap,
    parse_hostport,
    sidecar_xds_auth,
)

log = logging.getLogger(__name__)

CONTAINER: Final = "modelguard-sidecar"
TOKEN_VOLUME: Final = "modelguard-token"
INBOUND_PORT_NAME: Final = "mg-inbound"
CA_VOLUME: Final = "modelguard-ca-root"
EGRESS_INIT: Final = "modelguard-egress-init"
SIDECAR_UID: Final = 101  # the envoy user of the official image; egress skips its traffic

ANNOTATION_PREFIX: Final = "sidecar.modelguard.io/"
STATUS: Final = ANNOTATION_PREFIX + "status"
INJECT: Final = ANNOTATION_PREFIX + "inject"
SERVICE: Final = ANNOTATION_PREFIX + "service"
APP_PORT: Final = ANNOTATION_PREFIX + "app-port"
INBOUND_PORT: Final = ANNOTATION_PREFIX + "inbound-port"
# A label, not only the status annotation: the control plane watches only the pods that
# carry it (a label selector), not every pod of the cluster.
INJECTED_LABEL: Final = ANNOTATION_PREFIX + "injected"
INJECTED_SELECTOR: Final = INJECTED_LABEL + "=true"
# Opt-in, named like the namespace label modelguard.io/inject: it changes the pod's network.
EGRESS: Final = "modelguard.io/egress"

# Envoy's /stats/prometheus for Prometheus: the admin interface stays on loopback (it can
# change the sidecar), so a static listener serves that one path to the pod network, like
# Istio's 15090; the pod carries the usual scrape annotations unless it has its own.
STATS_PORT_NAME: Final = "mg-stats"
SCRAPE_ANNOTATIONS: Final = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(STATS_PORT),
    "prometheus.io/path": STATS_PATH,
}

# Kinds whose pod template lives at spec.template (CronJob one level deeper).
_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class InjectionError(ValueError):
    """A workload the sidecar cannot be added to; the message names the object and field."""


@dataclass(frozen=True)
class InjectConfig:
    xds_address: str = "modelguard.modelguard-system.svc:18000"
    image: str = "envoyproxy/envoy:v1.40.0"
    inbound_port: int = 15006
    admin_port: int = 15000
    trust_domain: str = "cluster.local"
    log_level: str = "info"
    # xDS over TLS with the pod's service-account token (the control plane's default);
    # False for a control plane started with --insecure.
    identity: bool = True
    outbound_port: int = 15001  # pods with modelguard.io/egress: enabled
    egress_image: str = "modelguard-egress-init:0.1.0"  # k8s/egress/Dockerfile


def _workload_service(meta: dict[str, Any], owner_name: str | None) -> str:
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    service = (
        annotations.get(SERVICE)
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or owner_name
    )
    if not service:
        raise InjectionError(
            f"metadata.annotations[{SERVICE!r}]: required when the pod has no "
            "app.kubernetes.io/name or app label"
        )
    return str(service)


def _port(value: Any, where: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if not 0 < port < 65536:
        raise InjectionError(f"{where}: must be a port number, got {value!r}")
    return port


def _app_port(meta: dict[str, Any], spec: dict[str, Any]) -> int:
    annotations = meta.get("annotations") or {}
    if APP_PORT in annotations:
        return _port(annotations[APP_PORT], f"metadata.annotations[{APP_PORT!r}]")
    for i, container in enumerate(spec.get("containers") or []):
        for j, port in enumerate(container.get("ports") or []):
            if port.get("protocol", "TCP") == "TCP" and "containerPort" in port:
                return _port(port["containerPort"], f"spec.containers[{i}].ports[{j}]")
    raise InjectionError(
        f"metadata.annotations[{APP_PORT!r}]: required when no container declares a TCP port"
    )


def sidecar_bootstrap(
    config: InjectConfig,
    service: str,
    app_port: int,
    inbound_port: int,
    labels: dict[str, str],
    outbound_port: int | None = None,
) -> dict[str, Any]:
    """The Envoy bootstrap of an injected sidecar, with ``$(VAR)`` per-pod references."""
    host, port = parse_hostport(config.xds_address)
    sidecar = Sidecar(
        node_id="$(POD_NAME).$(POD_NAMESPACE)",
        service=service,
        namespace="$(POD_NAMESPACE)",
        identity=f"spiffe://{config.trust_domain}/ns/$(POD_NAMESPACE)/sa/$(SERVICE_ACCOUNT)",
        app_port=app_port,
        inbound_port=inbound_port,
        labels=tuple(sorted(labels.items())),
        outbound_port=outbound_port,
    )
    bootstrap = build_bootstrap(
        sidecar,
        xds_host=host,
        xds_port=port,
        admin_port=config.admin_port,
        cluster=f"{service}.$(POD_NAMESPACE)",
    )
    add_stats_listener(bootstrap, config.admin_port)
    if not config.identity:
        return bootstrap
    from controlplane.identity.service import control_plane_id

    return sidecar_xds_auth(bootstrap, control_plane_id(config.trust_domain))


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def sidecar_container(
    config: InjectConfig, bootstrap: dict[str, Any], inbound: int
) -> dict[str, Any]:
    return {
        "name": CONTAINER,
        "image": config.image,
        "command": ["envoy"],
        "args": [
            "--config-yaml",
            # Kubelet expands $(VAR) in args; a literal '$' would need '$$', and JSON has none.
            json.dumps(bootstrap, separators=(",", ":"), sort_keys=True),
            "--log-level",
            config.log_level,
            "--drain-time-s",
            "5",
        ],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ],
        "ports": [
            {"name": INBOUND_PORT_NAME, "containerPort": inbound, "protocol": "TCP"},
            {"name": STATS_PORT_NAME, "containerPort": STATS_PORT, "protocol": "TCP"},
        ],
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            *(
                [{"name": CA_VOLUME, "mountPath": TRUST_BUNDLE_DIR, "readOnly": True}]
                if config.identity
                else []
            ),
        ],
    }


def egress_init_container(config: InjectConfig) -> dict[str, Any]:
    """``k8s/egress/redirect-patch.yaml``'s init container: the pod's outbound TCP → the
    sidecar's outbound listener, except the sidecar's own traffic (UID 101)."""
    return {
        "name": EGRESS_INIT,
        "image": config.egress_image,
        "env": [
            {"name": "OUTBOUND_PORT", "value": str(config.outbound_port)},
            {"name": "PROXY_UID", "value": str(SIDECAR_UID)},
            {"name": "EXCLUDE_CIDRS", "value": ""},
            {"name": "EXCLUDE_PORTS", "value": ""},
        ],
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
    }


CA_VOLUME_SPEC: Final[dict[str, Any]] = {
    "name": CA_VOLUME,
    "configMap": {"name": TRUST_BUNDLE_CONFIGMAP},
}


TOKEN_VOLUME_SPEC: Final[dict[str, Any]] = {
    "name": TOKEN_VOLUME,
    "projected": {
        "sources": [
            {
                "serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": 3600,
                    "path": TOKEN_FILE,
                }
            }
        ]
    },
}


def _strip(meta: dict[str, Any], spec: dict[str, Any]) -> None:
    """Remove what an earlier injection added (as its status annotation lists it)."""
    annotations = meta.get("annotations") or {}
    raw = annotations.pop(STATUS, None)
    if raw is None:
        return
    try:
        status = json.loads(raw)
        containers, volumes = set(status["containers"]), set(status["volumes"])
        inits = set(status.get("initContainers", []))
        added = set(status.get("annotations", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        containers, volumes = {CONTAINER}, {TOKEN_VOLUME, CA_VOLUME}
        inits = {EGRESS_INIT}
        added = set()
    for name in added & set(SCRAPE_ANNOTATIONS):
        annotations.pop(name, None)
    spec["containers"] = [c for c in spec.get("containers", []) if c.get("name") not in containers]
    kept_inits = [c for c in spec.get("initContainers", []) if c.get("name") not in inits]
    if kept_inits:
        spec["initContainers"] = kept_inits
    else:
        spec.pop("initContainers", None)
    kept = [v for v in spec.get("volumes", []) if v.get("name") not in volumes]
    if kept:
        spec["volumes"] = kept
    else:
        spec.pop("volumes", None)
    if not annotations:
        meta.pop("annotations", None)


def inject_pod(
    meta: dict[str, Any], spec: dict[str, Any], config: InjectConfig, owner_name: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pod's (metadata, spec) with the sidecar added. The inputs are not modified."""
    meta, spec = copy.deepcopy(meta), copy.deepcopy(spec)
    if str((meta.get("annotations") or {}).get(INJECT, "true")).lower() == "false":
        return meta, spec
    _strip(meta, spec)
    for i, container in enumerate(spec.get("containers") or []):
        if container.get("name") == CONTAINER:
            raise InjectionError(f"spec.containers[{i}].name: {CONTAINER} is reserved")
    for i, container in enumerate(spec.get("initContainers") or []):
        if container.get("name") == EGRESS_INIT:
            raise InjectionError(f"spec.initContainers[{i}].name: {EGRESS_INIT} is reserved")
    service = _workload_service(meta, owner_name)
    annotations = meta.get("annotations") or {}
    inbound = config.inbound_port
    if INBOUND_PORT in annotations:
        inbound = _port(annotations[INBOUND_PORT], f"metadata.annotations[{INBOUND_PORT!r}]")
    app_port = _app_port(meta, spec)
    if app_port in (inbound, config.admin_port, STATS_PORT):
        raise InjectionError(
            f"metadata.annotations[{APP_PORT!r}]: the application port {app_port} is taken "
            "by the sidecar; set another sidecar.modelguard.io/inbound-port"
        )
    egress = str(annotations.get(EGRESS, "")).lower()
    if egress not in ("", "enabled", "disabled"):
        raise InjectionError(
            f"metadata.annotations[{EGRESS!r}]: must be enabled or disabled, got {egress!r}"
        )
    outbound = config.outbound_port if egress == "enabled" else None
    if outbound is not None and outbound in (app_port, inbound, config.admin_port):
        raise InjectionError(
            f"metadata.annotations[{EGRESS!r}]: the outbound port {outbound} is taken by the "
            "application or the sidecar; inject with another --outbound-port"
        )
    meta["labels"] = {**(meta.get("labels") or {}), INJECTED_LABEL: "true"}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    bootstrap = sidecar_bootstrap(config, service, app_port, inbound, labels, outbound)
    spec["containers"] = [
        *spec.get("containers", []),
        sidecar_container(config, bootstrap, inbound),
    ]
    volumes = [copy.deepcopy(TOKEN_VOLUME_SPEC)]
    if config.identity:
        volumes.append(copy.deepcopy(CA_VOLUME_SPEC))
    spec["volumes"] = [*spec.get("volumes", []), *volumes]
    status: dict[str, Any] = {
        "containers": [CONTAINER],
        "volumes": [v["name"] for v in volumes],
    }
    if outbound is not None:
        # First: the redirect must be in place before any other init container talks out.
        spec["initContainers"] = [egress_init_container(config), *spec.get("initContainers", [])]
        status["initContainers"] = [EGRESS_INIT]
    pod_annotations = meta.setdefault("annotations", {})
    theirs = {k: v for k, v in pod_annotations.items() if k in SCRAPE_ANNOTATIONS}
    if all(SCRAPE_ANNOTATIONS[k] == v for k, v in theirs.items()):
        pod_annotations.update(SCRAPE_ANNOTATIONS)  # a pod's own scrape settings win
        status["annotations"] = list(SCRAPE_ANNOTATIONS)
    pod_annotations[STATUS] = json.dumps(status, separators=(",", ":"))
    return meta, spec


def _template(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind in _TEMPLATE_KINDS:
        template = spec.get("template")
    elif kind == "CronJob":
        template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    else:
        return None
    return template if isinstance(template, dict) else None


def inject_object(doc: Any, config: InjectConfig) -> Any:
    """One Kubernetes object; pods and pod-owning workloads get the sidecar, the rest pass."""
    if not isinstance(doc, dict):
        return doc
    name = (doc.get("metadata") or {}).get("name")
    where = f"{doc.get('kind')} {name}"
    try:
        if doc.get("kind") == "Pod":
            meta, spec = inject_pod(
                doc.get("metadata") or {}, doc.get("spec") or {}, config, owner_name=name
            )
            return {**doc, "metadata": meta, "spec": spec}
        template = _template(doc)
        if template is None:
            return doc
        meta, spec = inject_pod(
            template.get("metadata") or {}, template.get("spec") or {}, config, owner_name=name
        )
    except InjectionError as err:
        path = "" if doc.get("kind") == "Pod" else "spec.template."
        raise InjectionError(f"{where}: {path}{err}") from None
    out = copy.deepcopy(doc)
    target = _template(out)
    assert target is not None
    target["metadata"], target["spec"] = meta, spec
    return out


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def inject_yaml(text: str, config: InjectConfig) -> str:
    """A YAML stream (``---``-separated, a List too) with every workload injected."""
    out = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if isinstance(doc, dict) and doc.get("kind") == "List":
            doc = {**doc, "items": [inject_object(item, config) for item in doc.get("items", [])]}
        else:
            doc = inject_object(doc, config)
        out.append(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100))
    return "---\n".join(out)
