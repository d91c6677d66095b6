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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.prometheus import PrometheusMetricReader
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
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.grpcutil import decode_failures
from controlplane.telemetry.records import Record
from controlplane.xds.status import State, SyncStatus

log = logging.getLogger(__name__)

SERVICE_NAME = "modelguard-control-plane"
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FIDELITY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
VERDICT_KINDS = (
    ("suspicion", "alert"),
    ("suspicion", "throttle"),
    ("detection", "alert"),
    ("detection", "quarantine"),
)
SERIES_BUCKET_S, SERIES_BUCKETS = 5, 120  # the page's chart: 10 minutes in 5 s steps
SYNC_STATES = tuple(str(state) for state in State)  # every one shown, 0 when none


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


class RebuildDone(Protocol):
    """What the pipeline reports of one rebuild (``pipeline.Rebuild``)."""

    @property
    def revision(self) -> int: ...

    @property
    def sidecars(self) -> int: ...

    @property
    def changed(self) -> tuple[str, ...]: ...

    @property
    def started_ns(self) -> int: ...

    @property
    def seconds(self) -> float: ...


class MonitorCounts(Protocol):
    """What the gauges read of the extraction monitor (``ExtractionMonitor``)."""

    def counters(self) -> tuple[Any, Any]: ...

    def client_count(self) -> int: ...


