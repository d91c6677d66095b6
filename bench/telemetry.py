"""Cost of sidecar telemetry (OpenTelemetry tracer + access logger), as throughput ratios.

One sidecar Envoy (one worker) in front of a fixed upstream (a second Envoy answering with
``direct_response``), so the sidecar's own work is what is measured. Variants, interleaved
in rounds and measured in the same run with ``wrk`` (HTTP/1.1 keep-alive POSTs):

  bare       router only (the baseline)
  default    + tracer (100 % sampled) and access logger as translate/telemetry.py makes
             them, Envoy's default tracer batching (one export per 5 spans)
  batched    the same with the bootstrap's runtime layer (256 spans or 1 s)

Both export to the control plane's real OTLP receiver (grpc.aio, in this process), which
also reports how many spans and log records arrived: what a sidecar sends must arrive.

    .venv/bin/python bench/telemetry.py [--seconds 5] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wasm_filter import ANSWER, QUERY, _bootstrap, _cluster, _hcm, _listener, run_wrk

from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.sidecar.bootstrap import TELEMETRY_RUNTIME, XDS_CLUSTER
from controlplane.telemetry.receiver import OtlpReceiver
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import TelemetryStore
from controlplane.translate import telemetry as telemetry_translate
from controlplane.translate.render import to_dict

SIDECAR = Sidecar(
    node_id="bench-0",
    service="bench",
    namespace="bench",
    identity="spiffe://b/ns/b/sa/b",
    app_port=1,
    inbound_port=1,
)


def start_receiver(store: TelemetryStore) -> int:
    port_box: list[int] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        server = grpc.aio.server()
        OtlpReceiver(TelemetrySettings(), store).add_to(server)
        port_box.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await server.wait_for_termination()

    threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True).start()
    ready.wait(10)
    return port_box[0]


def telemetry_hcm(hcm: dict[str, Any]) -> dict[str, Any]:
    ir = compile_sidecar(SIDECAR, [], TelemetrySettings())
    assert ir.telemetry is not None
    config = hcm["typed_config"]
    config["tracing"] = to_dict(telemetry_translate.tracing(ir, ir.telemetry))
    config["access_log"] = [to_dict(telemetry_translate.access_log(ir, ir.telemetry))]
    return hcm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (Debian: apt-get install wrk)")
    store = TelemetryStore(max_records=10**7, max_bytes=4 * 1024**3)
    receiver_port = start_receiver(store)
    work = Path(tempfile.mkdtemp(prefix="modelguard-bench-telemetry-"))
    lua = work / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(QUERY))}\n"
        'wrk.headers["content-type"] = "application/json"\n'
        'wrk.headers["x-api-key"] = "bench-client"\n'
    )
    upstream_port, upstream_admin = free_port(), free_port()
    route = {
        "direct_response": {"status": 200, "body": {"inline_string": json.dumps(ANSWER)}},
    }
    upstream = EnvoyProcess(
        _bootstrap(upstream_admin, [_listener(upstream_port, _hcm([], route))], []),
        admin_port=upstream_admin,
        log_level="warn",
        concurrency=1,
    )
    sidecars: dict[str, tuple[EnvoyProcess, int]] = {}
    try:
        upstream.start()
        upstream.wait_ready(20)
        for name in ("bare", "default", "batched"):
            port, admin = free_port(), free_port()
            hcm = _hcm([], {"route": {"cluster": "model"}})
            if name != "bare":
                hcm = telemetry_hcm(hcm)
            bootstrap = _bootstrap(
                admin,
                [_listener(port, hcm)],
                [
                    _cluster("model", upstream_port),
                    _cluster(XDS_CLUSTER, receiver_port, http2=True),
                ],
            )
            if name == "batched":
                bootstrap["layered_runtime"] = {
                    "layers": [{"name": "modelguard", "static_layer": dict(TELEMETRY_RUNTIME)}]
                }
            envoy = EnvoyProcess(bootstrap, admin_port=admin, log_level="warn", concurrency=1)
            envoy.start()
            envoy.wait_ready(20)
            sidecars[name] = (envoy, port)
            status, _, _ = http_request(
                "POST",
                f"http://127.0.0.1:{port}/v1/predict",
                json.dumps(QUERY).encode(),
                {"content-type": "application/json"},
            )
            assert status == 200, (name, status)
            run_wrk(port, 1, args.connections, lua)
        rps: dict[str, list[float]] = {name: [] for name in sidecars}
        for _ in range(args.rounds):
            for name, (_, port) in sidecars.items():
                rps[name].append(run_wrk(port, args.seconds, args.connections, lua)[0])
        time.sleep(2.0)  # the last batches (1 s flush) land
        sent = {
            name: envoy.stat("http.bench.downstream_rq_completed")
            for name, (envoy, _) in sidecars.items()
            if name != "bare"
        }
        base = statistics.median(rps["bare"])
        labels = {
            "bare": "router only (baseline)",
            "default": "+ OTel tracer + access log, default",
            "batched": "+ OTel, batched (256 spans / 1 s)",
        }
        print(f"{'sidecar carries':<38} {'req/s (median)':>15} {'ratio to bare':>14}")
        for name in sidecars:
            median = statistics.median(rps[name])
            print(f"{labels[name]:<38} {median:>15,.0f} {median / base:>14.2f}")
        stats = store.stats()
        spans = sum(1 for r in store.query(_all(), 10**7) if r.kind == "span")
        print(
            f"\nreceiver: {stats.received:,} records ({spans:,} spans, "
            f"{stats.received - spans:,} log records); sidecar request counters: {sent}"
        )
    finally:
        for envoy, _ in sidecars.values():
            envoy.stop()
        upstream.stop()
    return 0


def _all() -> Any:
    from controlplane.telemetry.store import Query

    return Query()


if __name__ == "__main__":
    raise SystemExit(main())
