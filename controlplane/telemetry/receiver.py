"""The OTLP receiver: TraceService and LogsService (OTLP/gRPC) for the sidecars.

It is served on the xDS port (a sidecar service), so every sidecar reaches it through its
bootstrap's control-plane cluster. Each export is normalized into records for the store
(credentials → hashes). When a forwarder is set, the export is also scrubbed (the same
hashes) and handed to it.

Access logs are one record per request, so their path is the hot one (bench/
telemetry_receiver.py): exports arrive decoded as ``wire.ExportLogsView`` (attributes as a
map of encoded values); per record the receiver looks up what the store indexes, derives
the verdict once per distinct combination of its inputs in the export, hashes each distinct
credential once, replaces credentials in place and keeps the record's serialized bytes,
decoded only when someone reads them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from controlplane.grpcutil import add_service, decode_checked
from controlplane.telemetry import wire
from controlplane.telemetry.conventions import (
    INT_ATTRIBUTES,
    current_span_attributes,
    typed_int,
)
from controlplane.telemetry.records import (
    CLIENT_HASH_ATTRIBUTE,
    CLIENT_KEY_ATTRIBUTE,
    RECORD_OVERHEAD,
    VERDICT_ATTRIBUTE,
    VERDICT_INPUTS,
    VERDICT_RULE_ATTRIBUTE,
    Kind,
    Record,
    attribute_map,
    encoded_string,
    make_record,
    normalized_attributes,
    scrub_attributes,
    secret_attributes,
    secret_hash,
    small_int,
    value_text,
    verdict_of,
)
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import TelemetryStore

log = logging.getLogger(__name__)

SIDECAR = "sidecar"
CONTROL_PLANE = "control-plane"
LOGS_SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"

Forward = Callable[[Any], None]
Observe = Callable[[list[Record]], None]

_NODE_ATTRIBUTE = "modelguard.node_id"
_IDENTITY_ATTRIBUTE = "modelguard.caller.identity"
_ROUTE_ATTRIBUTE = "envoy.route"
_DURATION_ATTRIBUTE = "envoy.duration_ms"
_STATUS_INPUTS = ("http.response.status_code", "http.status_code")


class OtlpReceiver:
    def __init__(
        self,
        settings: TelemetrySettings,
        store: TelemetryStore,
        forward: Forward | None = None,
        observe: Observe | None = None,
    ) -> None:
        self.settings, self.store = settings, store
        self.forward, self.observe = forward, observe
        self.exports = 0
        self.unforwarded = 0  # log exports that could not be forwarded (not OTLP once scrubbed)
        self._secret = secret_attributes(settings.secret_headers)

    def add_to(self, server: grpc.aio.Server) -> None:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(
            _Traces(self), decode_checked(server)
        )
        logs = _Logs(self)
        add_service(
            server,
            LOGS_SERVICE,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    logs.Export,
                    request_deserializer=wire.ExportLogsView.FromString,
                    response_serializer=logs_service_pb2.ExportLogsServiceResponse.SerializeToString,
                )
            },
        )

    # -- ingestion (also used for the control plane's own spans) --

    def _attributes(self, attributes: Any) -> dict[str, str]:
        """The record's attributes; with a forwarder, the export's are scrubbed in place."""
        if self.forward is None:
            return normalized_attributes(attributes, self._secret)
        kept = scrub_attributes(attributes, self.settings.secret_headers)
        del attributes[:]
        attributes.extend(kept)
        return attribute_map(attributes)

    def ingest_traces(
        self, request: trace_service_pb2.ExportTraceServiceRequest, source: str = SIDECAR
    ) -> list[Record]:
        records: list[Record] = []
        for resource_spans in request.resource_spans:
            resource = attribute_map(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    current_span_attributes(span.attributes)
                    start = span.start_time_unix_nano
                    records.append(
                        make_record(
                            Kind.SPAN,
                            time_unix_nano=start,
                            source=source,
                            resource=resource,
                            name=span.name,
                            attributes=self._attributes(span.attributes),
                            trace_id=span.trace_id,
                            span_id=span.span_id,
                            duration_ms=(span.end_time_unix_nano - start) / 1e6,
                        )
                    )
        if self.forward is not None:
            self.forward(request)
        return self._keep(records)

    def ingest_logs(self, request: Any, source: str = SIDECAR) -> list[Record]:
        """Records of an export: a ``wire.ExportLogsView`` (as the service decodes it) or an
        ``ExportLogsServiceRequest``, which is left untouched."""
        if not isinstance(request, wire.ExportLogsView):
            request = wire.ExportLogsView.FromString(request.SerializeToString())
        forwarding = self.forward is not None
        records: list[Record] = []
        append = records.append
        getsizeof = sys.getsizeof
        new_record = tuple.__new__
        log_kind = Kind.LOG
        secret = tuple(self._secret)
        verdict_inputs = VERDICT_INPUTS
        # Within one export most values repeat (the same clients, routes, outcomes): each
        # distinct one is read, hashed or judged once. Sizes are measured as measure() does.
        judged: dict[tuple[bytes | None, ...], tuple[int, str, str, int]] = {}
        texts: dict[bytes, str] = {}
        durations: dict[bytes, float] = {}
        hashes: dict[bytes, tuple[str, bytes, int] | None] = {}
        ints: dict[bytes, bytes | None] = {}
        int_attributes = INT_ATTRIBUTES

        def text_of(raw: bytes) -> str:
            text = texts[raw] = value_text(raw) or ""
            return text

        def hashed(raw: bytes) -> tuple[str, bytes, int] | None:
            digest = secret_hash(raw)
            out = hashes[raw] = (
                (digest, encoded_string(digest), getsizeof(digest)) if digest else None
            )
            return out

        def judge(inputs: tuple[bytes | None, ...]) -> tuple[int, str, str, int]:
            status, verdict, rule = _judge(inputs, text_of)
            out = judged[inputs] = (status, verdict, rule, getsizeof(verdict) + getsizeof(rule))
            return out

        no_client = getsizeof("")
        for resource_logs in request.resource_logs:
            resource = resource_logs.resource.attributes
            service = _resource_text(resource, "service.name")
            resource_node = _resource_text(resource, _NODE_ATTRIBUTE)
            # The strings every record of this resource shares, the empty title among them.
            shared_size = RECORD_OVERHEAD + getsizeof("") + getsizeof(source) + getsizeof(service)
            for scope in resource_logs.scope_logs:
                for entry in scope.log_records:
                    attrs = entry.attributes
                    # Credentials first: the plain values never reach the stored bytes.
                    client, client_size = "", no_client
                    if CLIENT_KEY_ATTRIBUTE in attrs:
                        value = attrs[CLIENT_KEY_ATTRIBUTE]
                        digest = hashes[value] if value in hashes else hashed(value)
                        del attrs[CLIENT_KEY_ATTRIBUTE]
                        if digest is not None:
                            client, encoded, client_size = digest
                            attrs[CLIENT_HASH_ATTRIBUTE] = encoded
                    elif CLIENT_HASH_ATTRIBUTE in attrs:
                        client = text_of(attrs[CLIENT_HASH_ATTRIBUTE])
                        client_size = getsizeof(client)
                    for name in secret:
                        if name in attrs:
                            value = attrs[name]
                            digest = hashes[value] if value in hashes else hashed(value)
                            if digest is None:
                                del attrs[name]
                            else:
                                attrs[name] = digest[1]
                    # ``in`` + subscript: upb's Map.get parses its arguments, 3x the cost.
                    inputs = tuple([attrs[k] if k in attrs else None for k in verdict_inputs])  # noqa: SIM401
                    status, verdict, rule, verdict_size = judged.get(inputs) or judge(inputs)
                    node = resource_node
                    if not node and _NODE_ATTRIBUTE in attrs:
                        value = attrs[_NODE_ATTRIBUTE]
                        node = texts[value] if value in texts else text_of(value)
                    identity = route = ""
                    if _IDENTITY_ATTRIBUTE in attrs:
                        value = attrs[_IDENTITY_ATTRIBUTE]
                        identity = texts[value] if value in texts else text_of(value)
                    if _ROUTE_ATTRIBUTE in attrs:
                        value = attrs[_ROUTE_ATTRIBUTE]
                        route = texts[value] if value in texts else text_of(value)
                    duration = 0.0
                    if _DURATION_ATTRIBUTE in attrs:
                        value = attrs[_DURATION_ATTRIBUTE]
                        duration = durations.get(value, -1.0)
                        if duration < 0:
                            duration = durations[value] = float(small_int(text_of(value)))
                    # Numbers as numbers (conventions.py), once per distinct value.
                    for name in int_attributes:
                        if name in attrs:
                            value = attrs[name]
                            if value in ints:
                                typed = ints[value]
                            else:
                                typed = ints[value] = typed_int(value)
                            if typed is not None:
                                attrs[name] = typed
                    if forwarding:
                        _scrub_for_forwarding(attrs, verdict, rule)
                    trace_id = entry.trace_id
                    span_id = entry.span_id
                    trace_hex = trace_id.hex() if trace_id else ""
                    span_hex = span_id.hex() if span_id else ""
                    raw = entry.SerializeToString()
                    append(
                        new_record(
                            Record,
                            (
                                log_kind,
                                entry.time_unix_nano or entry.observed_time_unix_nano,
                                source,
                                service,
                                node,
                                "",
                                trace_hex,
                                span_hex,
                                duration,
                                status,
                                client,
                                identity,
                                route,
                                verdict,
                                rule,
                                (),
                                raw,
                                shared_size
                                + getsizeof(raw)
                                + getsizeof(node)
                                + getsizeof(trace_hex)
                                + getsizeof(span_hex)
                                + client_size
                                + getsizeof(identity)
                                + getsizeof(route)
                                + verdict_size,
                                0,
                            ),
                        )
                    )
        if forwarding:
            self._forward_logs(request)
        return self._keep(records)

    def _forward_logs(self, view: Any) -> None:
        assert self.forward is not None
        try:
            request = logs_service_pb2.ExportLogsServiceRequest.FromString(view.SerializeToString())
        except wire.DecodeError as err:
            # A value that is not UTF-8 (kept, with replacement characters, in the store)
            # has no OTLP encoding: the backend does not get this export.
            self.unforwarded += 1
            log.warning("an OTLP log export was not forwarded: %s", err)
            return
        self.forward(request)

    def _keep(self, records: list[Record]) -> list[Record]:
        self.exports += 1
        added = self.store.add(records)
        if self.observe is not None:
            self.observe(added)
        return added


def _resource_text(resource: Any, key: str) -> str:
    """A resource attribute as ``attribute_map`` reads it (a "-" stays "-")."""
    if key not in resource:
        return ""
    raw = resource[key]
    return "-" if raw == b"\x0a\x01-" else (value_text(raw) or "")


def _judge(
    inputs: tuple[bytes | None, ...], text_of: Callable[[bytes], str]
) -> tuple[int, str, str]:
    """(HTTP status, verdict, rule) of a request whose VERDICT_INPUTS are ``inputs``."""
    attrs = {}
    for key, raw in zip(VERDICT_INPUTS, inputs, strict=True):
        if raw is not None and (text := text_of(raw)):
            attrs[key] = text
    verdict, rule = verdict_of(attrs)
    status = attrs.get(_STATUS_INPUTS[0]) or attrs.get(_STATUS_INPUTS[1], "")
    return small_int(status), str(verdict) if verdict is not None else "", rule


def _scrub_for_forwarding(attrs: Any, verdict: str, rule: str) -> None:
    """What a backend gets of a record's attributes: no empty values (as
    ``scrub_attributes``), and the verdict so it can be queried there too."""
    for key in [k for k, raw in attrs.items() if value_text(raw) is None]:
        del attrs[key]
    if verdict:
        attrs[VERDICT_ATTRIBUTE] = encoded_string(verdict)
        if rule:
            attrs[VERDICT_RULE_ATTRIBUTE] = encoded_string(rule)


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.ingest_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Logs:
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: Any, context: Any
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self.receiver.ingest_logs(request)
        return logs_service_pb2.ExportLogsServiceResponse()
