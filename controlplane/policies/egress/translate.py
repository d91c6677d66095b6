"""EgressIR → the sidecar's outbound listener: default deny, allow-listed destinations.

One listener on 127.0.0.1:<outbound port> takes everything the workload sends outside.
The TLS inspector reads each connection's first bytes, then:

* TLS, by SNI, never terminated: an allowed server name gets its own filter chain that
  resolves that name itself (SNI dynamic forward proxy) and passes the bytes through, so
  a workload cannot name an allowed host and reach another address. Any other server
  name lands in the default TLS chain: a black hole (Enforce) or passed through and
  logged as ``would-block`` (Audit).
* Plain HTTP, by Host / :authority (an HTTP proxy: ``HTTP_PROXY`` style absolute URLs or
  plain requests with the real Host): mesh services first (the mesh listener's own
  virtual hosts, ``translate/mtls.py``, to their mTLS clusters: one code path for both
  listeners), then one virtual host per allowed destination, routed to the dynamic
  forward proxy; every other host hits the default virtual host whose per-route RBAC
  denies (Enforce) or only shadow-denies (Audit).

Every decision is one JSON access-log line (``"log": "modelguard.egress"``) on the
sidecar's stdout and, when telemetry is on, one OpenTelemetry log record to the control
plane (``EGRESS_ATTRIBUTES``: destination, verdict, deciding policy and rule), and is
counted: ``http.outbound_<port>.rbac.denied`` / ``shadow_denied`` for HTTP,
``tcp.outbound_tls_blocked.*`` / ``tcp.outbound_tls_audit.*`` for TLS.

Byte budgets are rejected by validation (``api/egress.py``): nothing in Envoy counts bytes
per destination over a window without a per-request call out of the data path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.clusters.dynamic_forward_proxy.v3 import cluster_pb2 as dfp_cluster_pb2
from envoy.extensions.common.dynamic_forward_proxy.v3 import dns_cache_pb2
from envoy.extensions.filters.http.dynamic_forward_proxy.v3 import (
    dynamic_forward_proxy_pb2 as dfp_http_pb2,
)
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.sni_dynamic_forward_proxy.v3 import (
    sni_dynamic_forward_proxy_pb2 as sni_dfp_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as upstream_http_pb2
from google.protobuf import duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from opentelemetry.proto.common.v1 import common_pb2

from controlplane.ir import SidecarIR
from controlplane.policies.access import mtls_translate as mesh
from controlplane.policies.egress.ir import EgressDestination, EgressIR, EgressProtocol
from controlplane.policies.egress.ir import of as egress_of
from controlplane.translate import names
from controlplane.translate.module import Module, Phase
from controlplane.translate.protos import ads_source, pack, socket_address
from controlplane.translate.telemetry import ACCESS_LOG_BUFFER_BYTES
from controlplane.xds import resources as rt

FORWARD_PROXY_CLUSTER = "outbound|dynamic-forward-proxy"
BLACKHOLE_CLUSTER = "outbound|blackhole"
DNS_CACHE = "modelguard-egress"
RBAC_FILTER = "modelguard.egress.rbac"
METADATA_NAMESPACE = "modelguard.egress"  # route metadata the access log reads
DEFAULT_DENY = "default-deny"
TLS_DEFAULT_PORT = 443

MESH = "mesh"  # who decides for a mesh service: the callee's own AccessPolicy

# Verdicts as the access log spells them.
ALLOWED, BLOCKED, WOULD_BLOCK = "allowed", "blocked", "would-block"

OTEL_ACCESS_LOGGER = "envoy.access_loggers.open_telemetry"
OTEL_LOG_NAME = "modelguard.egress"
# Stdout field → OpenTelemetry attribute. ``controlplane.telemetry.records`` reads the
# ``modelguard.egress.*`` names to derive ``modelguard.verdict`` (the receiver sets that
# one itself, so a record never carries it twice).
EGRESS_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("protocol", "modelguard.egress.protocol"),
    ("destination", "modelguard.egress.destination"),
    ("verdict", "modelguard.egress.verdict"),
    ("policy", "modelguard.policy"),
    ("rule", "modelguard.egress.rule"),
    # The sidecar's outbound listener; the destination's port is the next one (the port
    # the sidecar dialled: none when the destination was refused).
    ("outbound_port", "modelguard.egress.listener.port"),
    ("port", "modelguard.egress.port"),
    ("method", "http.request.method"),
    ("path", "url.path"),
    ("code", "http.response.status_code"),
    ("details", "envoy.response_code_details"),
    ("bytes_out", "envoy.bytes_received"),
    ("bytes_in", "envoy.bytes_sent"),
    ("upstream", "envoy.upstream_host"),
    ("duration_ms", "envoy.duration_ms"),
)


def listener_name(egress: EgressIR) -> str:
    return f"outbound|{egress.port}"


def route_name(egress: EgressIR) -> str:
    return f"outbound|{egress.port}"


def deciding_policy(egress: EgressIR) -> str:
    """Who decides for a destination nothing allows: the policies' default deny, or the
    sidecar's own when no EgressPolicy targets it."""
    return ",".join(str(p) for p in egress.deciding) or DEFAULT_DENY


