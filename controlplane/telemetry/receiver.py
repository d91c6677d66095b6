"""The OTLP receiver: TraceService and LogsService (OTLP/gRPC) for the sidecars.

It is served on the xDS port (a sidecar service), so every sidecar reaches it through its
bootstrap's control-plane cluster. Each export is scrubbed (credentials → hashes) in place,
normalized into records for the store, and handed as it is to the forwarder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from controlplane.telemetry.records import (
    Kind,
    Record,
    attribute_map,
    make_record,
    scrub_attributes,
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

    def add_to(self, server: grpc.aio.Server) -> None:
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), server)

    # -- ingestion (also used for the control plane's own spans) --

    def ingest_traces(
        self, request: trace_service_pb2.ExportTraceServiceRequest, source: str = SIDECAR
    ) -> list[Record]:
        records: list[Record] = []
        for resource_spans in request.resource_spans:
            resource = attribute_map(resource_spans.resource.attributes)
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    kept = scrub_attributes(span.attributes, self.settings.secret_headers)
                    del span.attributes[:]
                    span.attributes.extend(kept)
                    records.append(
                        make_record(
                            Kind.SPAN,
                            time_unix_nano=span.start_time_unix_nano,
                            source=source,
                            resource=resource,
                            name=span.name,
                            attributes=attribute_map(span.attributes),
                            trace_id=span.trace_id,
                            span_id=span.span_id,
                            duration_ms=(span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                        )
                    )
        return self._keep(request, records)

    def ingest_logs(
        self, request: logs_service_pb2.ExportLogsServiceRequest, source: str = SIDECAR
    ) -> list[Record]:
        records: list[Record] = []
        for resource_logs in request.resource_logs:
            resource = attribute_map(resource_logs.resource.attributes)
            for scope in resource_logs.scope_logs:
                for entry in scope.log_records:
                    kept = scrub_attributes(entry.attributes, self.settings.secret_headers)
                    del entry.attributes[:]
                    entry.attributes.extend(kept)
                    attrs = attribute_map(entry.attributes)
                    records.append(
                        make_record(
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
                    )
                    # The verdict travels onward too, so a backend can query by it.
                    for key in ("modelguard.verdict", "modelguard.verdict.rule"):
                        if key in dict(records[-1].attributes):
                            entry.attributes.add(key=key).value.string_value = dict(
                                records[-1].attributes
                            )[key]
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
