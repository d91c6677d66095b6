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

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.load import (
    QUERY,
    alternate,
    backend_envoy,
    bootstrap,
    cluster,
    hcm,
    listener,
    predict_script,
    print_ratios,
    require_wrk,
    serve_grpc,
    wrk_arguments,
    wrk_port,
)

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
    """The control plane's OTLP receiver, in this process: its port."""
    return serve_grpc(OtlpReceiver(TelemetrySettings(), store).add_to)


def telemetry_hcm(hcm: dict[str, Any]) -> dict[str, Any]:
    ir = compile_sidecar(SIDECAR, [], TelemetrySettings())
    assert ir.telemetry is not None
    config = hcm["typed_config"]
    config["tracing"] = to_dict(telemetry_translate.tracing(ir, ir.telemetry))
    config["access_log"] = [to_dict(telemetry_translate.access_log(ir, ir.telemetry))]
    return hcm


def main() -> int:
    args = wrk_arguments(__doc__.splitlines()[0]).parse_args()
    require_wrk()
    store = TelemetryStore(max_records=10**7, max_bytes=4 * 1024**3)
    receiver_port = start_receiver(store)
    work = Path(tempfile.mkdtemp(prefix="modelguard-bench-telemetry-"))
    lua = predict_script(work / "post.lua")
    upstream, upstream_port = backend_envoy()
    sidecars: dict[str, tuple[EnvoyProcess, int]] = {}
    try:
        upstream.start()
        upstream.wait_ready(20)
        for name in ("bare", "default", "batched"):
            port, admin = free_port(), free_port()
            manager = hcm([], {"route": {"cluster": "model"}})
            if name != "bare":
                manager = telemetry_hcm(manager)
            config = bootstrap(
                admin,
                [listener(port, manager)],
                [cluster("model", upstream_port), cluster(XDS_CLUSTER, receiver_port, http2=True)],
            )
            if name == "batched":
                config["layered_runtime"] = {
                    "layers": [{"name": "modelguard", "static_layer": dict(TELEMETRY_RUNTIME)}]
                }
            envoy = EnvoyProcess(config, admin_port=admin, log_level="warn", concurrency=1)
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
            wrk_port(port, 1, args.connections, lua)
        rps = alternate(
            sidecars,
            args.rounds,
            lambda name: wrk_port(sidecars[name][1], args.seconds, args.connections, lua).rps,
        )
        time.sleep(2.0)  # the last batches (1 s flush) land
        sent = {
            name: envoy.stat("http.bench.downstream_rq_completed")
            for name, (envoy, _) in sidecars.items()
            if name != "bare"
        }
        labels = {
            "bare": "router only (baseline)",
            "default": "+ OTel tracer + access log, default",
            "batched": "+ OTel, batched (256 spans / 1 s)",
        }
        print_ratios(labels, rps)
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