# --- shared pieces --------------------------------------------------------------------------


def _dns_cache() -> dns_cache_pb2.DnsCacheConfig:
    # One cache shared by the cluster and both filters (Envoy requires identical configs
    # under one name). IPv4 first: most egress targets and every loopback test are v4.
    return dns_cache_pb2.DnsCacheConfig(
        name=DNS_CACHE, dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED
    )


def _stdout_log(fields: dict[str, str]) -> accesslog_pb2.AccessLog:
    record = struct_pb2.Struct()
    record.update({"log": METADATA_NAMESPACE, "start_time": "%START_TIME%", **fields})
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.stdout",
        typed_config=pack(
            stream_pb2.StdoutAccessLog(
                log_format=substitution_format_string_pb2.SubstitutionFormatString(
                    json_format=record
                )
            )
        ),
    )


def _text(value: str) -> common_pb2.AnyValue:
    return common_pb2.AnyValue(string_value=value)


def _otel_log(ir: SidecarIR, fields: dict[str, str], body: str) -> accesslog_pb2.AccessLog:
    # Same transport and batching as the inbound access logger (translate/telemetry.py):
    # records reach the control plane's OTLP receiver over the bootstrap's cluster.
    attributes = [
        common_pb2.KeyValue(key=attribute, value=_text(fields[field]))
        for field, attribute in EGRESS_ATTRIBUTES
        if field in fields
    ]
    config = logs_service_pb2.OpenTelemetryAccessLogConfig(
        # xds-protos lacks the top-level log_name/grpc_service; Envoy 1.40 reads these.
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=OTEL_LOG_NAME,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
                    cluster_name=names.CONTROL_PLANE_CLUSTER
                ),
                timeout=duration_pb2.Duration(seconds=5),
            ),
            transport_api_version=config_source_pb2.ApiVersion.V3,
            buffer_flush_interval=duration_pb2.Duration(seconds=1),
            buffer_size_bytes=wrappers_pb2.UInt32Value(value=ACCESS_LOG_BUFFER_BYTES),
        ),
        resource_attributes=common_pb2.KeyValueList(
            values=[
                common_pb2.KeyValue(key="service.name", value=_text(ir.service)),
                common_pb2.KeyValue(key="service.namespace", value=_text(ir.namespace)),
                common_pb2.KeyValue(key="modelguard.node_id", value=_text(ir.node_id)),
            ]
        ),
        body=_text(body),
        attributes=common_pb2.KeyValueList(values=attributes),
        stat_prefix="modelguard_egress",
    )
    return accesslog_pb2.AccessLog(name=OTEL_ACCESS_LOGGER, typed_config=pack(config))


def _access_logs(ir: SidecarIR, fields: dict[str, str]) -> list[accesslog_pb2.AccessLog]:
    logs = [_stdout_log(fields)]
    if ir.telemetry is not None:
        body = f"egress {fields['verdict']} {fields['protocol']} {fields['destination']}"
        logs.append(_otel_log(ir, fields, body))
    return logs


