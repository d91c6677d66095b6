"""Sidecar authentication: a sidecar proves who it is before it is given an identity.

Two ways, behind one interface (``SidecarAuthenticator``):

* **Bootstrap tokens** (the embedded default). ``modelguard bootstrap`` writes a token
  into the sidecar's bootstrap; the sidecar sends it as gRPC metadata on its ADS stream.
  A token is an HMAC over the node id and the SPIFFE ID with a key only the control plane
  (and whoever may run ``modelguard bootstrap``) can read, so a token is bound to one
  sidecar: it cannot be replayed to claim another node id or another identity, and the
  control plane stores nothing per sidecar.
* **Kubernetes service-account tokens** (in a cluster): see ``kubernetes.py``.

A sidecar that fails gets nothing: the ADS stream is refused before any resource or
certificate is sent, and the refusal is logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from controlplane.identity.ca import _write_private
from controlplane.inventory import Sidecar

TOKEN_KEY_FILE = "bootstrap-token.key"
# gRPC metadata key of the ADS stream that carries the sidecar's credential.
TOKEN_METADATA = "x-modelguard-token"
_VERSION = "mgt1"


class AuthenticationError(Exception):
    """A sidecar that could not prove who it is. The message is safe to log and return."""


class SidecarAuthenticator(Protocol):
    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        """Return if ``sidecar`` proved its node id and identity; raise AuthenticationError."""
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
        _write_private(path, base64.b64encode(key).decode() + "\n")
        return cls(key)

    def _mac(self, node_id: str, spiffe_id: str) -> str:
        message = f"{_VERSION}\0{node_id}\0{spiffe_id}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, node_id: str, spiffe_id: str) -> str:
        return f"{_VERSION}.{self._mac(node_id, spiffe_id)}"

    def verify(self, token: str, node_id: str, spiffe_id: str) -> bool:
        version, _, mac = token.partition(".")
        return version == _VERSION and hmac.compare_digest(mac, self._mac(node_id, spiffe_id))

    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        token = metadata.get(TOKEN_METADATA)
        if not token:
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: no bootstrap token ({TOKEN_METADATA} metadata)"
            )
        if not self.verify(token, sidecar.node_id, sidecar.identity):
            # Never echo the token: it is a credential.
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: bootstrap token is not valid for this node id "
                f"and identity {sidecar.identity}"
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
