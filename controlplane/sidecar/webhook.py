"""The mutating admission webhook: Kubernetes sends each new pod (AdmissionReview), the
webhook answers with the JSON patch ``inject.inject_pod`` makes; its serving certificate is
re-read when it rotates."""

from __future__ import annotations

import base64
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from controlplane.sidecar.bootstrap import STATS_PATH as STATS_PATH
from controlplane.sidecar.bootstrap import STATS_PORT as STATS_PORT
from controlplane.sidecar.inject import InjectConfig, InjectionError, inject_pod

log = logging.getLogger(__name__)


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


