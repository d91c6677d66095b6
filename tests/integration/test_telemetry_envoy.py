"""Telemetry end to end: real Envoy sidecars → OTLP receiver → store, admin, CLI, forwarding."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import token_bucket_pb2
from google.protobuf import duration_pb2, wrappers_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from polling import eventually

import controlplane.translate as translate_package
from controlplane.netutil import http_request
from controlplane.telemetry.records import hash_secret
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.translate.module import Module
from controlplane.translate.protos import pack
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[2]
ACCESS = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  defaultAction: Deny
  rules:
  - name: predict
    action: Allow
    to: {methods: [POST], paths: [/v1/predict]}
  - name: no-admin
    action: Deny
    to: {paths: [/v1/admin*]}
  - name: admin
    action: Allow
    to: {paths: [/v1/admin*]}
"""
INSTANCE = {"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}
LIMIT = "demo.digits-model.burst"
BURST = 4


class LocalBurstLimit(Module):
    """A stand-in for the rate-limit module: a sidecar-wide token bucket of BURST requests
    that names itself in x-modelguard-limit, as rate limits tell telemetry which they are."""

    name = "test.local_ratelimit"

    def http_filters(self, ir: Any) -> list[hcm_pb2.HttpFilter]:
        config = local_rate_limit_pb2.LocalRateLimit(
            stat_prefix="test_burst",
            token_bucket=token_bucket_pb2.TokenBucket(
                max_tokens=BURST,
                tokens_per_fill=wrappers_pb2.UInt32Value(value=BURST),
                fill_interval=duration_pb2.Duration(seconds=3600),
            ),
            filter_enabled=_percent(),
            filter_enforced=_percent(),
            response_headers_to_add=[
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="x-modelguard-limit", value=LIMIT)
                )
            ],
        )
        name = "envoy.filters.http.local_ratelimit"
        return [hcm_pb2.HttpFilter(name=name, typed_config=pack(config))]


def _percent() -> Any:
    from envoy.config.core.v3 import base_pb2 as b
    from envoy.type.v3 import percent_pb2

    return b.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )


