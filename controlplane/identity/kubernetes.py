"""Sidecar authentication in a cluster: Kubernetes projected service-account tokens.

Design (the sidecar injector mounts the token; see the README section "Identity"):

* The injected pod gets a projected service-account token with audience ``modelguard`` at
  ``/var/run/secrets/modelguard/token`` (``TOKEN_PATH``). The sidecar presents it on its ADS
  stream as ``authorization: Bearer <token>`` gRPC metadata.
* The control plane asks the API server whether the token is genuine with a TokenReview
  (``authentication.k8s.io/v1``) for audience ``modelguard``: the API server checks the
  signature, the expiry, the audience, and that the pod it was bound to still exists.
* The reviewed user ``system:serviceaccount:<ns>:<sa>`` must be exactly the identity the
  sidecar claims in its node metadata (``spiffe://<td>/ns/<ns>/sa/<sa>``), and, when the API
  server reports the pod the token is bound to, the node id must name that pod
  (``<pod>.<ns>`` or ``<pod>``). So a pod can only ever obtain its own service account's SVID.
* Reviews are cached for a short time by the token's hash (sidecars reconnect in bursts
  after a control-plane restart); a token is never logged.
* The xDS server's authentication hook is synchronous and runs on the asyncio loop, so in
  the control plane (``background=True``) a token not reviewed yet is reviewed in a thread
  and the hook answers *pending*: the stream awaits (up to 3 s, polling the cache) without
  blocking the loop, then goes on or is refused. The loop never waits on the API server,
  and an API server that is down costs refusals, not a stalled control plane. Failures are cached
  briefly too, so a sidecar with a bad token cannot make us flood the API server.

How the token reaches Envoy (``sidecar.bootstrap.sidecar_xds_auth``, used by the injector): gRPC
``initial_metadata`` is static, and the kubelet rewrites the projected token before it
expires (at 80% of ``expirationSeconds``). So the xDS cluster carries an *upstream*
``credential_injector`` filter whose generic secret comes from a file-based SDS source
(``xds-token.sds.yaml`` in the trust-bundle ConfigMap) that names the token file and
watches the token's directory: every new stream, e.g. a reconnect hours later, carries
the token as it is on disk then, as ``authorization: Bearer <token>``. The control plane
checks the token when a stream opens; an open stream is not cut when its token expires
(as with Istio), the next one needs a valid token.

The trust bundle: the control plane (the status-writing replica) publishes the CA root
in a ConfigMap ``modelguard-ca-root`` in every namespace it watches (``TrustBundle``),
as istiod does with ``istio-ca-root-cert``; injected sidecars mount it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import yaml

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.contracts.trust_bundle import AUTHORIZATION, TOKEN_AUDIENCE, token_sds_document
from controlplane.contracts.trust_bundle import ROOT_CERT_KEY as ROOT_CERT_KEY
from controlplane.contracts.trust_bundle import TOKEN_DIR as TOKEN_DIR
from controlplane.contracts.trust_bundle import TOKEN_PATH as TOKEN_PATH
from controlplane.contracts.trust_bundle import TOKEN_SDS_KEY as TOKEN_SDS_KEY
from controlplane.contracts.trust_bundle import TRUST_BUNDLE_CONFIGMAP as TRUST_BUNDLE_CONFIGMAP
from controlplane.contracts.trust_bundle import TRUST_BUNDLE_DIR as TRUST_BUNDLE_DIR
from controlplane.identity.tokens import AuthenticationError, Caller

log = logging.getLogger(__name__)

AUDIENCE = TOKEN_AUDIENCE  # what the injected pods' projected tokens are minted for
AUTHORIZATION_METADATA = AUTHORIZATION  # the header the sidecar puts its token in
_POD_NAME = "authentication.kubernetes.io/pod-name"

# The CA Secret every replica loads (cert-manager's shape, so either can produce it).
CA_SECRET: Final = "modelguard-ca"
CA_SECRET_CERT, CA_SECRET_KEY = "tls.crt", "tls.key"


class AuthenticationPending(AuthenticationError):
    """The token is being reviewed; the sidecar's next attempt gets the answer."""


