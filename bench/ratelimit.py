"""Rate limit benchmarks, as ratios to a baseline measured in the same run.

1. Decisions/s of our rate limit service (``ShouldRateLimit``; memory and Redis backends)
   against a no-op ``grpc.aio`` server answering OK, each server pinned to CPU 0 and
   driven by the same grpc.aio client pinned to CPU 1; then p50/p99 latency at half of
   each one's own maximum (open loop).
2. Requests/s through a sidecar enforcing a per-client daily budget (RLQS: quota
   assignments, no per-request call) against the same sidecar without it, same run,
   driven by wrk with 100 client keys. The upstream is an Envoy direct response, so the
   sidecar, not a Python model, is what is measured.

    .venv/bin/python bench/ratelimit.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lib.load import start_pinned, start_redis, stop  # noqa: E402
from controlplane.compile.inputs.inventory import Sidecar  # noqa: E402
from controlplane.local.envoy import EnvoyProcess  # noqa: E402
from controlplane.netutil import free_port  # noqa: E402
from controlplane.ratelimit import RateLimitServices, backend_from_url  # noqa: E402
from controlplane.sidecar.bootstrap import build_bootstrap  # noqa: E402

CLIENTS = 1000
# No preexec_fn: forking a process with gRPC threads running is unsafe.
PIN_CPU1 = ["taskset", "-c", "1"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


# --- servers (child processes) -------------------------------------------------------------


class NoOp(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(self, request, context):  # type: ignore[no-untyped-def]
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


async def serve(kind: str, port: int, redis_url: str) -> None:
    server = grpc.aio.server()
    if kind == "noop":
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(NoOp(), server)
        services = None
    else:
        services = RateLimitServices(backend_from_url(redis_url if kind == "redis" else "memory"))
        services.add_to(server)
        await services.start()
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# --- the client ----------------------------------------------------------------------------


def request(i: int) -> rls_pb2.RateLimitRequest:
    entries = [
        ("limit", "bench.p.minute"),
        ("policy", "bench/p"),
        ("requests", "1000000000"),
        ("window", "60"),
        ("shadow", "false"),
        ("client", f"key-{i % CLIENTS}"),
    ]
    req = rls_pb2.RateLimitRequest(domain="modelguard")
    d = req.descriptors.add()
    for key, value in entries:
        d.entries.add(key=key, value=value)
    return req


async def max_rate(port: int, seconds: float, concurrency: int = 64) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        await stub.ShouldRateLimit(request(0), timeout=5)
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.perf_counter() < stop:
                await stub.ShouldRateLimit(request(i), timeout=5)
                done += 1
                i += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return done / (time.perf_counter() - started)


async def latencies(port: int, rate: float, seconds: float) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        samples: list[float] = []

        async def one(i: int) -> None:
            t0 = time.perf_counter()
            await stub.ShouldRateLimit(request(i), timeout=5)
            samples.append(time.perf_counter() - t0)

        tasks = []
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        q = statistics.quantiles(samples, n=100)
        return q[49] * 1e3, q[98] * 1e3


def start_server(kind: str, redis_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [sys.executable, __file__, "--serve", kind, "--port", str(port), "--redis", redis_url]
    return start_pinned(argv, port), port


def service_bench(redis_url: str, seconds: float) -> list[tuple[str, float, float, float]]:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1})
    rows = []
    for kind in ("noop", "memory", "redis"):
        process, port = start_server(kind, redis_url)
        try:
            rate = asyncio.run(max_rate(port, seconds))
            p50, p99 = asyncio.run(latencies(port, rate / 2, min(seconds, 3.0)))
        finally:
            stop(process)
        rows.append((kind, rate, p50, p99))
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return rows


# --- sidecar throughput --------------------------------------------------------------------

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: budgeted, namespace: bench}
spec:
  targetRef: {service: budgeted}
  limits:
  - {name: daily, clientKey: {header: x-api-key}, requests: 1000000000, per: day, scope: Global}
"""

WRK_SCRIPT = """\
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/", {["x-api-key"] = "key-" .. (counter % 100)})
end
"""


