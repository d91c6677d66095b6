"""Cost of the output-hardening Wasm filter and of its query feed, as throughput ratios.

One sidecar Envoy (one worker) in front of a fixed upstream: a second Envoy answering the
demo model's real JSON answer with ``direct_response``, so the upstream costs next to
nothing and the sidecar's own work is what is measured. Variants, interleaved in rounds
and all measured in the same run with ``wrk`` (HTTP/1.1 keep-alive POSTs):

  bare       router only (the baseline)
  harden     + the Wasm filter: top-1, 2 digits
  feed       + the Wasm filter: top-1, 2 digits, and the query feed to a no-op grpc.aio
             QueryFeed server (the extraction monitor's place)

For ``feed`` it also reports how many requests were shipped and how many were counted as
unobserved: the feed must keep up, and what it drops it must count.

``--compare OLD.wasm`` adds ``harden`` and ``feed`` with another build of the module (keep
the old one in /tmp, e.g. ``git show HEAD~1:wasm/modelguard_filter.wasm``), interleaved in
the same rounds. The sidecar's CPU per request is the figure to read (``/proc``, user +
system); requests/s moves with whatever else the machine runs.

``--instructions N`` counts instead the sidecar's instructions per request under valgrind's
callgrind (N requests on one keep-alive connection after N of warm-up, each variant alone):
slow, but the same on a loaded machine as on a quiet one (within ~1 %), so a small change
shows. The sidecar runs ~50x slower there, so the feed's batches are smaller than at full
speed (about 10 queries instead of ~100) and its per-batch cost weighs more.

    .venv/bin/python bench/wasm_filter.py [--seconds 5] [--rounds 3] [--connections 16]
        [--compare OLD.wasm] [--instructions 300]
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Static Envoy configs and the model-like backend shared by the data-path benches.
from lib.load import (
    QUERY,
    alternate,
    backend_envoy,
    bootstrap,
    cluster,
    cpu_seconds,
    hcm,
    listener,
    predict_script,
    require_wrk,
    serve_grpc,
    wrk_arguments,
    wrk_port,
)

from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.ir import ClientKeyIR, PolicyRef
from controlplane.local.envoy import EnvoyProcess, envoy_binary
from controlplane.netutil import free_port, http_request
from controlplane.policies.extraction.ir import ExtractionIR, HardeningIR, QueryFeedIR
from controlplane.policies.extraction.translate import extension_config
from controlplane.sidecar.bootstrap import XDS_CLUSTER
from controlplane.translate.render import to_dict

LABELS = {
    "bare": "router only (baseline)",
    "harden": "+ Wasm hardening (top-1, 2 digits)",
    "feed": "+ Wasm hardening + query feed",
    "harden-compare": "+ Wasm hardening, --compare module",
    "feed-compare": "+ hardening + feed, --compare module",
}


def wasm_filter(feed: bool, module: Path | None = None) -> dict[str, Any]:
    ir = ExtractionIR(
        policy=PolicyRef("ExtractionPolicy", "bench", "digits"),
        client_key=ClientKeyIR("header", "x-api-key"),
        features="$.instances[*]",
        instances=("instances", None),  # as compile derives it from features
        scores=("predictions", None, "probabilities"),
        output=HardeningIR(top_k=1, round_digits=2),
        feed=QueryFeedIR() if feed else None,
    )
    resource = to_dict(extension_config(ir, "bench-sidecar"))
    if module is not None:  # another build of the filter, in its own VM
        code = module.read_bytes()
        vm = resource["typed_config"]["config"]["vm_config"]
        vm["code"]["local"]["inline_bytes"] = base64.b64encode(code).decode()
        vm["vm_id"] = "modelguard-" + hashlib.sha256(code).hexdigest()[:16]
    return {"name": resource["name"], "typed_config": resource["typed_config"]}


class NoopFeed(feed_pb2_grpc.QueryFeedServicer):
    """Acks every batch: the baseline cost of receiving the feed, nothing else."""

    def __init__(self) -> None:
        self.batches = 0
        self.queries = 0
        self.unobserved = 0

    async def Report(
        self, request: feed_pb2.FeedBatch, context: grpc.aio.ServicerContext
    ) -> feed_pb2.FeedAck:
        self.batches += 1
        self.queries += len(request.queries)
        self.unobserved += sum(u.count for u in request.unobserved)
        return feed_pb2.FeedAck(accepted=len(request.queries))


def start_feed_server() -> tuple[NoopFeed, int]:
    servicer = NoopFeed()
    return servicer, serve_grpc(
        lambda server: feed_pb2_grpc.add_QueryFeedServicer_to_server(servicer, server)
    )


CALLGRIND = (
    "valgrind",
    "--tool=callgrind",
    "--instr-atstart=no",  # instrumented from the warm-up on, not during start-up
    "--smc-check=all-non-file",  # V8 and LuaJIT generate code
)


def instructions_per_request(envoy: EnvoyProcess, port: int, out: Path, requests: int) -> float:
    """Instructions the callgrind-run ``envoy`` spends per request (warm-up excluded)."""
    assert envoy.pid is not None
    pid = str(envoy.pid)

    def control(*args: str) -> None:
        subprocess.run(["callgrind_control", *args, pid], capture_output=True, check=True)

    def post(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = json.dumps(QUERY).encode()
        headers = {"content-type": "application/json", "x-api-key": "bench-client"}
        for _ in range(n):
            conn.request("POST", "/v1/predict", body, headers)
            conn.getresponse().read()
        conn.close()

    control("--instr=on")
    post(requests)
    control("--zero")
    post(requests)
    time.sleep(0.5)  # a feed flush lands inside the window
    control("--dump")
    total = 0
    for dump in out.glob(f"callgrind.{pid}*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
                break
    return total / requests


def main() -> int:
    parser = wrk_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--compare", type=Path, help="another build of the module, measured beside this one"
    )
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="count instructions per request under callgrind (N requests per variant)",
    )
    args = parser.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    if not args.instructions:
        require_wrk()

    feed, feed_port = start_feed_server()
    work = Path(tempfile.mkdtemp(prefix="modelguard-bench-wasm-"))
    lua = predict_script(work / "post.lua")
    upstream, upstream_port = backend_envoy()

    def sidecar(
        filters: list[dict[str, Any]], binary: Path | None = None
    ) -> tuple[EnvoyProcess, int]:
        """A sidecar Envoy (not started) carrying ``filters`` in front of the model."""
        port, admin = free_port(), free_port()
        manager = hcm(filters, {"route": {"cluster": "model"}})
        config = bootstrap(
            admin,
            [listener(port, manager)],
            [cluster("model", upstream_port), cluster(XDS_CLUSTER, feed_port, http2=True)],
        )
        envoy = EnvoyProcess(
            config, admin_port=admin, log_level="warn", concurrency=1, binary=binary
        )
        return envoy, port

    variants = {"bare": [], "harden": [wasm_filter(feed=False)], "feed": [wasm_filter(feed=True)]}
    if args.compare is not None:
        variants["harden-compare"] = [wasm_filter(feed=False, module=args.compare)]
        variants["feed-compare"] = [wasm_filter(feed=True, module=args.compare)]
    sidecars: dict[str, tuple[EnvoyProcess, int]] = {}
    wrapper = work / "envoy-callgrind"
    wrapper.write_text(
        f"#!/bin/sh\nexec {' '.join(CALLGRIND)} --callgrind-out-file={work}/callgrind.%p "
        f'{envoy_binary()} "$@"\n'
    )
    wrapper.chmod(0o755)
    try:
        upstream.start()
        upstream.wait_ready(20)
        if args.instructions:
            counts: dict[str, float] = {}
            for name, filters in variants.items():
                envoy, port = sidecar(filters, wrapper)
                try:
                    envoy.start(timeout=300)
                    envoy.wait_ready(300)
                    counts[name] = instructions_per_request(envoy, port, work, args.instructions)
                finally:
                    envoy.stop(grace=10)
            print(f"{'sidecar carries':<38} {'instructions/request':>21} {'ratio to bare':>14}")
            for name, count in counts.items():
                print(f"{LABELS[name]:<38} {count:>21,.0f} {count / counts['bare']:>14.2f}")
            print(f"\n{args.instructions} requests per variant under callgrind, after as many")
            return 0
        for name, filters in variants.items():
            envoy, port = sidecar(filters)
            envoy.start()
            envoy.wait_ready(20)
            sidecars[name] = (envoy, port)
            # Warm-up, and a check that the variant does what it claims.
            _, _, body = http_request(
                "POST",
                f"http://127.0.0.1:{port}/v1/predict",
                json.dumps(QUERY).encode(),
                {"content-type": "application/json", "x-api-key": "bench-client"},
            )
            probabilities = json.loads(body)["predictions"][0]["probabilities"]
            hardened = sum(1 for p in probabilities if p) == 1
            assert hardened == (name != "bare"), (name, probabilities)
            wrk_port(port, 1, args.connections, lua)

        def measure(name: str) -> tuple[float, float]:
            """(requests/s, the sidecar's CPU µs per request) of one wrk run."""
            envoy, port = sidecars[name]
            assert envoy.pid is not None
            before = cpu_seconds(envoy.pid)
            run = wrk_port(port, args.seconds, args.connections, lua)
            return run.rps, (cpu_seconds(envoy.pid) - before) / run.requests * 1e6

        runs = alternate(variants, args.rounds, measure)
        rps = {name: [rate for rate, _ in r] for name, r in runs.items()}
        cpu_us = {name: [cpu for _, cpu in r] for name, r in runs.items()}
        feeders = [envoy for name, (envoy, _) in sidecars.items() if name.startswith("feed")]
        stats: dict[str, int] = {}
        for envoy in feeders:
            for k, v in envoy.stats("wasmcustom.modelguard.bench.digits.").items():
                stats[k] = stats.get(k, 0) + v
        time.sleep(1.0)  # let the last batches land
        requests = sum(
            envoy.stats("http.bench.downstream_rq_completed").get(
                "http.bench.downstream_rq_completed", 0
            )
            for envoy in feeders
        )
        base = statistics.median(rps["bare"])
        base_cpu = statistics.median(cpu_us["bare"])
        print(
            f"{'sidecar carries':<38} {'req/s (median)':>15} {'ratio to bare':>14} "
            f"{'sidecar CPU/req':>16} {'CPU ratio':>10} {'CPU/req spread':>16}"
        )
        for name in variants:
            median = statistics.median(rps[name])
            cpu = statistics.median(cpu_us[name])
            print(
                f"{LABELS[name]:<38} {median:>15,.0f} {median / base:>14.2f} "
                f"{cpu:>13.0f} µs {cpu / base_cpu:>10.2f} "
                f"{min(cpu_us[name]):>8.0f}–{max(cpu_us[name]):.0f} µs"
            )
        print(
            f"\nfeed: {requests:,} requests through the feed sidecars; {feed.queries:,} queries "
            f"shipped in {feed.batches:,} batches ({feed.queries / max(feed.batches, 1):.0f} per "
            f"batch); unobserved reported {feed.unobserved:,}; filter counters: "
            + ", ".join(f"{k.rsplit('.', 1)[1]}={v}" for k, v in sorted(stats.items()) if v)
        )
        print(f"rounds: {args.rounds} x {args.seconds:.0f} s, wrk -t1 -c{args.connections}")
    finally:
        for envoy, _ in sidecars.values():
            envoy.stop()
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