_Review = tuple[str, str | None] | AuthenticationError


class KubernetesTokenAuthenticator:
    """Checks projected service-account tokens with TokenReview.

    ``api`` is a ``kubernetes.client.AuthenticationV1Api`` (any object with
    ``create_token_review(body, **kwargs)`` returning a V1TokenReview works).
    ``background``: review in a thread and answer *pending* meanwhile (the control plane);
    otherwise review inline (tests, tools).
    """

    def __init__(
        self,
        api: Any,
        *,
        trust_domain: str = "cluster.local",
        audience: str = AUDIENCE,
        cache_seconds: float = 60.0,
        failure_cache_seconds: float = 5.0,
        background: bool = False,
        request_timeout: float = 5.0,
    ) -> None:
        self.api = api
        self.trust_domain = trust_domain
        self.audience = audience
        self.cache_seconds = cache_seconds
        self.failure_cache_seconds = failure_cache_seconds
        self.request_timeout = request_timeout
        self.reviews = 0  # TokenReviews sent (tests and metrics)
        self._cache: dict[str, tuple[float, _Review]] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="tokenreview")
            if background
            else None
        )

    def _ask(self, token: str) -> _Review:
        """One TokenReview: (username, bound pod or None), or why the token is refused."""
        from kubernetes import client  # imported lazily: only cluster mode needs it

        body = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience])
        )
        self.reviews += 1
        try:
            review = self.api.create_token_review(
                body, _request_timeout=(self.request_timeout, self.request_timeout)
            )
        except Exception as err:  # the API server is down or refuses us: fail closed
            return AuthenticationError(f"TokenReview failed: {type(err).__name__}")
        status = review.status
        if status is None or not status.authenticated:
            reason = (status.error if status is not None else None) or "not authenticated"
            return AuthenticationError(f"service-account token rejected: {reason}")
        if status.audiences and self.audience not in status.audiences:
            return AuthenticationError(
                f"service-account token is not for audience {self.audience}"
            )
        user = status.user
        username = (user.username if user is not None else None) or ""
        extra = (user.extra if user is not None else None) or {}
        pods = extra.get(_POD_NAME) or []
        return username, (pods[0] if pods else None)

    def _remember(self, key: str, result: _Review) -> None:
        ttl = self.failure_cache_seconds if isinstance(result, Exception) else self.cache_seconds
        with self._lock:
            self._cache[key] = (time.monotonic() + ttl, result)
            self._pending.discard(key)
            if len(self._cache) > 10_000:  # expired entries go first; a bound, not a policy
                now = time.monotonic()
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}

    def _review(self, token: str) -> tuple[str, str | None]:
        """(username, bound pod name or None) of a genuine token; AuthenticationError if not."""
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > time.monotonic():
                result = cached[1]
            elif self._executor is not None:
                if key not in self._pending:
                    self._pending.add(key)
                    self._executor.submit(lambda: self._remember(key, self._ask(token)))
                raise AuthenticationPending("service-account token review pending; retry")
            else:
                result = None
        if result is None:
            result = self._ask(token)
            self._remember(key, result)
        if isinstance(result, AuthenticationError):
            raise type(result)(str(result))  # a fresh one: the cached one is shared
        return result

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _account(self, metadata: Mapping[str, str], who: str) -> tuple[str, str, str | None]:
        """(namespace, service account, bound pod or None) of the call's genuine token."""
        header = metadata.get(AUTHORIZATION_METADATA, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(f"{who}no service-account token (authorization metadata)")
        if token.strip().startswith("mgt"):
            # A bootstrap token (AnyOf tries those first): no TokenReview for it.
            raise AuthenticationError(f"{who}not a service-account token")
        username, pod = self._review(token.strip())
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise AuthenticationError(f"{who}token of {username!r} is not a service account's")
        return parts[2], parts[3], pod

    def identify(self, metadata: Mapping[str, str]) -> Caller:
        namespace, account, pod = self._account(metadata, "")
        return Caller(
            identity=f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{account}",
            node_ids=frozenset({pod, f"{pod}.{namespace}"}) if pod is not None else None,
        )

    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        namespace, account, pod = self._account(metadata, f"node {sidecar.node_id!r}: ")
        expected = f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{account}"
        if sidecar.identity != expected:
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: claims {sidecar.identity} but its token is "
                f"service account {namespace}/{account}"
            )
        if sidecar.namespace != namespace:
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: claims namespace {sidecar.namespace} but its token "
                f"is from namespace {namespace}"
            )
        if pod is not None and sidecar.node_id not in (pod, f"{pod}.{namespace}"):
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: its token is bound to pod {namespace}/{pod}"
            )