def upstream_bootstrap(port: int, admin: int) -> dict[str, object]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "upstream",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "upstream",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {
                                                                "status": 200,
                                                                "body": {"inline_string": "ok"},
                                                            },
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def wrk(port: int, seconds: float, script: Path) -> float:
    out = subprocess.run(
        [
            *PIN_CPU1,
            "wrk",
            "-t1",
            "-c16",
            f"-d{max(1, round(seconds))}s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if match is None or non2xx is not None:
        raise RuntimeError(f"wrk: unexpected output:\n{out}")
    return float(match.group(1))


async def sidecar_bench(seconds: float, rounds: int) -> tuple[list[float], list[float]]:
    from controlplane.app.server import ControlPlane, ControlPlaneConfig

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed for the sidecar benchmark: apt-get install -y wrk")
    tmp = Path(tempfile.mkdtemp(prefix="modelguard-bench-"))
    (tmp / "policies").mkdir()
    (tmp / "policies" / "rate.yaml").write_text(POLICY)
    script = tmp / "keys.lua"
    script.write_text(WRK_SCRIPT)
    up_port, up_admin = free_port(), free_port()
    upstream = EnvoyProcess(upstream_bootstrap(up_port, up_admin), admin_port=up_admin)
    upstream.start()
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(tmp / "policies"),), xds_port=0, admin_port=0, watch=False
        )
    )
    await plane.start()
    envoys = {}
    try:
        for service in ("budgeted", "bare"):
            port, admin = free_port(), free_port()
            sidecar = Sidecar(
                node_id=service,
                service=service,
                namespace="bench",
                identity=f"spiffe://cluster.local/ns/bench/sa/{service}",
                app_port=up_port,
                inbound_port=port,
                inbound_address="127.0.0.1",
            )
            envoy = EnvoyProcess(
                build_bootstrap(
                    sidecar, xds_host="127.0.0.1", xds_port=plane.xds_port, admin_port=admin
                ),
                admin_port=admin,
                log_level="warn",
            )
            envoy.start()
            await asyncio.to_thread(envoy.wait_ready, 20)
            with contextlib.suppress(OSError):
                if envoy.pid is not None:
                    os.sched_setaffinity(envoy.pid, {0})
            envoys[service] = (envoy, port)
        with contextlib.suppress(OSError):
            if upstream.pid is not None:
                os.sched_setaffinity(upstream.pid, {1})
        # Warm up: every client's bucket gets its assignment before measuring.
        for service, (_, port) in envoys.items():
            await asyncio.to_thread(wrk, port, 6 if service == "budgeted" else 1, script)
        budgeted, bare = [], []
        for _ in range(rounds):
            order = [("budgeted", budgeted), ("bare", bare)]
            random.shuffle(order)
            for service, results in order:
                results.append(await asyncio.to_thread(wrk, envoys[service][1], seconds, script))
        return budgeted, bare
    finally:
        for envoy, _ in envoys.values():
            envoy.stop()
        await plane.stop(grace=0)
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", choices=["noop", "memory", "redis"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis", default="")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port, args.redis))
        return 0
    redis, redis_url = start_redis(cpu=1)
    try:
        rows = service_bench(redis_url, args.seconds)
    finally:
        stop(redis)
    noop = rows[0][1]
    print("| rate limit service | decisions/s | ratio to no-op | p50 ms @ half load | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, rate, p50, p99 in rows:
        print(f"| {kind} | {rate:,.0f} | {rate / noop:.2f} | {p50:.2f} | {p99:.2f} |")
    budgeted, bare = asyncio.run(sidecar_bench(args.seconds, args.rounds))
    b, n = statistics.median(budgeted), statistics.median(bare)
    print()
    print("| sidecar | requests/s (median of rounds) | ratio |")
    print("| --- | ---: | ---: |")
    print(f"| without budget | {n:,.0f} | 1.00 |")
    print(f"| per-client daily budget (RLQS) | {b:,.0f} | {b / n:.2f} |")
    print(f"\nrounds: budgeted {[round(x) for x in budgeted]}, bare {[round(x) for x in bare]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
