"""The trust bundle an injected sidecar mounts, and the token SDS document.

The control plane writes them (``identity.kubernetes.TrustBundle``: a ConfigMap in every
namespace; ``sidecar.bootstrap.write_bootstrap``: a file beside a bootstrap), and the
sidecar's bootstrap reads them (``sidecar.bootstrap``: the CA root as the xDS cluster's
trusted CA; the token's file-SDS source as the credential injector's secret). The names
both ends must agree on are here, once.
"""

from __future__ import annotations

import os
from typing import Any, Final

TLS_TYPE: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"

# The injected pod's projected service-account token: its audience (what the control
# plane's TokenReview asks for) and where it is mounted (what the SDS document names).
TOKEN_AUDIENCE: Final = "modelguard"
TOKEN_DIR: Final = "/var/run/secrets/modelguard"
TOKEN_FILE: Final = "token"
TOKEN_PATH: Final = f"{TOKEN_DIR}/{TOKEN_FILE}"
# The trust bundle ConfigMap (one per namespace) and what sidecars read from it.
TRUST_BUNDLE_CONFIGMAP: Final = "modelguard-ca-root"
TRUST_BUNDLE_DIR: Final = "/etc/modelguard/ca"
ROOT_CERT_KEY: Final = "root-cert.pem"
TOKEN_SDS_KEY: Final = "xds-token.sds.yaml"
# The generic secret holding the token: the projected service-account token (cluster mode)
# or a bootstrap token (``modelguard bootstrap -o``, the embedded default).
SA_TOKEN_SECRET: Final = "modelguard-sa-token"
BOOTSTRAP_TOKEN_SECRET: Final = "modelguard-xds-token"
# The header (gRPC metadata) the sidecar's credential injector puts the token in, as
# ``Bearer <token>``, and the control plane's authenticators read it from.
AUTHORIZATION: Final = "authorization"
BEARER_PREFIX: Final = "Bearer "


def token_sds_document(
    token_path: str | os.PathLike[str] = TOKEN_PATH, secret: str = SA_TOKEN_SECRET
) -> dict[str, Any]:
    """The file-based SDS source of the token secret: a DiscoveryResponse naming the file."""
    return {
        "resources": [
            {
                "@type": f"{TLS_TYPE}.Secret",
                "name": secret,
                "generic_secret": {"secret": {"filename": str(token_path)}},
            }
        ]
    }
