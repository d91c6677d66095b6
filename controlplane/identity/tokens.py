"""Sidecar authentication: a sidecar proves who it is before it is given an identity.

Two ways, behind one interface (``SidecarAuthenticator``):

* **Bootstrap tokens** (the embedded default). ``modelguard bootstrap`` writes a token
  beside the sidecar's bootstrap; Envoy sends it as ``authorization: Bearer <token>`` on
  every call through the control-plane cluster (ADS, rate limit, RLQS, OTLP, the query
  feed). A token is an HMAC over the node id and the SPIFFE ID with a key only the control
  plane (and whoever may run ``modelguard bootstrap``) can read, so a token is bound to one
  sidecar: it cannot be replayed to claim another node id or another identity, and the
  control plane stores nothing per sidecar. The token names the node id, SPIFFE ID,
  service and namespace it was issued for (``mgt3``), so a call that carries no node (a
  rate limit request, an OTLP export) still says who made it (``identify``), and a token
  cannot claim another workload's service (its listener, its policies) even within its own
  identity. Older tokens (``mgt2``, ``mgt1``) bind the service and namespace their SPIFFE
  ID names (``/ns/<namespace>/sa/<service>``) and nothing else.
* **Kubernetes service-account tokens** (in a cluster): see ``kubernetes.py``.

A sidecar that fails gets nothing: the ADS stream is refused before any resource or
certificate is sent, and the refusal is logged. Any other call on the xDS port is refused
with UNAUTHENTICATED by ``interceptor.SidecarAuthInterceptor``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.contracts.trust_bundle import AUTHORIZATION
from controlplane.identity.ca import write_private

TOKEN_KEY_FILE = "bootstrap-token.key"
# gRPC metadata keys that carry the sidecar's credential: the older form (ADS
# initial_metadata of bootstraps written before every service was authenticated; tools)
# and the header Envoy's credential injector puts on every call.
TOKEN_METADATA = "x-modelguard-token"
AUTHORIZATION_METADATA = AUTHORIZATION  # the header the sidecar puts its token in
_LEGACY = "mgt1"  # HMAC only: proves a node it does not name (ADS carries the node)
_V2 = "mgt2"  # names its node id and SPIFFE ID, so any call can be authenticated
_VERSION = "mgt3"  # also names the service and namespace it may claim


class AuthenticationError(Exception):
    """A sidecar that could not prove who it is. The message is safe to log and return."""


@dataclass(frozen=True)
class Caller:
    """Who made a call, as its credential proves it."""

    identity: str  # SPIFFE ID
    # The node ids the credential is bound to; None: it binds none (a service-account
    # token not bound to a pod), so the caller may speak for any sidecar of its identity.
    node_ids: frozenset[str] | None
    # The workload (service, namespace) the credential may claim; None: any of its identity.
    workload: tuple[str, str] | None = None

    def is_node(self, node_id: str) -> bool:
        return self.node_ids is None or node_id in self.node_ids


def credential(metadata: Mapping[str, str]) -> str | None:
    """The sidecar's token from either header form (Bearer first: Envoy's injector)."""
    scheme, _, token = metadata.get(AUTHORIZATION_METADATA, "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return metadata.get(TOKEN_METADATA) or None


class SidecarAuthenticator(Protocol):
    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        """Return if ``sidecar`` proved its node id and identity; raise AuthenticationError."""
        ...

    def identify(self, metadata: Mapping[str, str]) -> Caller:
        """Who the credential in ``metadata`` proves the caller is; raise
        AuthenticationError. For calls that carry no node (every service but ADS)."""
        ...


class BootstrapTokens:
    """Issues and checks per-sidecar bootstrap tokens."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("bootstrap token key must be at least 16 bytes")
        self._key = key

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str]) -> BootstrapTokens:
        path = Path(directory) / TOKEN_KEY_FILE
        if path.exists():
            return cls(base64.b64decode(path.read_text().strip()))
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        write_private(path, base64.b64encode(key).decode() + "\n")
        return cls(key)

    def _mac(self, version: str, *fields: str) -> str:
        message = "\0".join((version, *fields)).encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return _b64(digest)

    def issue(
        self, node_id: str, spiffe_id: str, service: str = "", namespace: str = ""
    ) -> str:
        """A token for one sidecar: its node id, SPIFFE ID, service and namespace (by
        default the ones its SPIFFE ID names)."""
        default_service, default_namespace = workload_of(spiffe_id)
        fields = (node_id, spiffe_id, service or default_service, namespace or default_namespace)
        mac = self._mac(_VERSION, *fields)
        return ".".join((_VERSION, *(_b64(f.encode()) for f in fields), mac))

    def _claims(self, token: str) -> tuple[str, str, str, str] | None:
        """(node id, SPIFFE ID, service, namespace) of a genuine token, else None."""
        parts = token.split(".")
        shape = (len(parts), parts[0])
        if shape not in ((6, _VERSION), (4, _V2)):
            return None
        try:
            fields = tuple(_unb64(p).decode() for p in parts[1:-1])
        except (ValueError, UnicodeDecodeError):
            return None
        if not _same(parts[-1], self._mac(parts[0], *fields)):
            return None
        if len(fields) == 2:  # mgt2: the workload its SPIFFE ID names
            fields = (*fields, *workload_of(fields[1]))
        node_id, spiffe_id, service, namespace = fields
        return node_id, spiffe_id, service, namespace

    def verify(
        self, token: str, node_id: str, spiffe_id: str, service: str = "", namespace: str = ""
    ) -> bool:
        claimed = (service, namespace) if service or namespace else workload_of(spiffe_id)
        if token.startswith(f"{_LEGACY}."):
            mac = token.partition(".")[2]
            return (
                _same(mac, self._mac(_LEGACY, node_id, spiffe_id))
                and claimed == workload_of(spiffe_id)
            )
        return self._claims(token) == (node_id, spiffe_id, *claimed)

    def identify(self, metadata: Mapping[str, str]) -> Caller:
        token = credential(metadata)
        if not token:
            raise AuthenticationError("no bootstrap token (authorization metadata)")
        claims = self._claims(token)
        if claims is None:
            if token.startswith(f"{_LEGACY}."):
                raise AuthenticationError(
                    "bootstrap token predates authenticated services: re-run "
                    "modelguard bootstrap"
                )
            raise AuthenticationError("bootstrap token is not valid")
        return Caller(
            identity=claims[1], node_ids=frozenset({claims[0]}), workload=(claims[2], claims[3])
        )

    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        token = credential(metadata)
        if not token:
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: no bootstrap token ({AUTHORIZATION_METADATA} "
                f"or {TOKEN_METADATA} metadata)"
            )
        if not self.verify(
            token, sidecar.node_id, sidecar.identity, sidecar.service, sidecar.namespace
        ):
            # Never echo the token: it is a credential.
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: bootstrap token is not valid for this node id, "
                f"identity {sidecar.identity} and workload {sidecar.service}.{sidecar.namespace}"
            )


