"""Envoy bootstrap for a modelguard sidecar.

The bootstrap is the only static configuration a sidecar gets: who it is (node id,
cluster, metadata from ``Sidecar.to_metadata()``), where its admin interface listens, and
how to reach the control plane over ADS. Everything else (listeners, clusters, secrets,
extension configs) arrives over xDS.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import yaml

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.contracts.trust_bundle import (
    AUTHORIZATION,
    BEARER_PREFIX,
    BOOTSTRAP_TOKEN_SECRET,
    ROOT_CERT_KEY,
    SA_TOKEN_SECRET,
    TLS_TYPE,
    TOKEN_DIR,
    TOKEN_SDS_KEY,
    TRUST_BUNDLE_DIR,
    token_sds_document,
)
from controlplane.translate.names import CONTROL_PLANE_CLUSTER

# The static cluster to the control plane; translated resources name it too.
XDS_CLUSTER = CONTROL_PLANE_CLUSTER

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# How fast a sidecar finds a restarted control plane again. Envoy's own default stream
# backoff (0.5 s doubling up to 30 s) can leave a sidecar unconfigured for many seconds;
# with these it retries every 0.25 to 1 s.
XDS_RETRY_BASE_INTERVAL = "0.25s"
XDS_RETRY_MAX_INTERVAL = "1s"
XDS_CONNECT_TIMEOUT = "1s"

# Batching of the OpenTelemetry tracer, which Envoy reads only from runtime: one export per
# 256 spans or per second. Envoy's default (one export per 5 spans) keeps 0.49 of a bare
# sidecar's throughput, this 0.63 (see BENCHMARKS.md). The admin layer lets an operator
# tune them live (POST /runtime_modify).
TELEMETRY_RUNTIME = {
    "tracing.opentelemetry.min_flush_spans": 256,
    "tracing.opentelemetry.flush_interval_ms": 1000,
}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def xds_cluster(xds_host: str, xds_port: int) -> dict[str, Any]:
    """The static cluster through which the sidecar reaches the control plane (gRPC, h2)."""
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        # An IP needs no resolver; a name (a Kubernetes Service) is re-resolved so a moved
        # control plane is found again.
        "type": "STATIC" if _is_ip(xds_host) else "STRICT_DNS",
        "connect_timeout": XDS_CONNECT_TIMEOUT,
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_PROTOCOL_OPTIONS}",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        # A control plane that vanished without a FIN (node lost, network
                        # partition) is noticed by PING timeouts, not after TCP's minutes.
                        "connection_keepalive": {"interval": "5s", "timeout": "2s"},
                    }
                },
            }
        },
        "upstream_connection_options": {
            "tcp_keepalive": {
                "keepalive_probes": 3,
                "keepalive_time": 10,
                "keepalive_interval": 2,
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": xds_host,
                                        "port_value": xds_port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if cluster["type"] == "STRICT_DNS":
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


# The secret (in the sidecar) that holds its token, and the files `modelguard bootstrap -o`
# writes beside the bootstrap: the token (0600) and the file-SDS source naming it.
TOKEN_SECRET = BOOTSTRAP_TOKEN_SECRET
TOKEN_SUFFIX = ".token"
TOKEN_SDS_SUFFIX = ".token.sds.yaml"
_TLS = TLS_TYPE


@dataclass(frozen=True)
class XdsCredentials:
    """How a sidecar proves itself to the control plane, and how it knows it is talking to
    the real one: its bootstrap token, the CA root, the control plane's SPIFFE ID.

    ``token_sds``: the file-SDS source the sidecar reads its token from (``write_bootstrap``
    writes it beside the bootstrap). None: the token is a static secret inline in the
    bootstrap (bootstraps built in memory: tests, ``modelguard run``, stdout)."""

    token: str = field(repr=False)
    ca_pem: str = field(repr=False)
    server_id: str
    token_sds: str | None = None

    @classmethod
    def for_sidecar(
        cls, sidecar: Sidecar, identity_dir: str | os.PathLike[str]
    ) -> XdsCredentials:
        """Credentials from the control plane's identity folder (``modelguard bootstrap``)."""
        from controlplane.identity.service import control_plane_id, root_pem
        from controlplane.identity.tokens import BootstrapTokens

        trust_domain = sidecar.identity.removeprefix("spiffe://").split("/", 1)[0]
        return cls(
            token=BootstrapTokens.load_or_create(identity_dir).issue(
                sidecar.node_id, sidecar.identity, sidecar.service, sidecar.namespace
            ),
            ca_pem=root_pem(identity_dir),
            server_id=control_plane_id(trust_domain),
        )


