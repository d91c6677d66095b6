"""Cost of egress control on the workload's way out, as throughput ratios.

One sidecar Envoy (one worker) between ``wrk`` (the workload, HTTP/1.1 keep-alive GETs with
the destination's Host) and a fixed destination (a second Envoy answering with
``direct_response``). Variants, interleaved in rounds, measured in the same run:

  bare        a plain router to a static cluster (the baseline: a proxy with no policy)
  egress      the outbound listener exactly as translate/egress.py makes it: the
              destination allowed by Host, RBAC, dynamic forward proxy (DNS cached),
              stdout JSON decision log
  egress+otel the same with telemetry on: each decision also an OpenTelemetry log record
              to the control plane's real OTLP receiver (grpc.aio, in this process)

    .venv/bin/python bench/egress.py [--seconds 5] [--rounds 3] [--connections 16]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.load import (
    alternate,
    bootstrap,
    cluster,
    hcm,
    listener,
    print_ratios,
    require_wrk,
    wrk_arguments,
    wrk_port,
)
from telemetry import start_receiver

from controlplane.api import parse_documents
from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import Query, TelemetryStore
from controlplane.translate import names, translate
from controlplane.translate.render import validation_bootstrap

HOST = "destination.localhost"  # Envoy's resolver answers 127.0.0.1 for .localhost


def outbound_sidecar(
    admin: int, outbound: int, destination: int, receiver: int, telemetry: bool
) -> dict[str, Any]:
    sidecar = Sidecar(
        node_id="bench-0",
        service="bench",
        namespace="bench",
        identity="spiffe://b/ns/bench/sa/bench",
        app_port=1,
        inbound_port=free_port(),
        inbound_address="127.0.0.1",
        outbound_port=outbound,
    )
    policy = {
        "apiVersion": "modelguard.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "bench", "namespace": "bench"},
        "spec": {
            "targetRef": {"service": "bench"},
            "allow": [{"host": HOST, "ports": [destination], "protocol": "HTTP"}],
        },
    }
    loaded, violations = parse_documents(yaml.safe_dump(policy), "bench")
    assert not violations
    ir = compile_sidecar(
        sidecar, [lp.policy for lp in loaded], TelemetrySettings(enabled=telemetry)
    )
    static = validation_bootstrap(translate(ir))["static_resources"]
    listeners = [li for li in static["listeners"] if li["name"] == f"outbound|{outbound}"]
    clusters = [c for c in static["clusters"] if c["name"].startswith("outbound|")]
    clusters.append(cluster(names.CONTROL_PLANE_CLUSTER, receiver, http2=True))
    return bootstrap(admin, listeners, clusters)


def main() -> int:
    args = wrk_arguments(__doc__.splitlines()[0]).parse_args()
    require_wrk()
    store = TelemetryStore(max_records=10**7, max_bytes=4 * 1024**3)
    receiver = start_receiver(store)
    work = Path(tempfile.mkdtemp(prefix="modelguard-bench-egress-"))
    destination, destination_admin = free_port(), free_port()
    lua = work / "get.lua"
    lua.write_text(f'wrk.method = "GET"\nwrk.headers["Host"] = "{HOST}:{destination}"\n')
    upstream = EnvoyProcess(
        bootstrap(
            destination_admin,
            [
                listener(
                    destination,
                    hcm([], {"direct_response": {"status": 200, "body": {"inline_string": "ok"}}}),
                )
            ],
            [],
        ),
        admin_port=destination_admin,
        log_level="warn",
        concurrency=1,
    )
    sidecars: dict[str, tuple[EnvoyProcess, int]] = {}
    try:
        upstream.start()
        upstream.wait_ready(20)
        for name in ("bare", "egress", "egress+otel"):
            port, admin = free_port(), free_port()
            if name == "bare":
                manager = hcm([], {"route": {"cluster": "destination"}})
                config = bootstrap(
                    admin, [listener(port, manager)], [cluster("destination", destination)]
                )
            else:
                config = outbound_sidecar(
                    admin, port, destination, receiver, telemetry=name == "egress+otel"
                )
            envoy = EnvoyProcess(
                config,
                admin_port=admin,
                log_level="warn",
                concurrency=1,
                log_path=work / f"{name}.log",
            )
            envoy.start()
            envoy.wait_ready(20)
            sidecars[name] = (envoy, port)
            status, _, body = http_request(
                "GET", f"http://127.0.0.1:{port}/", None, {"host": f"{HOST}:{destination}"}
            )
            assert status == 200, (name, status, body)
            wrk_port(port, 1, args.connections, lua)
        runs = alternate(
            sidecars,
            args.rounds,
            lambda name: wrk_port(sidecars[name][1], args.seconds, args.connections, lua),
        )
        time.sleep(2.0)  # the last log batches (1 s flush) land
        labels = {
            "bare": "router only (baseline)",
            "egress": "outbound listener (allowed host)",
            "egress+otel": "+ OTel decision log to the control plane",
        }
        print_ratios(labels, {name: [r.rps for r in rs] for name, rs in runs.items()})
        served = sum(r.requests for r in runs["egress+otel"])
        records = store.query(Query(kind="log"), 10**7)
        print(
            f"\nreceiver: {len(records):,} egress log records for the egress+otel sidecar's "
            f"~{served:,} measured requests (+ warm-up)"
        )
    finally:
        for envoy, _ in sidecars.values():
            envoy.stop()
        upstream.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