class AnyOf:
    """Accepts a sidecar that any of the authenticators accepts (tokens or Kubernetes)."""

    def __init__(self, *authenticators: SidecarAuthenticator) -> None:
        self.authenticators = authenticators

    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        reasons = []
        for authenticator in self.authenticators:
            try:
                authenticator.authenticate(sidecar, metadata)
                return
            except AuthenticationError as err:
                reasons.append(str(err))
        raise AuthenticationError("; ".join(reasons) or "no authenticator configured")

    def identify(self, metadata: Mapping[str, str]) -> Caller:
        reasons = []
        for authenticator in self.authenticators:
            try:
                return authenticator.identify(metadata)
            except AuthenticationError as err:
                reasons.append(str(err))
        raise AuthenticationError("; ".join(reasons) or "no authenticator configured")


def workload_of(spiffe_id: str) -> tuple[str, str]:
    """(service, namespace) a SPIFFE ID names (``spiffe://<td>/ns/<ns>/sa/<sa>``), or
    ("", "") for another shape (which then matches no sidecar's claim)."""
    parts = spiffe_id.removeprefix("spiffe://").split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[4], parts[2]
    return "", ""


def _same(given: str, expected: str) -> bool:
    # Bytes: compare_digest refuses non-ASCII str, and a token is untrusted input.
    return hmac.compare_digest(given.encode(), expected.encode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