def with_credentials(
    bootstrap: dict[str, Any], credentials: XdsCredentials | None
) -> dict[str, Any]:
    """Every call through the control-plane cluster (ADS, rate limit, RLQS, OTLP, the query
    feed) goes over TLS (the server must show the control plane's SPIFFE ID, signed by our
    CA) and carries the sidecar's token as ``authorization: Bearer`` (an upstream credential
    injector, as the cluster-mode sidecars do)."""
    if credentials is None:
        return bootstrap
    secret: dict[str, Any] = {"name": TOKEN_SECRET}
    if credentials.token_sds is not None:
        sds = Path(credentials.token_sds)
        secret["sds_config"] = {
            "path_config_source": {
                "path": str(sds),
                # A token re-issued in place (written and renamed) is picked up live.
                "watched_directory": {"path": str(sds.parent)},
            },
            "resource_api_version": "V3",
        }
    else:
        bootstrap["static_resources"]["secrets"] = [
            {
                "name": TOKEN_SECRET,
                "generic_secret": {"secret": {"inline_string": credentials.token}},
            }
        ]
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] == XDS_CLUSTER:
            secure_xds_cluster(
                cluster,
                trusted_ca={"inline_string": credentials.ca_pem},
                server_id=credentials.server_id,
                credential=secret,
            )
    return bootstrap


# ---- cluster mode: xDS over TLS with the projected token (the injector's bootstrap) -----



def secure_xds_cluster(
    cluster: dict[str, Any],
    *,
    trusted_ca: dict[str, Any],
    server_id: str,
    credential: dict[str, Any],
) -> None:
    """Make the bootstrap's control-plane cluster speak TLS (the server must show
    ``server_id``, signed by ``trusted_ca``) and put the sidecar's token on every call.
    One mechanism for the embedded default (inline CA, token file) and cluster mode
    (mounted CA root, projected token)."""
    cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TLS}.UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": trusted_ca,
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"exact": server_id}}
                    ],
                },
            },
        },
    }
    options = cluster.setdefault("typed_extension_protocol_options", {}).setdefault(
        _HTTP_PROTOCOL_OPTIONS, {"@type": f"type.googleapis.com/{_HTTP_PROTOCOL_OPTIONS}"}
    )
    options["http_filters"] = token_injector_filters(credential)


def token_injector_filters(credential: dict[str, Any]) -> list[dict[str, Any]]:
    """Upstream HTTP filters of the control-plane cluster that put the sidecar's token
    (the generic secret ``credential`` names) on every call through it as
    ``authorization: Bearer <token>``: ADS, rate limit, RLQS, OTLP, the query feed."""
    return [
        {
            "name": "envoy.filters.http.credential_injector",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                "credential_injector.v3.CredentialInjector",
                "overwrite": True,
                # No token on disk: the stream fails here (401) instead of going out bare.
                "allow_request_without_credential": False,
                "credential": {
                    "name": "envoy.http.injected_credentials.generic",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.http."
                        "injected_credentials.generic.v3.Generic",
                        "credential": credential,
                        "header": AUTHORIZATION,
                        "header_value_prefix": BEARER_PREFIX,
                    },
                },
            },
        },
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http."
                "upstream_codec.v3.UpstreamCodec"
            },
        },
    ]


def sidecar_xds_auth(
    bootstrap: dict[str, Any],
    server_id: str,
    *,
    bundle_dir: str = TRUST_BUNDLE_DIR,
    token_dir: str = TOKEN_DIR,
    xds_cluster: str = "modelguard-xds",
) -> dict[str, Any]:
    """The bootstrap with xDS over TLS (trusting the mounted CA root, requiring the control
    plane's SPIFFE ID) and the projected token on every stream, re-read when it rotates."""
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] != xds_cluster:
            continue
        secure_xds_cluster(
            cluster,
            # Read at start: a new root reaches a sidecar when its pod restarts.
            trusted_ca={"filename": f"{bundle_dir}/{ROOT_CERT_KEY}"},
            server_id=server_id,
            credential={
                "name": SA_TOKEN_SECRET,
                "sds_config": {
                    "path_config_source": {
                        "path": f"{bundle_dir}/{TOKEN_SDS_KEY}",
                        # The kubelet swaps the token by renaming ..data in
                        # this directory: that move triggers the re-read.
                        "watched_directory": {"path": token_dir},
                    },
                    "resource_api_version": "V3",
                },
            },
        )
    return bootstrap


