"""The control plane's own telemetry, with opentelemetry-sdk: spans for policy load, compile,
push and verdicts; metrics for connected sidecars, push latency, convergence time, NACKs,
rate-limit decisions and verdicts.

Spans go through the same path as the sidecars' (the receiver's store, then the forwarder);
metrics are read through the admin service always and exported over OTLP when forwarding
is configured. Providers are private to this object (never the global ones), so two
control planes in one process (tests) never mix their telemetry.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Tracer

from controlplane.grpcutil import decode_failures
from controlplane.telemetry.records import Record

if TYPE_CHECKING:
    from controlplane.pipeline import Rebuild
    from controlplane.server import ControlPlane

log = logging.getLogger(__name__)

SERVICE_NAME = "modelguard-control-plane"


class _SpanSink(SpanExporter):
    """Hands finished spans, as OTLP, to a callable (the receiver's ingestion)."""

    def __init__(self, sink: Callable[[Any], None]) -> None:
        self.sink = sink

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            self.sink(encode_spans(spans))
        except Exception:  # telemetry must never break what it observes
            log.exception("recording the control plane's spans failed")
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class _MetricSink(MetricExporter):
    def __init__(self, sink: Callable[[Any], None]) -> None:
        super().__init__()
        self.sink = sink

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.sink(encode_metrics(metrics_data))
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


class SelfTelemetry:
    def __init__(
        self,
        record_spans: Callable[[Any], None],
        forward_metrics: Callable[[Any], None] | None = None,
        metric_interval_s: float = 10.0,
    ) -> None:
        resource = Resource.create({"service.name": SERVICE_NAME})
        self.tracer_provider = TracerProvider(resource=resource)
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(_SpanSink(record_spans)))
        self.tracer: Tracer = self.tracer_provider.get_tracer("modelguard.controlplane")
        self.reader = InMemoryMetricReader()
        readers: list[MetricReader] = [self.reader]
        if forward_metrics is not None:
            readers.append(
                PeriodicExportingMetricReader(
                    _MetricSink(forward_metrics),
                    export_interval_millis=metric_interval_s * 1000,
                )
            )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        meter = self.meter_provider.get_meter("modelguard.controlplane")
        self.compile_seconds = meter.create_histogram(
            "modelguard.compile.duration", unit="s", description="policies × inventory → IR → xDS"
        )
        self.push_seconds = meter.create_histogram(
            "modelguard.push.duration", unit="s", description="snapshot set → every sidecar ACKed"
        )
        self.convergence_seconds = meter.create_histogram(
            "modelguard.convergence.duration",
            unit="s",
            description="policy change → every sidecar ACKed",
        )
        self.verdicts = meter.create_counter(
            "modelguard.verdicts", description="sidecar requests by policy verdict"
        )
        self.rate_limit_decisions = meter.create_counter(
            "modelguard.ratelimit.decisions",
            description="sidecar requests by rate-limit decision (ok / limited, per limit)",
        )
        self._meter = meter
        self._pending_change: float | None = None  # when the oldest unconverged change came
        self._push_tasks: set[asyncio.Task[None]] = set()

    # -- spans and counts the control plane records directly --

    def span(self, name: str, **attributes: Any) -> Any:
        return self.tracer.start_as_current_span(name, attributes=_clean(attributes))

    def verdict(self, client: str, action: str, reason: str, **attributes: Any) -> None:
        """A verdict of the control plane about a client (alert, throttle, quarantine):
        one span, so it shows in traces and backends beside the requests that caused it."""
        with self.span(
            "modelguard.verdict",
            **{"modelguard.client.key_hash": client, "modelguard.verdict": action},
            **{"modelguard.verdict.reason": reason},
            **attributes,
        ):
            pass

    def observe_requests(self, records: Iterable[Record]) -> None:
        """Counts the sidecars' access-log records by verdict and rate-limit decision.

        Counted per export, then added once per distinct set of attributes: an OTel
        counter's add costs more than the rest of a record's ingestion."""
        verdicts: collections.Counter[tuple[str, str]] = collections.Counter()
        decisions: collections.Counter[tuple[bool, str, str]] = collections.Counter()
        for record in records:
            if record.kind != "log" or not record.verdict:
                continue
            verdicts[record.verdict, record.service] += 1
            limited = record.verdict == "rate_limited"
            decisions[limited, record.service, record.rule if limited else ""] += 1
        for (verdict, service), count in verdicts.items():
            self.verdicts.add(count, {"verdict": verdict, "service": service})
        for (limited, service, limit), count in decisions.items():
            attrs = {"decision": "limited" if limited else "ok", "service": service}
            if limit:
                attrs["limit"] = limit
            self.rate_limit_decisions.add(count, attrs)

    # -- observing the control plane without changing it --

    def instrument(self, plane: ControlPlane) -> None:
        """Spans for policy loads, compiles and pushes of ``plane``; gauges of its state.

        """
        plane.store.subscribe(self._on_policies)

        def on_rebuild(done: Rebuild) -> None:
            span = self.tracer.start_span(
                "modelguard.compile",
                start_time=done.started_ns,
                attributes=_clean(
                    {
                        "sidecars": done.sidecars,
                        "modelguard.revision": done.revision,
                        "modelguard.snapshots_changed": len(done.changed),
                    }
                ),
            )
            span.end(end_time=done.started_ns + int(done.seconds * 1e9))
            self.compile_seconds.record(done.seconds)
            self._track_push(plane)

        plane.pipeline.observers.append(on_rebuild)

        def connected(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(len(plane.sync_status.node_ids()))

        def nacks(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(sum(c.nacks for c in plane.sync_status.counters().values()))

        self._meter.create_observable_gauge(
            "modelguard.sidecars.connected", [connected], description="sidecars with a stream"
        )
        self._meter.create_observable_counter(
            "modelguard.xds.nacks", [nacks], description="configurations sidecars rejected"
        )

        def undecodable(_: CallbackOptions) -> Iterable[Observation]:
            # The plane's two servers exist once it has started (ControlPlane.start).
            for server in (plane._xds_server, plane._admin_server):
                if server is None:
                    continue
                for (service, method), count in decode_failures(server).counts().items():
                    yield Observation(count, {"service": service, "method": method})

        self._meter.create_observable_counter(
            "modelguard.grpc.undecodable_requests",
            [undecodable],
            description="unary requests refused because their body did not decode",
        )

    def _on_policies(self, policy_set: Any) -> None:
        if self._pending_change is None:
            self._pending_change = time.monotonic()
        with self.span(
            "modelguard.policy.load",
            **{
                "modelguard.revision": policy_set.revision,
                "modelguard.policies": len(policy_set.policies),
            },
        ):
            pass

    def _track_push(self, plane: ControlPlane) -> None:
        versions = {
            node: snapshot.version
            for node in plane.cache.node_ids()
            if (snapshot := plane.cache.get(node)) is not None
        }
        connected = set(plane.sync_status.node_ids())
        versions = {n: v for n, v in versions.items() if n in connected}
        if not versions:
            self._pending_change = None
            return
        started_wall, started = time.time_ns(), time.monotonic()
        changed_at = self._pending_change

        async def wait() -> None:
            try:
                await plane.sync_status.wait_synced(snapshot_versions=versions, timeout=60)
            except TimeoutError as err:
                failed: Span = self.tracer.start_span(
                    "modelguard.push",
                    start_time=started_wall,
                    attributes={"sidecars": len(versions)},
                )
                failed.set_attribute("error", str(err))
                failed.end()
                return
            done = time.monotonic()
            pushed: Span = self.tracer.start_span(
                "modelguard.push", start_time=started_wall, attributes={"sidecars": len(versions)}
            )
            pushed.end()
            self.push_seconds.record(done - started)
            if changed_at is not None and self._pending_change == changed_at:
                self.convergence_seconds.record(done - changed_at)
                self._pending_change = None

        task = asyncio.get_running_loop().create_task(wait())
        self._push_tasks.add(task)
        task.add_done_callback(self._push_tasks.discard)

    # -- reading --

    def metric_points(self) -> list[tuple[str, dict[str, str], float, int, str]]:
        """(name, attributes, value or sum, count, unit) of every metric now."""
        data = self.reader.get_metrics_data()
        out: list[tuple[str, dict[str, str], float, int, str]] = []
        if data is None:
            return out
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        attrs = {k: str(v) for k, v in (point.attributes or {}).items()}
                        if isinstance(point, HistogramDataPoint):
                            out.append(
                                (
                                    metric.name,
                                    attrs,
                                    float(point.sum),
                                    point.count,
                                    metric.unit or "",
                                )
                            )
                        elif isinstance(point, NumberDataPoint):
                            out.append(
                                (metric.name, attrs, float(point.value), 0, metric.unit or "")
                            )
        return out

    async def shutdown(self) -> None:
        for task in list(self._push_tasks):
            task.cancel()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}