@dataclass(frozen=True)
class Observed:
    """The parts of a control plane its own instrumentation reads, each as narrow as what is
    read of it. The app hands them over: telemetry sits below the boxes it observes and
    imports none of them (nor the control-plane object)."""

    subscribe_policies: Callable[[Callable[[Any], None]], None]  # PolicyStore.subscribe
    policy_states: Callable[[], Iterable[tuple[str, str]]]  # (kind, state) of each policy
    extraction_policies: Callable[[], Iterable[str]]  # namespace/name of each ExtractionPolicy
    on_rebuild: Callable[[Callable[[RebuildDone], None]], None]  # Pipeline.observers.append
    sync_status: SyncStatus
    snapshot_versions: Callable[[], dict[str, str]]  # node → its snapshot's version
    grpc_servers: Callable[[], Iterable[Any]]  # the servers started so far (grpc.aio.Server)
    enforcement_kinds: Callable[[], Iterable[str]]  # the kind of each active enforcement
    monitor: MonitorCounts
    verdict_counts: Callable[[], dict[tuple[str, str, str], int]]  # (policy, stage, action)


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
        # /metrics (telemetry/http.py): the same instruments, read by Prometheus' exporter
        # into a registry of this object's own (never prometheus_client's global one).
        self.prometheus_registry = CollectorRegistry(auto_describe=False)
        self.prometheus_reader = PrometheusMetricReader(
            disable_target_info=True, registry=self.prometheus_registry
        )
        readers: list[MetricReader] = [self.reader, self.prometheus_reader]
        if forward_metrics is not None:
            readers.append(
                PeriodicExportingMetricReader(
                    _MetricSink(forward_metrics),
                    export_interval_millis=metric_interval_s * 1000,
                )
            )
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        meter = self.meter_provider.get_meter("modelguard.controlplane")
        # Seconds, not OTel's default buckets (0 … 10000, made for milliseconds): a compile
        # takes milliseconds, a push to a thousand sidecars a few seconds.
        self.compile_seconds = meter.create_histogram(
            "modelguard.compile.duration",
            unit="s",
            description="policies × inventory → IR → xDS",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.push_seconds = meter.create_histogram(
            "modelguard.push.duration",
            unit="s",
            description="snapshot set → every sidecar ACKed",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.convergence_seconds = meter.create_histogram(
            "modelguard.convergence.duration",
            unit="s",
            description="policy change → every sidecar ACKed",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
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
        self._series: collections.deque[tuple[int, collections.Counter[str]]] = (
            collections.deque(maxlen=SERIES_BUCKETS)
        )
        self._series_lock = threading.Lock()

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
        if verdicts:
            self._series_add(verdicts)
        for (limited, service, limit), count in decisions.items():
            attrs = {"decision": "limited" if limited else "ok", "service": service}
            if limit:
                attrs["limit"] = limit
            self.rate_limit_decisions.add(count, attrs)

    def _series_add(self, verdicts: collections.Counter[tuple[str, str]]) -> None:
        """Requests by verdict in SERIES_BUCKET_S buckets, the live page's chart: a few
        hundred counts at most, whatever the traffic."""
        bucket = int(time.time() // SERIES_BUCKET_S * SERIES_BUCKET_S)
        with self._series_lock:
            if not self._series or self._series[-1][0] != bucket:
                self._series.append((bucket, collections.Counter()))
            counts = self._series[-1][1]
            for (verdict, _service), count in verdicts.items():
                counts[verdict] += count

    def verdict_series(self) -> list[tuple[int, dict[str, int]]]:
        """(bucket start, unix seconds; requests by verdict) of the last buckets, oldest
        first; buckets without requests are absent."""
        with self._series_lock:
            return [(start, dict(counts)) for start, counts in self._series]

    # -- observing the control plane without changing it --

    def instrument(self, plane: Observed, store: Any = None, forwarder: Any = None) -> None:
        """Spans for policy loads, compiles and pushes of ``plane``; gauges of its state and
        of the telemetry ``store`` and ``forwarder`` (the service's own)."""
        plane.subscribe_policies(self._on_policies)

        def on_rebuild(done: RebuildDone) -> None:
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

        plane.on_rebuild(on_rebuild)

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
            # The plane's servers exist once it has started (ControlPlane.start).
            for server in plane.grpc_servers():
                for (service, method), count in decode_failures(server).counts().items():
                    yield Observation(count, {"service": service, "method": method})

        self._meter.create_observable_counter(
            "modelguard.grpc.undecodable_requests",
            [undecodable],
            description="unary requests refused because their body did not decode",
        )
        self._instrument_state(plane, store, forwarder)

    def _instrument_state(self, plane: Observed, store: Any, forwarder: Any) -> None:
        """Gauges and counters read from the boxes' own state at collection time (every
        scrape or export), so nothing on a request path pays for them. Labels are bounded:
        states, kinds, reasons and policy names, never a client key (the live page ranks
        clients; metrics do not)."""
        meter = self._meter

        def sidecars(_: CallbackOptions) -> Iterable[Observation]:
            counts = collections.Counter(str(node.state) for node in plane.sync_status.nodes())
            for state in SYNC_STATES:
                yield Observation(counts.get(state, 0), {"state": state})

        meter.create_observable_gauge(
            "modelguard.sidecars", [sidecars], description="connected sidecars by sync state"
        )

        def policies(_: CallbackOptions) -> Iterable[Observation]:
            counts = collections.Counter(plane.policy_states())
            for (kind, state), count in sorted(counts.items()):
                yield Observation(count, {"kind": kind, "state": state})

        meter.create_observable_gauge(
            "modelguard.policies", [policies], description="policies by kind and state"
        )

        def enforcements(_: CallbackOptions) -> Iterable[Observation]:
            active = collections.Counter(plane.enforcement_kinds())
            for kind in ("quarantine", "throttle"):
                yield Observation(active[kind], {"kind": kind})

        meter.create_observable_gauge(
            "modelguard.extraction.enforcements",
            [enforcements],
            description="clients quarantined or throttled now",
        )

        def monitor_queries(_: CallbackOptions) -> Iterable[Observation]:
            stats, _tracked = plane.monitor.counters()
            yield Observation(stats.queries, {"outcome": "observed"})
            yield Observation(stats.unobserved, {"outcome": "unobserved"})
            yield Observation(sum(stats.unparsable.values()), {"outcome": "unreadable"})

        meter.create_observable_counter(
            "modelguard.extraction.queries",
            [monitor_queries],
            description="queries the extraction monitor saw (observed), was told it could "
            "not see (unobserved) or could not read (unreadable)",
        )

        def tracked(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(plane.monitor.client_count())

        meter.create_observable_gauge(
            "modelguard.extraction.clients", [tracked], description="clients the monitor tracks"
        )

        def extraction_verdicts(_: CallbackOptions) -> Iterable[Observation]:
            counts = plane.verdict_counts()
            # Every watched policy's series from 0, so rate() sees its first verdict.
            for name in plane.extraction_policies():
                for stage, action in VERDICT_KINDS:
                    counts.setdefault((name, stage, action), 0)
            for (policy_name, stage, action), count in sorted(counts.items()):
                yield Observation(
                    count, {"policy": policy_name, "stage": stage, "action": action}
                )

        meter.create_observable_counter(
            "modelguard.extraction.verdicts",
            [extraction_verdicts],
            description="the extraction monitor's verdicts by policy, stage and action",
        )

        def fidelity(_: CallbackOptions) -> Iterable[Observation]:
            # Clients by the monitor's estimated extraction fidelity (issue 10), as a
            # histogram's cumulative buckets (le): histogram_quantile works on it, and no
            # client is named. Absent where the monitor keeps no estimate.
            risks = getattr(plane.monitor, "risks", None)
            if risks is None:
                return
            estimates = [r[2] for r in risks()]
            for bound in FIDELITY_BUCKETS:
                yield Observation(
                    sum(1 for f in estimates if f <= bound), {"le": _bucket_label(bound)}
                )
            yield Observation(len(estimates), {"le": "+Inf"})

        meter.create_observable_gauge(
            "modelguard.extraction.fidelity.clients",
            [fidelity],
            description="clients whose estimated extraction fidelity is at most le",
        )

        def records(_: CallbackOptions) -> Iterable[Observation]:
            if store is None:
                return
            stats = store.stats()
            yield Observation(stats.received, {"outcome": "received"})
            yield Observation(stats.evicted, {"outcome": "evicted"})
            yield Observation(stats.watcher_dropped, {"outcome": "watcher_dropped"})
            if forwarder is not None:
                yield Observation(forwarder.dropped, {"outcome": "forward_dropped"})
                yield Observation(forwarder.failed, {"outcome": "forward_failed"})

        meter.create_observable_counter(
            "modelguard.telemetry.records",
            [records],
            description="spans and access-log records the OTLP receiver stored, evicted or "
            "dropped",
        )

        def stored(_: CallbackOptions) -> Iterable[Observation]:
            if store is not None:
                yield Observation(store.stats().records)

        meter.create_observable_gauge(
            "modelguard.telemetry.stored_records", [stored], description="records held now"
        )

        def refused(_: CallbackOptions) -> Iterable[Observation]:
            for reason, count in plane.sync_status.drops().items():
                yield Observation(count, {"reason": reason})

        meter.create_observable_counter(
            "modelguard.xds.refused",
            [refused],
            description="sidecar connections or calls refused, by reason",
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

    def _track_push(self, plane: Observed) -> None:
        versions = plane.snapshot_versions()
        connected = set(plane.sync_status.node_ids())
        versions = {n: v for n, v in versions.items() if n in connected}
        if not versions:
            self._pending_change = None
            return
        started_wall, started = time.time_ns(), time.monotonic()
        changed_at = self._pending_change

        async def wait() -> None:
            try:
                await plane.sync_status.wait_synced(
                    snapshot_versions=versions, timeout=60, gone_is_done=True
                )
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

    def prometheus_text(self) -> bytes:
        """Every metric now in Prometheus' text format (what /metrics serves)."""
        return generate_latest(self.prometheus_registry)

    async def shutdown(self) -> None:
        for task in list(self._push_tasks):
            task.cancel()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def _bucket_label(bound: float) -> str:
    return f"{bound:g}"


def _clean(attributes: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}
