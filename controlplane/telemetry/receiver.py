"""The OTLP receiver: TraceService and LogsService (OTLP/gRPC) for the sidecars.

It is served on the xDS port (a sidecar service), so every sidecar reaches it through its
bootstrap's control-plane cluster. Each export is normalized into records for the store
(credentials → hashes). When a forwarder is set, the export is also scrubbed in place (the
same hashes) and handed to it; without one, the export is read once and dropped, so the
receiver builds no new protobuf objects at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from controlplane.telemetry.records import (
    VERDICT_ATTRIBUTE,
    VERDICT_RULE_ATTRIBUTE,
    Kind,
    Record,
    attribute_map,
    make_record,
    normalized_attributes,
    scrub_attributes,
    secret_attributes,
    small_int,
)
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import TelemetryStore

SIDECAR = "sidecar"
CONTROL_PLANE = "control-plane"

Forward = Callable[[Any], None]
Observe = Callable[[list[Record]], None]


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
        self._secret = secret_attributes(settings.secret_headers)

    def add_to(self, server: grpc.aio.Server) -> None:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), server)

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
        return self._keep(request, records)

    def ingest_logs(
        self, request: logs_service_pb2.ExportLogsServiceRequest, source: str = SIDECAR
    ) -> list[Record]:
        records: list[Record] = []
        forwarding = self.forward is not None
        for resource_logs in request.resource_logs:
            resource = attribute_map(resource_logs.resource.attributes)
            for scope in resource_logs.scope_logs:
                for entry in scope.log_records:
                    attrs = self._attributes(entry.attributes)
                    record = make_record(
                        Kind.LOG,
                        time_unix_nano=entry.time_unix_nano or entry.observed_time_unix_nano,
                        source=source,
                        resource=resource,
                        name=entry.body.string_value,
                        attributes=attrs,
                        trace_id=entry.trace_id,
                        span_id=entry.span_id,
                        duration_ms=float(small_int(attrs.get("envoy.duration_ms", ""))),
                    )
                    records.append(record)
                    if forwarding:
                        # The verdict travels onward too, so a backend can query by it.
                        derived = dict(record.attributes)
                        for key in (VERDICT_ATTRIBUTE, VERDICT_RULE_ATTRIBUTE):
                            if key in derived:
                                entry.attributes.add(key=key).value.string_value = derived[key]
        return self._keep(request, records)

    def _keep(self, request: Any, records: list[Record]) -> list[Record]:
        self.exports += 1
        if self.forward is not None:
            self.forward(request)
        added = self.store.add(records)
        if self.observe is not None:
            self.observe(added)
        return added


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.ingest_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):  # type: ignore[misc]
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    async def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: Any
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self.receiver.ingest_logs(request)
        return logs_service_pb2.ExportLogsServiceResponse()