def trust_bundle_data(root_pem: str, token_path: str = TOKEN_PATH) -> dict[str, str]:
    """The data of the trust-bundle ConfigMap: the CA root and the token's SDS source."""
    return {
        ROOT_CERT_KEY: root_pem,
        TOKEN_SDS_KEY: yaml.safe_dump(token_sds_document(token_path), sort_keys=False),
    }


# ---- the trust bundle, published into namespaces -------------------------------------------


class TrustBundle:
    """Keeps ``modelguard-ca-root`` in every namespace (or the given ones) equal to the CA.

    Runs in a thread; writes only while ``is_leader()`` (one writer, like status). Creates
    the ConfigMap where it is missing and patches it where it differs, nothing else.
    """

    def __init__(
        self,
        api_client: Any,
        root_pem: str,
        *,
        namespaces: Iterable[str] | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        interval: float = 30.0,
    ) -> None:
        from kubernetes import client

        self.api = client.CoreV1Api(api_client)
        self.data = trust_bundle_data(root_pem)
        self.namespaces = tuple(namespaces) if namespaces is not None else None
        self.is_leader = is_leader
        self.interval = interval
        self.writes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _targets(self) -> list[str]:
        if self.namespaces is not None:
            return list(self.namespaces)
        listing = self.api.list_namespace(_request_timeout=(5, 30))
        return sorted(str(ns.metadata.name) for ns in listing.items if ns.metadata)

    def sync(self) -> int:
        """One pass; returns how many ConfigMaps were written."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        written = 0
        for namespace in self._targets():
            if not self.is_leader():
                break
            try:
                try:
                    current = self.api.read_namespaced_config_map(
                        TRUST_BUNDLE_CONFIGMAP, namespace, _request_timeout=(5, 10)
                    )
                except ApiException as err:
                    if err.status != 404:
                        raise
                    body = client.V1ConfigMap(
                        metadata=client.V1ObjectMeta(
                            name=TRUST_BUNDLE_CONFIGMAP,
                            namespace=namespace,
                            labels={"app.kubernetes.io/managed-by": "modelguard"},
                        ),
                        data=self.data,
                    )
                    self.api.create_namespaced_config_map(
                        namespace, body, _request_timeout=(5, 10)
                    )
                else:
                    have = current.data or {}
                    # Only our keys: whatever else someone put there is theirs to keep.
                    if all(have.get(k) == v for k, v in self.data.items()):
                        continue
                    self.api.patch_namespaced_config_map(
                        TRUST_BUNDLE_CONFIGMAP,
                        namespace,
                        {"data": self.data},
                        _request_timeout=(5, 10),
                    )
            except ApiException as err:
                log.warning("trust bundle in namespace %s: %s", namespace, err.reason)
                continue
            written += 1
            log.info("trust bundle published in namespace %s", namespace)
        self.writes += written
        return written

    def start(self) -> None:
        def run() -> None:
            while not self._stop.is_set():
                try:
                    if self.is_leader():
                        self.sync()
                except Exception as err:  # the API server comes back; so do we
                    log.warning("trust bundle: %s", err)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, name="k8s-trust-bundle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ---- `modelguard ca init`: the CA every replica shares -------------------------------------


def ca_secret(
    cert_pem: str, key_pem: str, *, namespace: str = "modelguard-system", name: str = CA_SECRET
) -> dict[str, Any]:
    """The CA as a ``kubernetes.io/tls`` Secret, the shape cert-manager writes too."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "modelguard"},
        },
        "data": {
            CA_SECRET_CERT: b64(cert_pem),
            CA_SECRET_KEY: b64(key_pem),
            "ca.crt": b64(cert_pem),
        },
    }