def _tcp_fields(egress: EgressIR, verdict: str, policy: str, rule: str) -> dict[str, str]:
    return {
        "protocol": "TLS",
        "destination": "%REQUESTED_SERVER_NAME%",
        "verdict": verdict,
        "policy": policy,
        "rule": rule,
        "bytes_out": "%BYTES_RECEIVED%",
        "bytes_in": "%BYTES_SENT%",
        "upstream": "%UPSTREAM_HOST%",
        "duration_ms": "%DURATION%",
        "outbound_port": str(egress.port),
        "port": "%UPSTREAM_REMOTE_PORT%",
    }


def _http_fields(egress: EgressIR) -> dict[str, str]:
    meta = f"%METADATA(ROUTE:{METADATA_NAMESPACE}:{{}})%"
    return {
        "protocol": "HTTP",
        "destination": "%REQ(:AUTHORITY)%",
        "verdict": meta.format("verdict"),
        "policy": meta.format("policy"),
        "rule": meta.format("rule"),
        "method": "%REQ(:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "code": "%RESPONSE_CODE%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "bytes_out": "%BYTES_RECEIVED%",
        "bytes_in": "%BYTES_SENT%",
        "upstream": "%UPSTREAM_HOST%",
        "duration_ms": "%DURATION%",
        "outbound_port": str(egress.port),
        "port": "%UPSTREAM_REMOTE_PORT%",
    }


def _first_by(
    destinations: Iterable[EgressDestination], protocol: EgressProtocol
) -> list[EgressDestination]:
    return [d for d in destinations if protocol in d.protocols]


# --- TLS: filter chains by SNI ---------------------------------------------------------------


def _tls_port(destination: EgressDestination) -> int:
    # A workload pointed at the outbound port says which host (SNI) but not which port: use
    # 443 when allowed, else the rule's first port.
    return TLS_DEFAULT_PORT if TLS_DEFAULT_PORT in destination.ports else destination.ports[0]


def _tcp_proxy(
    stat_prefix: str, cluster: str, logs: Sequence[accesslog_pb2.AccessLog]
) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(
        name="envoy.filters.network.tcp_proxy",
        typed_config=pack(
            tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster, access_log=logs)
        ),
    )


def _sni_forward_proxy(port: int) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(
        name="envoy.filters.network.sni_dynamic_forward_proxy",
        typed_config=pack(sni_dfp_pb2.FilterConfig(dns_cache_config=_dns_cache(), port_value=port)),
    )


def _tls_chains(ir: SidecarIR, egress: EgressIR) -> list[listener_components_pb2.FilterChain]:
    chains = []
    seen: set[str] = set()
    # Envoy refuses two chains with the same match: the first rule for a host wins.
    for dest in _first_by(egress.allowed, EgressProtocol.TLS):
        if dest.host in seen:
            continue
        seen.add(dest.host)
        chains.append(
            listener_components_pb2.FilterChain(
                name=f"tls|{dest.host}",
                filter_chain_match=listener_components_pb2.FilterChainMatch(
                    server_names=[dest.host], transport_protocol="tls"
                ),
                filters=[
                    _sni_forward_proxy(_tls_port(dest)),
                    _tcp_proxy(
                        "outbound_tls_allowed",
                        FORWARD_PROXY_CLUSTER,
                        _access_logs(ir, _tcp_fields(egress, ALLOWED, str(dest.policy), dest.name)),
                    ),
                ],
            )
        )
    policy = deciding_policy(egress)
    if egress.enforce:
        filters = [
            _tcp_proxy(
                "outbound_tls_blocked",
                BLACKHOLE_CLUSTER,
                _access_logs(ir, _tcp_fields(egress, BLOCKED, policy, DEFAULT_DENY)),
            )
        ]
    else:
        filters = [
            _sni_forward_proxy(TLS_DEFAULT_PORT),
            _tcp_proxy(
                "outbound_tls_audit",
                FORWARD_PROXY_CLUSTER,
                _access_logs(ir, _tcp_fields(egress, WOULD_BLOCK, policy, DEFAULT_DENY)),
            ),
        ]
    chains.append(
        listener_components_pb2.FilterChain(
            name=f"tls|{DEFAULT_DENY}",
            filter_chain_match=listener_components_pb2.FilterChainMatch(transport_protocol="tls"),
            filters=filters,
        )
    )
    return chains


