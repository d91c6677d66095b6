"""TelemetryIR → Envoy's OpenTelemetry tracer and OpenTelemetry access logger.

Both export over OTLP/gRPC to the control plane (``names.CONTROL_PLANE_CLUSTER``), where the
receiver hashes secrets, derives each request's policy verdict, keeps recent records and
forwards them. Exports are batched so the sidecar pays little per request: the tracer's
batch size and interval are Envoy runtime keys (set in the bootstrap, see
``controlplane.sidecar.bootstrap``), the access logger's are fields of its gRPC config.

An access-log record carries the attributes in ``LOG_ATTRIBUTES`` (Envoy command operators)
that the sidecar's configuration can give a value (``log_attributes``): each one costs Envoy
a formatter run, a string and its OTLP encoding on every request, and one that can only ever
be "-" (no mTLS, no audit rules, no hardening) tells nobody anything. The receiver reads an
absent attribute exactly as Envoy's "-" (``controlplane.telemetry.records``, by the same
names), so leaving one out changes nothing it stores, shows or forwards.
"""

from __future__ import annotations

from collections.abc import Callable

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.tracing.v3 import custom_tag_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from opentelemetry.proto.common.v1 import common_pb2

from controlplane.ir import Action, SidecarIR, TelemetryIR
from controlplane.policies.access.ir import of as access_of
from controlplane.policies.extraction.ir import HardeningIR
from controlplane.policies.extraction.ir import policies_of as extraction_policies_of
from controlplane.translate import names
from controlplane.translate.module import Inbound, Module
from controlplane.translate.protos import pack

TRACER = "envoy.tracers.opentelemetry"
ACCESS_LOGGER = "envoy.access_loggers.open_telemetry"
LOG_NAME = "modelguard.inbound"
ACCESS_LOG_BUFFER_BYTES = 1024 * 1024

# Where verdicts come from. The RBAC filters (policies/access/translate.py) write dynamic
# metadata under this namespace, their keys prefixed by each filter's stat prefix; a denial
# also shows in the response code details as rbac_access_denied_matched_policy[<rule>].
RBAC_METADATA = "envoy.filters.http.rbac"
# A rate limit that rejects names itself in this response header (the rate-limit module sets
# it on limited responses); Envoy marks the request with the RL response flag.
LIMIT_HEADER = "x-modelguard-limit"
# Output hardening (the Wasm filter, wasm/src/filter.c) names the hardening that changed an
# answer (its tier, or "default") in this filter state: a property a proxy-wasm plugin sets is
# kept by Envoy as filter state "wasm.<property>" (the ABI cannot write dynamic metadata).
# Absent ("-") when the output was untouched.
OUTPUT_STATE = "wasm.modelguard.hardened"

# Access-log attribute → Envoy command operator. Names follow OpenTelemetry's semantic
# conventions where one exists; ours are under "modelguard.", Envoy's own under "envoy.".
LOG_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("http.request.method", "%REQ(:METHOD)%"),
    ("url.path", "%PATH(WQ)%"),
    ("http.response.status_code", "%RESPONSE_CODE%"),
    ("envoy.response_flags", "%RESPONSE_FLAGS%"),
    ("envoy.response_code_details", "%RESPONSE_CODE_DETAILS%"),
    ("envoy.route", "%ROUTE_NAME%"),
    ("envoy.duration_ms", "%DURATION%"),
    ("envoy.bytes_received", "%BYTES_RECEIVED%"),
    ("envoy.bytes_sent", "%BYTES_SENT%"),
    ("client.address", "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"),
    # The caller's workload identity: the URI SAN of its certificate under mTLS.
    ("modelguard.caller.identity", "%DOWNSTREAM_PEER_URI_SAN%"),
    ("http.request.id", "%REQ(X-REQUEST-ID)%"),
    ("modelguard.ratelimit.limit", f"%RESP({LIMIT_HEADER})%"),
    ("modelguard.output.hardened", f"%FILTER_STATE({OUTPUT_STATE}:PLAIN)%"),
    *(
        (f"envoy.rbac.{key}", f"%DYNAMIC_METADATA({RBAC_METADATA}:{key})%")
        for key in (
            "audit_deny_shadow_engine_result",
            "audit_deny_shadow_effective_policy_id",
            "audit_allow_shadow_engine_result",
            "audit_allow_shadow_effective_policy_id",
        )
    ),
)

# The client key header's value goes to the receiver under this attribute and is replaced by
# its hash there, before anything is stored, shown or forwarded.
CLIENT_KEY_ATTRIBUTE = "modelguard.client.key"
HEADER_ATTRIBUTE_PREFIX = "http.request.header."


def _mtls(ir: SidecarIR) -> bool:
    # The inbound listener terminates TLS only with an SVID
    # (policies/access/mtls_translate.py); without one no request has a peer certificate.
    return ir.mtls is not None


def _hardens(ir: SidecarIR) -> bool:
    # As policies/extraction/translate.py decides: an ExtractionPolicy whose scores the
    # sidecar can follow, with a default or a tier that changes them.
    return any(
        e.scores is not None
        and (e.output is not None or any(h != HardeningIR() for _, h in e.tiers))
        for e in extraction_policies_of(ir)
    )


def _audits_deny(ir: SidecarIR) -> bool:
    # The deny filter's shadow rules (policies/access/translate.py): audited Deny rules.
    access = access_of(ir)
    return access is not None and any(r.action == Action.DENY for r in access.audited)


