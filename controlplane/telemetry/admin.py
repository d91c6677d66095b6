"""The admin service's telemetry part: what ``modelguard traces`` reads. It only reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from controlplane.gen.modelguard.admin.v1 import telemetry_pb2, telemetry_pb2_grpc
from controlplane.grpcutil import decode_checked
from controlplane.telemetry.forwarder import OtlpForwarder
from controlplane.telemetry.records import Record
from controlplane.telemetry.store import Query, TelemetryStore

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000


def to_query(request: telemetry_pb2.TelemetryQuery) -> Query:
    return Query(
        service=request.service,
        client=request.client,
        status=request.status,
        verdict=request.verdict,
        kind=request.kind,
        trace_id=request.trace_id,
        source=request.source,
        after_seq=request.after_seq,
    )


def to_message(record: Record) -> telemetry_pb2.TelemetryRecord:
    return telemetry_pb2.TelemetryRecord(
        seq=record.seq,
        kind=str(record.kind),
        time_unix_nano=record.time_unix_nano,
        source=record.source,
        service=record.service,
        node=record.node,
        name=record.name,
        trace_id=record.trace_id,
        span_id=record.span_id,
        duration_ms=record.duration_ms,
        status=record.status,
        client=record.client,
        identity=record.identity,
        route=record.route,
        verdict=record.verdict,
        rule=record.rule,
        attributes=dict(record.attributes),
    )


class TelemetryAdmin(telemetry_pb2_grpc.TelemetryServicer):  # type: ignore[misc]
    def __init__(
        self,
        store: TelemetryStore,
        metric_points: Callable[[], list[tuple[str, dict[str, str], float, int, str]]],
        forwarder: OtlpForwarder | None,
    ) -> None:
        # The telemetry service's parts this reads: its store, its own metrics, its forwarder.
        self.store, self.metric_points, self.forwarder = store, metric_points, forwarder

    def add_to(self, server: grpc.aio.Server) -> None:
        telemetry_pb2_grpc.add_TelemetryServicer_to_server(self, decode_checked(server))

    async def ListTelemetry(
        self, request: telemetry_pb2.TelemetryQuery, context: Any
    ) -> telemetry_pb2.TelemetryList:
        store = self.store
        limit = min(request.limit or DEFAULT_LIMIT, MAX_LIMIT)
        records = store.query(to_query(request), limit)
        return telemetry_pb2.TelemetryList(
            records=[to_message(r) for r in records], last_seq=store.last_seq
        )

    async def WatchTelemetry(
        self, request: telemetry_pb2.TelemetryQuery, context: Any
    ) -> AsyncIterator[telemetry_pb2.TelemetryRecord]:
        store = self.store
        query = to_query(request)
        # Subscribe first, then replay: nothing that arrives in between is missed.
        watch = store.watch(query)
        try:
            seen = query.after_seq
            if request.after_seq:
                for record in store.query(query, MAX_LIMIT):
                    seen = max(seen, record.seq)
                    yield to_message(record)
            while True:
                record = await watch.get()
                if record.seq > seen:
                    yield to_message(record)
        except asyncio.CancelledError:
            raise
        finally:
            watch.close()

    async def GetTelemetryMetrics(
        self, request: telemetry_pb2.TelemetryMetricsRequest, context: Any
    ) -> telemetry_pb2.TelemetryMetrics:
        stats = self.store.stats()
        reply = telemetry_pb2.TelemetryMetrics(
            store_records=stats.records,
            store_bytes=stats.bytes,
            store_max_records=stats.max_records,
            store_max_bytes=stats.max_bytes,
            store_received=stats.received,
            store_evicted=stats.evicted,
        )
        for name, attrs, value, count, unit in self.metric_points():
            reply.points.add(name=name, attributes=attrs, value=value, count=count, unit=unit)
        if self.forwarder is not None:
            f = self.forwarder.stats()
            reply.forward_endpoint = f.endpoint
            reply.forward_sent, reply.forward_failed = f.sent, f.failed
            reply.forward_dropped = f.dropped
        return reply