# --- HTTP: virtual hosts by Host / :authority -------------------------------------------------


def _domains(dest: EgressDestination) -> list[str]:
    # Clients leave the default port out of Host, so the bare name means port 80 only.
    domains = [f"{dest.host}:{port}" for port in dest.ports]
    if 80 in dest.ports:
        domains.insert(0, dest.host)
    return domains


def _route_metadata(verdict: str, policy: str, rule: str) -> base_pb2.Metadata:
    fields = struct_pb2.Struct()
    fields.update({"verdict": verdict, "policy": policy, "rule": rule})
    return base_pb2.Metadata(filter_metadata={METADATA_NAMESPACE: fields})


def _forward(name: str, metadata: base_pb2.Metadata) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        name=name,
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(
            cluster=FORWARD_PROXY_CLUSTER, timeout=duration_pb2.Duration(seconds=60)
        ),
        metadata=metadata,
    )


def _host_of(domain: str) -> str:
    return domain.rsplit(":", 1)[0] if ":" in domain else domain


def _mesh_hosts(
    mesh_hosts: Sequence[route_components_pb2.VirtualHost],
) -> list[route_components_pb2.VirtualHost]:
    # The mesh listener strips the port before matching; here ports stay in the Host (the
    # allow-list matches them), so each mesh name also matches with any port.
    out = []
    for vhost in mesh_hosts:
        routed = route_components_pb2.VirtualHost()
        routed.CopyFrom(vhost)
        del routed.domains[:]
        routed.domains.extend(d for host in vhost.domains for d in (host, f"{host}:*"))
        for route in routed.routes:
            route.metadata.CopyFrom(_route_metadata(ALLOWED, MESH, vhost.name))
        out.append(routed)
    return out


def route_configuration(
    egress: EgressIR, mesh_hosts: Sequence[route_components_pb2.VirtualHost] = ()
) -> route_pb2.RouteConfiguration:
    """The outbound HTTP routes: ``mesh_hosts`` (the mesh listener's virtual hosts) first,
    then the allow-list, then the default deny."""
    vhosts = _mesh_hosts(mesh_hosts)
    # A mesh service always goes through its mTLS cluster: an allow rule naming it cannot
    # send it in plaintext through the forward proxy instead.
    mesh_names = {_host_of(d) for v in vhosts for d in v.domains}
    taken: set[str] = set()
    for dest in _first_by(egress.allowed, EgressProtocol.HTTP):
        # Envoy refuses a domain in two virtual hosts: the first rule for it wins.
        domains = [d for d in _domains(dest) if d not in taken and _host_of(d) not in mesh_names]
        if not domains:
            continue
        taken.update(domains)
        route = _forward(dest.name, _route_metadata(ALLOWED, str(dest.policy), dest.name))
        route.stat_prefix = dest.name
        vhosts.append(
            route_components_pb2.VirtualHost(name=dest.name, domains=domains, routes=[route])
        )
    # Unlisted hosts: RBAC on this route denies (Enforce) or only shadow-denies (Audit), so
    # both modes count and log the same way and Audit still reaches the destination.
    deny_all = rbac_config_pb2.RBAC(action=rbac_config_pb2.RBAC.ALLOW)
    per_route = (
        rbac_pb2.RBAC(rules=deny_all) if egress.enforce else rbac_pb2.RBAC(shadow_rules=deny_all)
    )
    fallback = _forward(
        DEFAULT_DENY,
        _route_metadata(
            BLOCKED if egress.enforce else WOULD_BLOCK, deciding_policy(egress), DEFAULT_DENY
        ),
    )
    fallback.typed_per_filter_config[RBAC_FILTER].CopyFrom(
        pack(rbac_pb2.RBACPerRoute(rbac=per_route))
    )
    vhosts.append(
        route_components_pb2.VirtualHost(name=DEFAULT_DENY, domains=["*"], routes=[fallback])
    )
    return route_pb2.RouteConfiguration(name=route_name(egress), virtual_hosts=vhosts)