class Collector:
    """A test OTLP backend: records every export it gets."""

    def __init__(self) -> None:
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.logs: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.server = grpc.aio.server()
        outer = self

        class T(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            async def Export(self, request: Any, context: Any) -> Any:
                outer.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        class L(logs_service_pb2_grpc.LogsServiceServicer):  # type: ignore[misc]
            async def Export(self, request: Any, context: Any) -> Any:
                outer.logs.append(request)
                return logs_service_pb2.ExportLogsServiceResponse()

        class M(metrics_service_pb2_grpc.MetricsServiceServicer):  # type: ignore[misc]
            async def Export(self, request: Any, context: Any) -> Any:
                outer.metrics.append(request)
                return metrics_service_pb2.ExportMetricsServiceResponse()

        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(T(), self.server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(L(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(M(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def span_attrs(self) -> list[tuple[str, str, dict[str, str]]]:
        """(service, span name, attributes) of every span received."""
        out = []
        for request in self.traces:
            for rs in request.resource_spans:
                res = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {kv.key: kv.value.string_value for kv in span.attributes}
                        out.append((res.get("service.name", ""), span.name, attrs))
        return out

    def log_attrs(self) -> list[dict[str, str]]:
        return [
            {kv.key: kv.value.string_value for kv in record.attributes}
            for request in self.logs
            for rl in request.resource_logs
            for sl in rl.scope_logs
            for record in sl.log_records
        ]


class System(Deployment):
    collector: Collector  # the forwarding endpoint's, set by the fixture

    async def call(self, method: str, path: str, headers: dict[str, str] | None = None) -> int:
        body = json.dumps(INSTANCE).encode() if method == "POST" else None
        status, _, _ = await asyncio.to_thread(
            http_request,
            method,
            f"http://127.0.0.1:{self.listen_port}{path}",
            body,
            {"content-type": "application/json", **(headers or {})},
        )
        return status


@pytest.fixture
async def system(
    tmp_path: Path, demo_model: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[System]:
    registry = list(translate_package.REGISTRY)
    router = next(i for i, m in enumerate(registry) if m.name == "envoy.filters.http.router")
    registry.insert(router, LocalBurstLimit())
    monkeypatch.setattr(translate_package, "REGISTRY", tuple(registry))
    collector = Collector()
    await collector.server.start()
    try:
        async with await System.start(
            tmp_path,
            demo_model[1],
            {"access.yaml": ACCESS},
            ready_timeout=20,
            xds_port=0,
            admin_port=0,
            telemetry=TelemetrySettings(
                # Every request traced (the default is 1 %): the test counts spans.
                sampling_percent=100.0,
                header_attributes=("user-agent", "x-api-key"),
                forward_endpoint=f"127.0.0.1:{collector.port}",
            ),
        ) as system:
            system.collector = collector
            yield system
    finally:
        await collector.server.stop(0)


def _logs(system: System, **match: str) -> list[Any]:
    return [
        r
        for r in system.plane.telemetry.store.query(_query(kind="log"), 1000)
        if all(getattr(r, k) == v for k, v in match.items())
    ]


def _query(**kw: Any) -> Any:
    from controlplane.telemetry.store import Query

    return Query(**kw)


async def test_requests_produce_spans_and_logs_with_verdicts(system: System) -> None:
    key = "partner-secret-key-1"
    assert await system.call("POST", "/v1/predict", {"x-api-key": key, "user-agent": "t/1"}) == 200
    assert await system.call("GET", "/v1/model", {"x-api-key": key}) == 403  # default deny
    assert await system.call("GET", "/v1/admin/x", {"x-api-key": key}) == 403  # Deny rule
    codes = [await system.call("POST", "/v1/predict", {"x-api-key": key}) for _ in range(BURST)]
    assert 429 in codes

    await eventually(lambda: len(_logs(system, service="digits-model")) >= 3 + BURST)
    logs = _logs(system, service="digits-model")
    by_status: dict[int, list[Any]] = {}
    for record in logs:
        by_status.setdefault(record.status, []).append(record)

    allowed = by_status[200][0]
    attrs = dict(allowed.attributes)
    assert allowed.verdict == "allowed"
    assert allowed.client == hash_secret(key)
    assert allowed.node == "digits-model-0"
    assert allowed.route == "default"
    assert attrs["http.request.method"] == "POST"
    assert attrs["url.path"] == "/v1/predict"
    assert attrs["http.request.header.user-agent"] == "t/1"
    # The secret header asked for as an attribute is hashed too; the plain key is nowhere.
    assert attrs["http.request.header.x-api-key"] == hash_secret(key)
    assert all(key not in v for r in logs for _, v in r.attributes)

    denied = {r.rule for r in by_status[403]}
    assert {r.verdict for r in by_status[403]} == {"denied"}
    assert denied == {"default-deny", "demo.digits-model.no-admin"}

    limited = by_status[429]
    assert {r.verdict for r in limited} == {"rate_limited"}
    assert {r.rule for r in limited} == {LIMIT}
    assert "RL" in dict(limited[0].attributes)["envoy.response_flags"]

    # Spans: one per traced request (100 % sampling), carrying the same hashed client.
    def spans() -> list[Any]:
        return system.plane.telemetry.store.query(_query(kind="span", service="digits-model"), 1000)

    await eventually(lambda: len(spans()) >= 3 + BURST)
    span_verdicts = {r.verdict for r in spans()}
    assert {"allowed", "denied", "rate_limited"} <= span_verdicts
    assert all(r.client == hash_secret(key) for r in spans())
    assert all(len(r.trace_id) == 32 for r in spans())
    # Log records and spans of one request share its trace id.
    assert {r.trace_id for r in logs} & {r.trace_id for r in spans()}


async def test_forwarding_reaches_the_backend(system: System) -> None:
    key = "forwarded-key"
    assert await system.call("POST", "/v1/predict", {"x-api-key": key}) == 200
    assert await system.call("GET", "/v1/model", {"x-api-key": key}) == 403
    collector = system.collector

    def sidecar_logs() -> list[dict[str, str]]:
        paths = ("/v1/predict", "/v1/model")
        return [a for a in collector.log_attrs() if a.get("url.path") in paths]

    await eventually(lambda: len(sidecar_logs()) >= 2)
    verdicts = {a["modelguard.verdict"] for a in sidecar_logs()}
    assert verdicts == {"allowed", "denied"}
    assert all(a["modelguard.client.key_hash"] == hash_secret(key) for a in sidecar_logs())
    assert not any(key in v for a in collector.log_attrs() for v in a.values())

    await eventually(lambda: any(s == "digits-model" for s, _, _ in collector.span_attrs()))
    own = {n for s, n, _ in collector.span_attrs() if s == "modelguard-control-plane"}
    assert {"modelguard.policy.load", "modelguard.compile"} <= own
    await eventually(lambda: "modelguard.push" in {n for s, n, _ in collector.span_attrs()})


async def test_traces_cli_json_returns_the_scenario(system: System) -> None:
    key = "cli-key"
    assert await system.call("POST", "/v1/predict", {"x-api-key": key}) == 200
    assert await system.call("GET", "/v1/model", {"x-api-key": key}) == 403
    await eventually(lambda: len(_logs(system, client=hash_secret(key))) >= 2)

    def cli(*args: str) -> list[dict[str, Any]]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "controlplane.app.cli",
                "traces",
                "--admin",
                f"127.0.0.1:{system.plane.admin_port}",
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=True,
        )
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    records = await asyncio.to_thread(cli, "--client", key, "--kind", "log")
    assert [(r["status"], r["verdict"]) for r in records] == [(200, "allowed"), (403, "denied")]
    assert all(r["client"] == hash_secret(key) for r in records)
    denied = await asyncio.to_thread(cli, "--verdict", "denied", "--service", "digits-model")
    assert denied and all(r["verdict"] == "denied" for r in denied)
    assert await asyncio.to_thread(cli, "--client", key, "--status", "5xx") == []


EXTRACTION = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities", label: "$.predictions[*].label"}
  output:
    topK: 1
    tierHeader: x-tier
    tiers:
      trial: {labelOnly: true}
      internal: {}
"""


async def test_hardened_answers_are_logged_with_the_hardening_that_changed_them(
    system: System, tmp_path: Path
) -> None:
    (tmp_path / "policies" / "extraction.yaml").write_text(EXTRACTION)

    # No probe requests: the sidecar's burst limit allows only BURST of them. Ready when the
    # filter is configured (its stats exist) and the listener's access log reads its mark.
    def configured() -> bool:
        listeners = system.envoy.config_dump("dynamic_listeners")["configs"]
        return bool(system.envoy.stats("wasmcustom.modelguard")) and all(
            "wasm.modelguard.hardened" in json.dumps(listener.get("active_state", {}))
            for listener in listeners
        )

    await eventually(configured)
    first = len(_logs(system, service="digits-model"))
    calls = [("a", ""), ("b", "trial"), ("c", "internal")]
    for key, tier in calls:
        headers = {"x-api-key": key, **({"x-tier": tier} if tier else {})}
        assert await system.call("POST", "/v1/predict", headers) == 200
    # A request the model refuses: its answer has no scores, so it passes unchanged.
    await asyncio.to_thread(
        http_request,
        "POST",
        f"http://127.0.0.1:{system.listen_port}/v1/predict",
        b"not json",
        {"content-type": "text/plain", "x-api-key": "d"},
    )
    await eventually(lambda: len(_logs(system, service="digits-model")) >= first + 4)
    by_client = {r.client: r for r in _logs(system, service="digits-model")}
    verdicts = {
        k: (by_client[hash_secret(k)].verdict, by_client[hash_secret(k)].rule) for k in "abc"
    }
    assert verdicts == {
        "a": ("hardened", "default"),
        "b": ("hardened", "trial"),
        # A tier that changes nothing: untouched, no mark.
        "c": ("allowed", ""),
    }
    untouched = dict(by_client[hash_secret("c")].attributes)
    assert untouched.get("modelguard.output.hardened", "-") == "-"
    # An answer without scores passes unchanged: not hardened either.
    assert by_client[hash_secret("d")].verdict != "hardened"