# The injected sidecar's Prometheus endpoint (the pod's scrape annotations name it).
STATS_PORT: Final = 15090
STATS_PATH: Final = "/stats/prometheus"


def add_stats_listener(bootstrap: dict[str, Any], admin_port: int) -> None:
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


ENVOY_ADMIN_KEY = "modelguard.io/envoy-admin"


def build_bootstrap(
    sidecar: Sidecar,
    *,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    cluster: str | None = None,
    delta: bool = False,
    credentials: XdsCredentials | None = None,
) -> dict[str, Any]:
    """An Envoy v3 bootstrap (plain dict) for ``sidecar``, configured entirely over ADS
    (state-of-the-world, or incremental with ``delta``; over TLS with a token when
    ``credentials`` are given)."""
    bootstrap: dict[str, Any] = {
        "node": {
            "id": sidecar.node_id,
            "cluster": cluster or f"{sidecar.service}.{sidecar.namespace}",
            # Where its admin interface listens, for `modelguard proxy-config`.
            "metadata": {**sidecar.to_metadata(), ENVOY_ADMIN_KEY: f"127.0.0.1:{admin_port}"},
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}},
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # For xDS streams this is the reconnect backoff.
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": XDS_RETRY_BASE_INTERVAL,
                                    "max_interval": XDS_RETRY_MAX_INTERVAL,
                                }
                            },
                        },
                    }
                ],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [xds_cluster(xds_host, xds_port)]},
        "layered_runtime": {
            "layers": [
                {"name": "modelguard", "static_layer": dict(TELEMETRY_RUNTIME)},
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
    return with_credentials(bootstrap, credentials)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-dicts out in full: Envoy configs read better without &anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_bootstrap(bootstrap: dict[str, Any]) -> str:
    """The bootstrap as YAML, in the order it was built (stable for golden files)."""
    return yaml.dump(bootstrap, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)


def write_bootstrap(
    path: str | os.PathLike[str],
    sidecar: Sidecar,
    *,
    xds_host: str,
    xds_port: int,
    admin_port: int,
    cluster: str | None = None,
    delta: bool = False,
    credentials: XdsCredentials | None = None,
) -> Path:
    """Build and write the bootstrap YAML atomically (a sidecar never reads half a file).

    With ``credentials``, the token goes into ``<stem>.token`` beside it (mode 0600) and the
    bootstrap reads it through file SDS (``<stem>.token.sds.yaml``): the bootstrap itself
    holds no secret."""
    target = Path(path)
    if credentials is not None:
        credentials = _token_files(target, credentials)
    text = render_bootstrap(
        build_bootstrap(
            sidecar,
            xds_host=xds_host,
            xds_port=xds_port,
            admin_port=admin_port,
            cluster=cluster,
            delta=delta,
            credentials=credentials,
        )
    )
    _write_atomic(target, text)
    return target


def _write_atomic(target: Path, text: str, mode: int | None = None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # before any byte of the secret is written
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _token_files(bootstrap_path: Path, credentials: XdsCredentials) -> XdsCredentials:
    """Write the token (0600) and its file-SDS source beside the bootstrap."""
    base = bootstrap_path.with_suffix("")
    token = base.with_name(base.name + TOKEN_SUFFIX).absolute()
    sds = base.with_name(base.name + TOKEN_SDS_SUFFIX).absolute()
    _write_atomic(token, credentials.token, mode=0o600)
    _write_atomic(sds, render_bootstrap(token_sds_document(token, TOKEN_SECRET)), mode=0o644)
    return replace(credentials, token_sds=str(sds))


# --- parsing an address ---------------------------------------------------------------


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); argparse-friendly errors."""
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port_text)