def connection_manager(ir: SidecarIR, egress: EgressIR) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=f"outbound_{egress.port}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=route_name(egress)),
        http_filters=[
            # Decide before resolving: a blocked host never costs a DNS query.
            hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(rbac_pb2.RBAC())),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.dynamic_forward_proxy",
                typed_config=pack(dfp_http_pb2.FilterConfig(dns_cache_config=_dns_cache())),
            ),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
            ),
        ],
        access_log=_access_logs(ir, _http_fields(egress)),
    )


# --- listener and clusters --------------------------------------------------------------------


def listener(ir: SidecarIR, egress: EgressIR) -> listener_pb2.Listener:
    http_chain = listener_components_pb2.FilterChain(
        name="http",
        filter_chain_match=listener_components_pb2.FilterChainMatch(
            transport_protocol="raw_buffer"
        ),
        filters=[
            listener_components_pb2.Filter(
                name="envoy.filters.network.http_connection_manager",
                typed_config=pack(connection_manager(ir, egress)),
            )
        ],
    )
    return listener_pb2.Listener(
        name=listener_name(egress),
        address=socket_address(egress.listen_address, egress.port),
        traffic_direction=base_pb2.OUTBOUND,
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.tls_inspector",
                typed_config=pack(tls_inspector_pb2.TlsInspector()),
            )
        ],
        filter_chains=[*_tls_chains(ir, egress), http_chain],
    )


def forward_proxy_cluster() -> cluster_pb2.Cluster:
    # Speak upstream what the workload spoke: gRPC (h2c) stays HTTP/2, HTTP/1.1 stays 1.1.
    options = upstream_http_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=upstream_http_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options={}, http2_protocol_options={}
        ),
        # Required by the forward proxy cluster; only used should a hop ever speak TLS.
        upstream_http_protocol_options=protocol_pb2.UpstreamHttpProtocolOptions(
            auto_sni=True, auto_san_validation=True
        ),
    )
    cluster = cluster_pb2.Cluster(
        name=FORWARD_PROXY_CLUSTER,
        connect_timeout=duration_pb2.Duration(seconds=5),
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        cluster_type=cluster_pb2.Cluster.CustomClusterType(
            name="envoy.clusters.dynamic_forward_proxy",
            typed_config=pack(dfp_cluster_pb2.ClusterConfig(dns_cache_config=_dns_cache())),
        ),
    )
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].CopyFrom(pack(options))
    return cluster


def blackhole_cluster() -> cluster_pb2.Cluster:
    # No endpoints: a connection sent here is closed at once (Istio's BlackHoleCluster).
    return cluster_pb2.Cluster(
        name=BLACKHOLE_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=BLACKHOLE_CLUSTER),
    )


def egress_resources(ir: SidecarIR, egress: EgressIR) -> dict[str, list[Message]]:
    # Mesh services (with identity) keep working under egress control: their clusters
    # come from the mtls module, which builds them when the sidecar has an outbound port.
    mesh_hosts = mesh.mesh_virtual_hosts(ir, ir.mtls) if ir.mtls is not None else []
    return {
        rt.LISTENER: [listener(ir, egress)],
        rt.ROUTE: [route_configuration(egress, mesh_hosts)],
        rt.CLUSTER: [forward_proxy_cluster(), blackhole_cluster()],
    }


class Egress(Module):
    name = "modelguard.egress"

    def extra_resources(self, ir: SidecarIR) -> dict[str, list[Message]]:
        egress = egress_of(ir)
        return egress_resources(ir, egress) if egress is not None else {}


MODULE = Egress()
MODULES: tuple[tuple[int, Module], ...] = ((Phase.OUTBOUND, MODULE),)
