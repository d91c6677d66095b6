"""Sidecar injection: add the Envoy sidecar to a pod (``modelguard inject``, like
``istioctl kube-inject``, and the mutating admission webhook the control plane serves).

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

import argparse
import base64
import copy
import json
import logging
import os
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Final

import yaml

from controlplane.bootstrap import build_bootstrap, parse_hostport
from controlplane.identity import kubernetes as k8s_identity
from controlplane.inventory import Sidecar

log = logging.getLogger(__name__)

CONTAINER: Final = "modelguard-sidecar"
TOKEN_VOLUME: Final = "modelguard-token"
TOKEN_DIR: Final = "/var/run/secrets/modelguard"
TOKEN_PATH: Final = f"{TOKEN_DIR}/token"
TOKEN_AUDIENCE: Final = "modelguard"
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
STATS_PORT: Final = 15090
STATS_PORT_NAME: Final = "mg-stats"
STATS_PATH: Final = "/stats/prometheus"
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
    _add_stats_listener(bootstrap, config.admin_port)
    if not config.identity:
        return bootstrap
    from controlplane.identity.service import control_plane_id

    return k8s_identity.sidecar_xds_auth(bootstrap, control_plane_id(config.trust_domain))


def _add_stats_listener(bootstrap: dict[str, Any], admin_port: int) -> None:
    """GET /stats/prometheus on 0.0.0.0:STATS_PORT, proxied to the loopback admin."""
    cluster = "modelguard-envoy-admin"
    static = bootstrap["static_resources"]
    static["clusters"].append(
        {
            "name": cluster,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": cluster,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": admin_port}}}}]}],
            },
        }
    )
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    static.setdefault("listeners", []).append(
        {
            "name": "modelguard-stats",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": STATS_PORT}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": f"{hcm}.HttpConnectionManager",
                    "stat_prefix": "modelguard_stats",
                    "route_config": {"virtual_hosts": [{
                        "name": "stats",
                        "domains": ["*"],
                        "routes": [{
                            "match": {"path": STATS_PATH, "headers": [
                                {"name": ":method", "string_match": {"exact": "GET"}}]},
                            "route": {"cluster": cluster},
                        }],
                    }]},
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/"
                                         "envoy.extensions.filters.http.router.v3.Router"},
                    }],
                },
            }]}],
        }
    )


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
                [{"name": CA_VOLUME, "mountPath": k8s_identity.TRUST_BUNDLE_DIR, "readOnly": True}]
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
    "configMap": {"name": k8s_identity.TRUST_BUNDLE_CONFIGMAP},
}


TOKEN_VOLUME_SPEC: Final[dict[str, Any]] = {
    "name": TOKEN_VOLUME,
    "projected": {
        "sources": [
            {
                "serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": 3600,
                    "path": "token",
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


# --- the mutating admission webhook ----------------------------------------------------


def _patch(before: dict[str, Any], after: dict[str, Any], base: str) -> list[dict[str, Any]]:
    # JSON Patch "add" replaces an existing member, so one op per changed field suffices.
    ops: list[dict[str, Any]] = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            ops.append({"op": "remove", "path": f"{base}/{key}"})
        elif before.get(key) != after[key]:
            ops.append({"op": "add", "path": f"{base}/{key}", "value": after[key]})
    return ops


def review(request_review: dict[str, Any], config: InjectConfig) -> dict[str, Any]:
    """An AdmissionReview (admission.k8s.io/v1) for a Pod → the response with its patch.

    Injection problems are answered with ``allowed: false`` and the reason, so ``kubectl``
    shows why a pod was refused instead of starting it unprotected.
    """
    request = request_review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    pod = request.get("object") or {}
    if request.get("kind", {}).get("kind", "Pod") != "Pod" or request.get("operation") not in (
        None,
        "CREATE",
    ):
        return _envelope(request_review, response)
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    # Pods created by a controller carry generateName only; their owner names the service.
    owners = meta.get("ownerReferences") or []
    owner = owners[0].get("name") if owners else None
    try:
        new_meta, new_spec = inject_pod(meta, spec, config, owner_name=owner)
    except InjectionError as err:
        response.update(allowed=False, status={"code": 400, "message": f"modelguard: {err}"})
        return _envelope(request_review, response)
    ops = _patch(meta, new_meta, "/metadata") + _patch(spec, new_spec, "/spec")
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return _envelope(request_review, response)


def _envelope(request_review: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": request_review.get("apiVersion", "admission.k8s.io/v1"),
        "kind": "AdmissionReview",
        "response": response,
    }


class ReloadingCertificate:
    """The webhook's serving certificate, re-read when its files change.

    cert-manager renews the certificate in the Secret and the kubelet swaps the mounted
    files; a server that read them once would serve the expired certificate and, with
    ``failurePolicy: Fail``, stop pod creation in injected namespaces. Each TLS handshake
    checks the files' identity (inode, size, modification time: a stat, microseconds) and
    switches the connection to a context built from the new files. A broken pair (the
    kubelet mid-swap) keeps the last good one.
    """

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._lock = threading.Lock()
        self._stamp = self._files()
        self.context = self._load()
        self.context.sni_callback = self._on_handshake
        self.reloads = 0

    def _files(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert_file, self.key_file):
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def current(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = self._files()
                if stamp != self._stamp:
                    context = self._load()
                    context.sni_callback = self._on_handshake
                    self.context, self._stamp = context, stamp
                    self.reloads += 1
                    log.info("webhook certificate reloaded from %s", self.cert_file)
            except (OSError, ssl.SSLError) as err:
                log.error("webhook certificate %s: %s; serving the last one", self.cert_file, err)
            return self.context

    def _on_handshake(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any
    ) -> None:
        context = self.current()
        if connection.context is not context:
            connection.context = context

    def wrap(self, sock: Any) -> Any:
        return self.context.wrap_socket(sock, server_side=True)


class InjectionWebhook:
    """HTTPS server: ``POST /inject`` (AdmissionReview), ``GET /healthz`` and ``/readyz``.

    It runs in its own thread: admission requests are few, and a blocked asyncio loop must
    never fail pod creation. ``ready`` says whether the control plane has synced.
    """

    def __init__(
        self,
        config: InjectConfig,
        host: str,
        port: int,
        cert_file: str | None,
        key_file: str | None,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.config = config
        self.ready = ready
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("webhook: " + format, *args)

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._reply(200, b"ok\n")
                elif self.path == "/readyz":
                    ok = webhook.ready()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"not synced\n")
                else:
                    self._reply(404, b"not found\n")

            def do_POST(self) -> None:
                if self.path.split("?")[0] != "/inject":
                    self._reply(404, b"not found\n")
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = json.loads(self.rfile.read(length))
                    if not isinstance(body, dict):
                        raise ValueError("not an AdmissionReview")
                except ValueError as err:
                    self._reply(400, f"bad request: {err}\n".encode())
                    return
                answer = review(body, webhook.config)
                self._reply(200, json.dumps(answer).encode(), "application/json")

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.certificates: ReloadingCertificate | None = None
        if cert_file and key_file:
            self.certificates = ReloadingCertificate(cert_file, key_file)
            self._server.socket = self.certificates.wrap(self._server.socket)
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="inject-webhook", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


# --- CLI: `modelguard inject -f FILE` --------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = InjectConfig()
    parser.add_argument("-f", "--filename", required=True, help="manifest to inject ('-': stdin)")
    parser.add_argument("-o", "--output", help="write to FILE instead of stdout")
    parser.add_argument(
        "--xds",
        default=defaults.xds_address,
        metavar="HOST:PORT",
        help="control plane address as sidecars reach it",
    )
    parser.add_argument("--image", default=defaults.image, help="Envoy image of the sidecar")
    parser.add_argument("--inbound-port", type=int, default=defaults.inbound_port)
    parser.add_argument("--trust-domain", default=defaults.trust_domain)
    parser.add_argument(
        "--outbound-port",
        type=int,
        default=defaults.outbound_port,
        help="egress port of sidecars in pods annotated modelguard.io/egress: enabled",
    )
    parser.add_argument(
        "--egress-image", default=defaults.egress_image, help="image of the egress init container"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="for a control plane run --insecure: plaintext xDS, no service-account token",
    )


def config_from_args(args: argparse.Namespace) -> InjectConfig:
    parse_hostport(args.xds)  # a clear error now, not a broken sidecar later
    return InjectConfig(
        xds_address=args.xds,
        image=args.image,
        inbound_port=args.inbound_port,
        trust_domain=args.trust_domain,
        outbound_port=args.outbound_port,
        egress_image=args.egress_image,
        identity=not args.insecure,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
        out = inject_yaml(text, config)
    except (OSError, yaml.YAMLError, InjectionError, argparse.ArgumentTypeError) as err:
        print(f"modelguard inject: {args.filename}: {err}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(out)
    else:
        sys.stdout.write(out)
    return 0
