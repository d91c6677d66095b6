"""A sidecar with an unknown or forged identity gets nothing: no configuration, no
certificate, no place in the inventory — over the real xDS TLS port, with the gRPC metadata
and client certificates an impostor could bring."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2 as core_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format, struct_pb2

from controlplane.app.server import ControlPlaneConfig
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.identity.ca import CertificateAuthority
from controlplane.identity.service import IdentityConfig
from controlplane.identity.tokens import TOKEN_METADATA, BootstrapTokens
from controlplane.xds import resources as rt
from tests.resilience.conftest import ACCESS, PlaneThread, write_policies

DOMAIN = "cluster.local"
IDENTITY = f"spiffe://{DOMAIN}/ns/demo/sa/digits-model"


@pytest.fixture(scope="module")
def secure_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PlaneThread]:
    root = tmp_path_factory.mktemp("identity")
    plane = PlaneThread(
        ControlPlaneConfig(
            policy_paths=(str(write_policies(root / "policies", ACCESS)),),
            xds_port=0,
            admin_port=0,
            watch=False,
            identity=IdentityConfig(directory=str(root / "identity"), trust_domain=DOMAIN),
        )
    )
    try:
        yield plane
    finally:
        plane.stop()


def node(node_id: str, identity: str = IDENTITY) -> core_pb2.Node:
    sidecar = Sidecar(
        node_id=node_id, service="digits-model", namespace="demo", identity=identity,
        app_port=8080, inbound_port=15006,
    )
    message = core_pb2.Node(id=node_id)
    message.metadata.CopyFrom(json_format.ParseDict(sidecar.to_metadata(), struct_pb2.Struct()))
    return message


def ask(
    plane: PlaneThread,
    first: core_pb2.Node,
    token: str | None,
    client_cert: tuple[str, str] | None = None,
) -> tuple[grpc.StatusCode, int]:
    """One ADS stream over TLS (trusting our CA): (how it ended, responses received)."""
    identity = plane.plane.identity
    assert identity is not None
    key, chain = (client_cert[1].encode(), client_cert[0].encode()) if client_cert else (
        None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca.root_pem.encode(), private_key=key, certificate_chain=chain
    )
    metadata = [(TOKEN_METADATA, token)] if token is not None else []
    received = 0
    with grpc.secure_channel(f"127.0.0.1:{plane.plane.xds_port}", credentials) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        answered = threading.Event()

        def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
            yield discovery_pb2.DiscoveryRequest(node=first, type_url=rt.CLUSTER)
            answered.wait(5)  # the stream stays open, as a sidecar's does

        call = stub.StreamAggregatedResources(requests(), metadata=metadata, timeout=5)
        try:
            for _ in call:
                received += 1
                answered.set()
                call.cancel()
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                return err.code(), received
        finally:
            answered.set()
    return grpc.StatusCode.OK, received


def test_impostors_are_refused_before_anything_is_sent(
    secure_plane: PlaneThread, tmp_path: Path
) -> None:
    identity = secure_plane.plane.identity
    assert identity is not None
    tokens = identity.tokens
    foreign_ca = CertificateAuthority.load_or_create(tmp_path / "foreign", DOMAIN)
    foreign = foreign_ca.issue(IDENTITY, dt.timedelta(hours=1))
    foreign_cert = (foreign.certificate_pem, foreign.private_key_pem)
    other_key = BootstrapTokens.load_or_create(tmp_path / "other-key")
    good = tokens.issue("web-0", IDENTITY)
    cases = {
        "no token": (node("web-0"), None, None),
        "junk token": (node("web-0"), "v1.not-a-mac", None),
        "token of another node": (node("web-0"), tokens.issue("web-1", IDENTITY), None),
        "token for another identity": (
            node("web-0", f"spiffe://{DOMAIN}/ns/demo/sa/admin"), good, None),
        "token signed with another key": (node("web-0"), other_key.issue("web-0", IDENTITY), None),
        "identity outside the trust domain": (
            node("web-0", "spiffe://evil.example/ns/demo/sa/digits-model"),
            tokens.issue("web-0", "spiffe://evil.example/ns/demo/sa/digits-model"), None),
        "client certificate of another CA": (node("web-0"), None, foreign_cert),
        "other CA's certificate and a forged token": (
            node("web-0"), other_key.issue("web-0", IDENTITY), foreign_cert),
    }
    before = secure_plane.call(secure_plane.plane.sync_status.drops).get("unauthenticated", 0)
    for name, (first, token, cert) in cases.items():
        code, received = ask(secure_plane, first, token, cert)
        assert (code, received) == (grpc.StatusCode.UNAUTHENTICATED, 0), name
    drops = secure_plane.call(secure_plane.plane.sync_status.drops)
    assert drops["unauthenticated"] - before == len(cases)
    # Nothing was issued, admitted or tracked for it.
    assert identity.certificate("web-0") is None
    assert secure_plane.call(lambda: secure_plane.plane.inventory.get("web-0")) is None
    assert secure_plane.call(lambda: secure_plane.plane.sync_status.node("web-0")) is None
    # Plaintext to the TLS port does not even reach the ADS server.
    with grpc.insecure_channel(f"127.0.0.1:{secure_plane.plane.xds_port}") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter([discovery_pb2.DiscoveryRequest(node=node("web-0"), type_url=rt.CLUSTER)]),
            metadata=[(TOKEN_METADATA, good)], timeout=5,
        )
        with pytest.raises(grpc.RpcError) as err:
            next(iter(call))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # The sidecar whose token it is gets its configuration on the same port.
    code, received = ask(secure_plane, node("web-0"), good)
    assert received == 1, code


def _channel(plane: PlaneThread) -> grpc.Channel:
    identity = plane.plane.identity
    assert identity is not None
    credentials = grpc.ssl_channel_credentials(root_certificates=identity.ca.root_pem.encode())
    return grpc.secure_channel(f"127.0.0.1:{plane.plane.xds_port}", credentials)


def _feed(channel: grpc.Channel, node_id: str, metadata: list[tuple[str, str]]) -> Any:
    from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc

    batch = feed_pb2.FeedBatch(node_id=node_id, policy="demo/digits-model")
    batch.unobserved.add(client_key="victim", count=1000, reason="buffer_full")
    return feed_pb2_grpc.QueryFeedStub(channel).Report(batch, metadata=metadata, timeout=5)


def _traces(channel: grpc.Channel, node_id: str, metadata: list[tuple[str, str]]) -> Any:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\1" * 16, b"\2" * 8, "forged"
    return trace_service_pb2_grpc.TraceServiceStub(channel).Export(
        request, metadata=metadata, timeout=5
    )


def _logs(channel: grpc.Channel, node_id: str, metadata: list[tuple[str, str]]) -> Any:
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

    request = logs_service_pb2.ExportLogsServiceRequest()
    request.resource_logs.add().scope_logs.add().log_records.add().body.string_value = "forged"
    return logs_service_pb2_grpc.LogsServiceStub(channel).Export(
        request, metadata=metadata, timeout=5
    )


def _ratelimit(channel: grpc.Channel, node_id: str, metadata: list[tuple[str, str]]) -> Any:
    from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

    request = rls_pb2.RateLimitRequest(domain="modelguard", hits_addend=1000)
    request.descriptors.add().entries.add(key="client", value="victim")
    return rls_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(
        request, metadata=metadata, timeout=5
    )


def _rlqs(channel: grpc.Channel, node_id: str, metadata: list[tuple[str, str]]) -> Any:
    from envoy.service.rate_limit_quota.v3 import rlqs_pb2, rlqs_pb2_grpc

    report = rlqs_pb2.RateLimitQuotaUsageReports(domain="modelguard")
    usage = report.bucket_quota_usages.add(num_requests_allowed=1000)
    usage.bucket_id.bucket["client"] = "victim"
    usage.time_elapsed.seconds = 1
    call = rlqs_pb2_grpc.RateLimitQuotaServiceStub(channel).StreamRateLimitQuotas(
        iter([report]), metadata=metadata, timeout=1
    )
    try:
        return list(call)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return []  # admitted: the stream stays open, as Envoy's does
        raise


SERVICES = {
    "query feed": (_feed, "modelguard.feed.v1.QueryFeed"),
    "OTLP traces": (_traces, "opentelemetry.proto.collector.trace.v1.TraceService"),
    "OTLP logs": (_logs, "opentelemetry.proto.collector.logs.v1.LogsService"),
    "rate limit": (_ratelimit, "envoy.service.ratelimit.v3.RateLimitService"),
    "RLQS": (_rlqs, "envoy.service.rate_limit_quota.v3.RateLimitQuotaService"),
}


@pytest.mark.parametrize("service", SERVICES)
def test_impostor_cannot_call_sidecar_services(
    secure_plane: PlaneThread, tmp_path: Path, service: str
) -> None:
    """Feeding the monitor fake counts, reporting quota usage or exporting telemetry needs
    a sidecar's credential, as ADS does; the same token opens every service."""
    call, name = SERVICES[service]
    interceptor = secure_plane.plane.call_auth
    identity = secure_plane.plane.identity
    assert interceptor is not None and identity is not None
    tokens = identity.tokens
    other_key = BootstrapTokens.load_or_create(tmp_path / "other-key")
    outside = "spiffe://evil.example/ns/demo/sa/digits-model"
    forged = {
        "no token": [],
        "junk token": [("authorization", "Bearer mgt2.a.b.c")],
        "not a bearer": [("authorization", "Basic " + tokens.issue("web-0", IDENTITY))],
        "token signed with another key": [
            ("authorization", "Bearer " + other_key.issue("web-0", IDENTITY))],
        "token naming another node than its MAC": [(
            "authorization",
            "Bearer " + ".".join([*tokens.issue("web-1", IDENTITY).split(".")[:3],
                                  tokens.issue("web-0", IDENTITY).split(".")[3]]))],
        # mgt1 tokens name no node: enough for ADS (which carries one), not for a call.
        "legacy token": [(TOKEN_METADATA, "mgt1." + tokens._mac("mgt1", "web-0", IDENTITY))],
        "identity outside the trust domain": [
            ("authorization", "Bearer " + tokens.issue("web-0", outside))],
    }
    before = interceptor.refused[name]
    drops_before = secure_plane.call(secure_plane.plane.sync_status.drops).get(
        "unauthenticated_call", 0)
    with _channel(secure_plane) as channel:
        for case, metadata in forged.items():
            with pytest.raises(grpc.RpcError) as err:
                call(channel, "web-0", metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
        assert interceptor.refused[name] - before == len(forged)
        drops = secure_plane.call(secure_plane.plane.sync_status.drops)
        assert drops["unauthenticated_call"] - drops_before == len(forged)
        # The sidecar's own token opens the service, in either header form.
        good = tokens.issue("web-0", IDENTITY)
        call(channel, "web-0", [("authorization", f"Bearer {good}")])
        call(channel, "web-0", [(TOKEN_METADATA, good)])
    assert interceptor.refused[name] - before == len(forged)


def test_impostor_cannot_feed_the_monitor(secure_plane: PlaneThread) -> None:
    from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc

    with _channel(secure_plane) as channel:
        batch = feed_pb2.FeedBatch(node_id="nobody", policy="demo/digits-model")
        batch.unobserved.add(client_key="victim", count=1000, reason="buffer_full")
        with pytest.raises(grpc.RpcError) as err:
            feed_pb2_grpc.QueryFeedStub(channel).Report(batch, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sidecar_cannot_report_as_another(secure_plane: PlaneThread) -> None:
    """A valid token for web-0 must not feed the monitor as web-1 (blaming a key there)."""
    identity = secure_plane.plane.identity
    assert identity is not None
    feed = secure_plane.plane.extraction.feed
    before = feed.refused_node
    bearer = [("authorization", "Bearer " + identity.tokens.issue("web-0", IDENTITY))]
    with _channel(secure_plane) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _feed(channel, "web-1", bearer)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert feed.refused_node - before == 1
        assert _feed(channel, "web-0", bearer).accepted >= 0  # its own name: accepted
    assert feed.refused_node - before == 1


def test_real_sidecar_reaches_every_service_with_its_token_file(
    secure_plane: PlaneThread, demo_model: tuple[str, int], tmp_path: Path
) -> None:
    """A bootstrap written by ``modelguard bootstrap -o`` holds no secret: Envoy reads its
    token (0600, beside it) through file SDS and sends it on ADS and on its OTLP access-log exports,
    which the interceptor admits."""
    from controlplane.local.envoy import EnvoyProcess
    from controlplane.netutil import free_port, http_request
    from controlplane.sidecar.bootstrap import XdsCredentials, write_bootstrap
    from controlplane.telemetry.store import Query

    identity = secure_plane.plane.identity
    interceptor = secure_plane.plane.call_auth
    assert identity is not None and interceptor is not None
    side = Sidecar(
        node_id="digits-model-real", service="digits-model", namespace="demo",
        identity=IDENTITY, app_port=demo_model[1], inbound_port=free_port(),
        inbound_address="127.0.0.1",
    )
    credentials = XdsCredentials.for_sidecar(side, identity.config.directory)
    path = write_bootstrap(
        tmp_path / "sidecar.yaml", side, xds_host="127.0.0.1",
        xds_port=secure_plane.plane.xds_port, admin_port=free_port(), credentials=credentials,
    )
    token_file = tmp_path / "sidecar.token"
    assert token_file.read_text() == credentials.token
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert credentials.token not in path.read_text()
    refused_before = sum(interceptor.refused.values())
    admin = int(yaml.safe_load(path.read_text())["admin"]["address"]["socket_address"][
        "port_value"])
    envoy = EnvoyProcess(path.read_text(), admin_port=admin, log_path=tmp_path / "envoy.log")
    envoy.start()
    try:
        envoy.wait_ready(20)
        url = f"http://127.0.0.1:{side.inbound_port}/healthz"
        assert http_request("GET", url)[0] == 200
        store = secure_plane.plane.telemetry.store
        deadline = time.monotonic() + 15
        while not secure_plane.call(
            lambda: store.query(Query(kind="log", service="digits-model"), 10)
        ):
            assert time.monotonic() < deadline, "no access log reached the OTLP receiver"
            http_request("GET", url)
            time.sleep(0.2)
    finally:
        envoy.stop()
    assert sum(interceptor.refused.values()) == refused_before