def _audits_allow(ir: SidecarIR) -> bool:
    # The allow filter's shadow rules: an audited policy with defaultAction Deny.
    access = access_of(ir)
    return access is not None and access.audit_default_deny


# Attributes that only some configurations can fill, and the test for it. The rate limit's
# name stays unconditional: any filter, or the workload itself, may name a limit in
# LIMIT_HEADER.
CONDITIONAL_ATTRIBUTES: dict[str, Callable[[SidecarIR], bool]] = {
    "modelguard.caller.identity": _mtls,
    "modelguard.output.hardened": _hardens,
    "envoy.rbac.audit_deny_shadow_engine_result": _audits_deny,
    "envoy.rbac.audit_deny_shadow_effective_policy_id": _audits_deny,
    "envoy.rbac.audit_allow_shadow_engine_result": _audits_allow,
    "envoy.rbac.audit_allow_shadow_effective_policy_id": _audits_allow,
}


def log_attributes(ir: SidecarIR) -> list[tuple[str, str]]:
    """The ``LOG_ATTRIBUTES`` this sidecar's configuration can give a value."""
    return [
        (key, operator)
        for key, operator in LOG_ATTRIBUTES
        if key not in CONDITIONAL_ATTRIBUTES or CONDITIONAL_ATTRIBUTES[key](ir)
    ]


def _text(value: str) -> common_pb2.AnyValue:
    return common_pb2.AnyValue(string_value=value)


def _kv(key: str, value: str) -> common_pb2.KeyValue:
    return common_pb2.KeyValue(key=key, value=_text(value))


def _grpc_service() -> grpc_service_pb2.GrpcService:
    return grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=names.CONTROL_PLANE_CLUSTER),
        timeout=duration_pb2.Duration(seconds=5),
    )


def access_log(ir: SidecarIR, telemetry: TelemetryIR) -> accesslog_pb2.AccessLog:
    attributes = [_kv(k, v) for k, v in log_attributes(ir)]
    attributes.append(_kv(CLIENT_KEY_ATTRIBUTE, f"%REQ({telemetry.client_key_header})%"))
    attributes += [
        _kv(HEADER_ATTRIBUTE_PREFIX + h, f"%REQ({h})%") for h in telemetry.header_attributes
    ]
    config = logs_service_pb2.OpenTelemetryAccessLogConfig(
        # The top-level log_name/grpc_service of newer Envoys are missing from xds-protos;
        # common_config carries the same and Envoy 1.40 still reads it.
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=LOG_NAME,
            grpc_service=_grpc_service(),
            transport_api_version=config_source_pb2.ApiVersion.V3,
            buffer_flush_interval=duration_pb2.Duration(seconds=1),
            # A record is ~1 KiB: 64 KiB meant an export per ~60 requests under load, and
            # each export costs both sides (bench/policy_tax.py). One per second, or per
            # MiB, stays far below the receiver's 4 MiB message limit.
            buffer_size_bytes=wrappers_pb2.UInt32Value(value=ACCESS_LOG_BUFFER_BYTES),
        ),
        resource_attributes=common_pb2.KeyValueList(
            values=[
                _kv("service.name", ir.service),
                _kv("service.namespace", ir.namespace),
                _kv("modelguard.node_id", ir.node_id),
            ]
        ),
        body=_text("%REQ(:METHOD)% %PATH(WQ)% %RESPONSE_CODE%"),
        attributes=common_pb2.KeyValueList(values=attributes),
        stat_prefix="modelguard",
    )
    return accesslog_pb2.AccessLog(name=ACCESS_LOGGER, typed_config=pack(config))


def _tag(tag: str, **kind: object) -> custom_tag_pb2.CustomTag:
    return custom_tag_pb2.CustomTag(tag=tag, **kind)


def tracing(ir: SidecarIR, telemetry: TelemetryIR) -> hcm_pb2.HttpConnectionManager.Tracing:
    tags = [
        _tag("service.namespace", literal=custom_tag_pb2.CustomTag.Literal(value=ir.namespace)),
        _tag("modelguard.node_id", literal=custom_tag_pb2.CustomTag.Literal(value=ir.node_id)),
        _tag("envoy.response_code_details", value="%RESPONSE_CODE_DETAILS%"),
        _tag(CLIENT_KEY_ATTRIBUTE, value=f"%REQ({telemetry.client_key_header})%"),
        _tag("modelguard.ratelimit.limit", value=f"%RESP({LIMIT_HEADER})%"),
        *(
            _tag(
                HEADER_ATTRIBUTE_PREFIX + h,
                request_header=custom_tag_pb2.CustomTag.Header(name=h),
            )
            for h in telemetry.header_attributes
        ),
    ]
    tracer = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=_grpc_service(), service_name=ir.service
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=telemetry.sampling_percent),
        # A sidecar's inbound request is one span; the upstream hop is the local workload.
        spawn_upstream_span=wrappers_pb2.BoolValue(value=False),
        custom_tags=tags,
        provider=http_tracer_pb2.Tracing.Http(name=TRACER, typed_config=pack(tracer)),
    )


class Telemetry(Module):
    name = "modelguard.telemetry"

    def patch(self, ir: SidecarIR, inbound: Inbound) -> None:
        if ir.telemetry is None:
            return
        inbound.manager.tracing.CopyFrom(tracing(ir, ir.telemetry))
        inbound.manager.access_log.append(access_log(ir, ir.telemetry))


MODULE = Telemetry()
