"""MtlsIR → mutual TLS: SDS secrets, the inbound listener's TLS, mesh clusters with mTLS.

* Secrets: the sidecar's SVID (``SVID_SECRET``) and the trust bundle (``BUNDLE_SECRET``) are
  SDS resources on the same ADS stream; every TLS context references them by name, so a
  rotation is one SDS push: no listener or cluster changes, no connection is dropped.
* Inbound, Strict: the one filter chain terminates TLS and requires a client certificate
  issued by the mesh CA; plaintext never reaches the HTTP filters. Permissive: the TLS
  inspector picks the chain, mTLS (``transport_protocol: tls``) or plaintext.
* The caller's SPIFFE ID is what RBAC's ``authenticated`` principals match, and it reaches
  the workload in ``x-forwarded-client-cert`` (any value the caller sent is replaced).
* Mesh listener (``mesh_port``, plaintext on 127.0.0.1 for the local workload only): one
  virtual host per mesh service, by Host, to a cluster that originates mTLS and accepts
  the peer only if it shows one of that service's SPIFFE IDs. A sidecar with egress
  control routes the same Host names to the same clusters from its outbound listener
  (``translate/egress.py`` uses ``mesh_virtual_hosts``).
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from controlplane.ir import MeshService, MtlsIR, MtlsMode, SidecarIR, WorkloadCertificate
from controlplane.translate.module import Inbound, Module
from controlplane.translate.protos import ads_source, pack, socket_address
from controlplane.xds import resources as rt

SVID_SECRET = "modelguard.svid"
BUNDLE_SECRET = "modelguard.trust-bundle"
TLS_SOCKET = "envoy.transport_sockets.tls"
HCM_FILTER = "envoy.filters.network.http_connection_manager"


def trust_domain(spiffe_id: str) -> str:
    return spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


def secrets(certificate: WorkloadCertificate) -> list[secret_pb2.Secret]:
    return [
        secret_pb2.Secret(
            name=SVID_SECRET,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain={"inline_string": certificate.certificate_pem},
                private_key={"inline_string": certificate.private_key_pem},
            ),
        ),
        secret_pb2.Secret(
            name=BUNDLE_SECRET,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca={"inline_string": certificate.trust_bundle_pem}
            ),
        ),
    ]


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def _uri_sans(matchers: list[string_pb2.StringMatcher]) -> list[common_pb2.SubjectAltNameMatcher]:
    return [
        common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=m)
        for m in matchers
    ]


def _common(peer_sans: list[string_pb2.StringMatcher], alpn: list[str]) -> tls_pb2.CommonTlsContext:
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(SVID_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=_uri_sans(peer_sans)
            ),
            validation_context_sds_secret_config=_sds(BUNDLE_SECRET),
        ),
        alpn_protocols=alpn,
    )


def downstream_tls(ir: SidecarIR) -> base_pb2.TransportSocket:
    # Any workload of our trust domain may connect; which one may do what is RBAC's job.
    domain = string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain(ir.identity)}/")
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=_common([domain], ["h2", "http/1.1"]),
        require_client_certificate={"value": True},
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def upstream_tls(service: MeshService) -> base_pb2.TransportSocket:
    peers = [string_pb2.StringMatcher(exact=identity) for identity in service.identities]
    context = tls_pb2.UpstreamTlsContext(common_tls_context=_common(peers, []), sni=service.host)
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def patch_inbound(ir: SidecarIR, mtls: MtlsIR, inbound: Inbound) -> None:
    listener = inbound.listener
    (chain,) = listener.filter_chains  # the inbound module builds exactly one
    chain.transport_socket.CopyFrom(downstream_tls(ir))
    if mtls.mode == MtlsMode.PERMISSIVE:
        chain.name = "mtls"
        chain.filter_chain_match.transport_protocol = "tls"
        listener.filter_chains.append(listener_components_pb2.FilterChain(name="plaintext"))
        listener.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.tls_inspector",
                typed_config=pack(tls_inspector_pb2.TlsInspector()),
            )
        )
    # The workload learns who called from a header only the sidecar can set.
    manager = inbound.manager
    manager.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    manager.set_current_client_cert_details.uri = True


def outbound_cluster_name(service: MeshService) -> str:
    return f"outbound|{service.host}"


def mesh_listener_name(mtls: MtlsIR) -> str:
    return f"mesh|{mtls.mesh_port}"


def _domains(ir: SidecarIR, service: MeshService) -> list[str]:
    host = service.host
    domains = [host, f"{host}.svc", f"{host}.svc.cluster.local"]
    if service.namespace == ir.namespace:
        domains.insert(0, service.service)
    return domains


def mesh_virtual_hosts(ir: SidecarIR, mtls: MtlsIR) -> list[route_components_pb2.VirtualHost]:
    """One virtual host per mesh service, by Host, to its mTLS cluster. The mesh listener
    and the outbound (egress) listener both route mesh services with these."""
    return [
        route_components_pb2.VirtualHost(
            name=service.host,
            domains=_domains(ir, service),
            routes=[
                route_components_pb2.Route(
                    name="default",
                    match=route_components_pb2.RouteMatch(prefix="/"),
                    route=route_components_pb2.RouteAction(
                        cluster=outbound_cluster_name(service),
                        timeout=duration_pb2.Duration(seconds=30),
                    ),
                )
            ],
        )
        for service in mtls.upstreams
    ]


def mesh_clusters(mtls: MtlsIR) -> dict[str, list[Message]]:
    """The mTLS clusters of the mesh services this sidecar may call, with their endpoints."""
    clusters: list[Message] = []
    assignments: list[Message] = []
    for service in mtls.upstreams:
        cluster_name = outbound_cluster_name(service)
        clusters.append(
            cluster_pb2.Cluster(
                name=cluster_name,
                type=cluster_pb2.Cluster.EDS,
                eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_source()),
                connect_timeout=duration_pb2.Duration(seconds=1),
                transport_socket=upstream_tls(service),
            )
        )
        assignments.append(
            endpoint_pb2.ClusterLoadAssignment(
                cluster_name=cluster_name,
                endpoints=[
                    endpoint_components_pb2.LocalityLbEndpoints(
                        lb_endpoints=[
                            endpoint_components_pb2.LbEndpoint(
                                endpoint=endpoint_components_pb2.Endpoint(
                                    address=socket_address(address, port)
                                )
                            )
                            for address, port in service.endpoints
                        ]
                    )
                ],
            )
        )
    return {rt.CLUSTER: clusters, rt.ENDPOINT: assignments}


def mesh_resources(ir: SidecarIR, mtls: MtlsIR) -> dict[str, list[Message]]:
    name = mesh_listener_name(mtls)
    routes = route_pb2.RouteConfiguration(name=name, virtual_hosts=mesh_virtual_hosts(ir, mtls))
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"mesh_{mtls.mesh_port}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=name),
        strip_any_host_port=True,
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
            )
        ],
    )
    listener = listener_pb2.Listener(
        name=name,
        # Only the local workload may use its sidecar's identity.
        address=socket_address("127.0.0.1", mtls.mesh_port),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name=HCM_FILTER, typed_config=pack(manager))
                ]
            )
        ],
    )
    return {rt.LISTENER: [listener], rt.ROUTE: [routes]}


class Mtls(Module):
    name = "modelguard.mtls"

    def patch(self, ir: SidecarIR, inbound: Inbound) -> None:
        if ir.mtls is not None:
            patch_inbound(ir, ir.mtls, inbound)

    def extra_resources(self, ir: SidecarIR) -> dict[str, list[Message]]:
        if ir.mtls is None:
            return {}
        out: dict[str, list[Message]] = {rt.SECRET: list(secrets(ir.mtls.certificate))}
        # The clusters serve the mesh listener and the outbound listener alike (either
        # port makes compile list the upstreams); the mesh listener only its own port.
        parts = [mesh_clusters(ir.mtls)] if ir.mtls.upstreams else []
        if ir.mtls.mesh_port:
            parts.append(mesh_resources(ir, ir.mtls))
        for part in parts:
            for type_url, resources in part.items():
                out.setdefault(type_url, []).extend(resources)
        return out


MODULE = Mtls()
