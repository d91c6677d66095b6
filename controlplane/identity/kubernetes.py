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
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping
from typing import Any

from controlplane.identity.tokens import AuthenticationError
from controlplane.inventory import Sidecar

AUDIENCE = "modelguard"
TOKEN_PATH = "/var/run/secrets/modelguard/token"
AUTHORIZATION_METADATA = "authorization"
_POD_NAME = "authentication.kubernetes.io/pod-name"


class KubernetesTokenAuthenticator:
    """Checks projected service-account tokens with TokenReview.

    ``api`` is a ``kubernetes.client.AuthenticationV1Api`` (any object with
    ``create_token_review(body)`` returning a V1TokenReview works, e.g. one pointed at kmock).
    """

    def __init__(
        self,
        api: Any,
        *,
        trust_domain: str = "cluster.local",
        audience: str = AUDIENCE,
        cache_seconds: float = 60.0,
    ) -> None:
        self.api = api
        self.trust_domain = trust_domain
        self.audience = audience
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, str, str | None]] = {}
        self._lock = threading.Lock()

    def _review(self, token: str) -> tuple[str, str | None]:
        """(username, bound pod name or None) of a genuine token; AuthenticationError if not."""
        from kubernetes import client  # imported lazily: only cluster mode needs it

        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > now:
                return cached[1], cached[2]
        body = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[self.audience])
        )
        try:
            review = self.api.create_token_review(body)
        except Exception as err:  # the API server is down or refuses us: fail closed
            raise AuthenticationError(f"TokenReview failed: {type(err).__name__}") from err
        status = review.status
        if status is None or not status.authenticated:
            reason = (status.error if status is not None else None) or "not authenticated"
            raise AuthenticationError(f"service-account token rejected: {reason}")
        if status.audiences and self.audience not in status.audiences:
            raise AuthenticationError(f"service-account token is not for audience {self.audience}")
        user = status.user
        username = (user.username if user is not None else None) or ""
        extra = (user.extra if user is not None else None) or {}
        pods = extra.get(_POD_NAME) or []
        pod = pods[0] if pods else None
        with self._lock:
            self._cache[key] = (now + self.cache_seconds, username, pod)
        return username, pod

    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        header = metadata.get(AUTHORIZATION_METADATA, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: no service-account token (authorization metadata)"
            )
        username, pod = self._review(token.strip())
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: token of {username!r} is not a service account's"
            )
        namespace, account = parts[2], parts[3]
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
