"""Static Envoys (a bare router, a fixed backend) and a ``wrk`` driver for data-path benches.

The backend answers the digits model's real JSON answer with ``direct_response`` once the
whole request body is in, so it costs next to nothing and whatever sits in front of it is
what a benchmark measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

TYPE = "type.googleapis.com/"
HCM_TYPE = (
    TYPE + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

# One instance of the digits model's answer at full precision (what the model returns).
ANSWER: dict[str, Any] = {
    "predictions": [
        {
            "label": 4,
            "probabilities": [
                0.0002922879805145397,
                0.0001618273933893181,
                1.252323714726107e-05,
                1.0305080092676715e-05,
                0.9845519283802229,
                1.6231701787660578e-05,
                0.00025438540812574076,
                0.013560298077434496,
                0.0008008958454705654,
                0.00033931689581499384,
            ],
        }
    ],
    "model": "digits-logreg",
}

# One digits query, as the benches' clients send it.
QUERY: dict[str, Any] = {"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": TYPE + "envoy.extensions.filters.http.router.v3.Router"},
}
BUFFER = {
    "name": "envoy.filters.http.buffer",
    "typed_config": {
        "@type": TYPE + "envoy.extensions.filters.http.buffer.v3.Buffer",
        "max_request_bytes": 1048576,
    },
}


def hcm(http_filters: list[dict[str, Any]], route: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": "bench",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, **route}],
                    }
                ]
            },
            "http_filters": [*http_filters, ROUTER],
        },
    }


def listener(port: int, manager: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"listen-{port}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [manager]}],
    }


def cluster(name: str, port: int, http2: bool = False) -> dict[str, Any]:
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    out: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if http2:  # gRPC upstreams
        out["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": TYPE + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return out


def bootstrap(admin: int, listeners: list[Any], clusters: list[Any]) -> dict[str, Any]:
    return {
        "node": {"id": f"bench-{admin}", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def backend_bootstrap(port: int, admin: int) -> dict[str, Any]:
    """An Envoy that answers ``ANSWER`` to every request once its body is in, as a model does."""
    route = {
        "direct_response": {"status": 200, "body": {"inline_string": json.dumps(ANSWER)}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "application/json"}}
        ],
    }
    return bootstrap(admin, [listener(port, hcm([BUFFER], route))], [])


def backend_envoy() -> tuple[Any, int]:
    """The backend (``backend_bootstrap``) as an EnvoyProcess on free loopback ports, one
    worker, not started: (the process, its listener's port)."""
    from controlplane.local.envoy import EnvoyProcess
    from controlplane.netutil import free_port

    port, admin = free_port(), free_port()
    envoy = EnvoyProcess(
        backend_bootstrap(port, admin), admin_port=admin, log_level="warn", concurrency=1
    )
    return envoy, port


def router_bootstrap(port: int, admin: int, upstream_port: int) -> dict[str, Any]:
    """A bare Envoy: one listener, only a router, to one upstream (the baseline)."""
    return bootstrap(
        admin,
        [listener(port, hcm([], {"route": {"cluster": "upstream"}}))],
        [cluster("upstream", upstream_port)],
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(out: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if not (rate and total and p50 and p99):
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=float(rate.group(1)),
        requests=int(total.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def wrk(url: str, seconds: float, connections: int, script: Path) -> WrkResult:
    """One closed-loop wrk run (one thread, keep-alive) with latency percentiles."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=True,
    ).stdout
    return parse_wrk(out)


# --- the ratio benches' frame: sidecar variants measured in alternation against "bare" ------


def wrk_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every ratio bench takes (its own added after)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    return parser


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is required (Debian: apt-get install wrk)")


def post_script(path: Path, body: Any, headers: dict[str, str]) -> Path:
    """A wrk script that POSTs ``body`` (as JSON) with ``headers``."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def predict_script(path: Path) -> Path:
    """A wrk script that POSTs ``QUERY`` as the client ``bench-client`` (x-api-key)."""
    return post_script(
        path, QUERY, {"content-type": "application/json", "x-api-key": "bench-client"}
    )


def wrk_port(port: int, seconds: float, connections: int, script: Path) -> WrkResult:
    """``wrk`` against a listener on 127.0.0.1:``port`` (path /v1/predict)."""
    return wrk(f"http://127.0.0.1:{port}/v1/predict", seconds, connections, script)


def alternate(names: Iterable[str], rounds: int, measure: Callable[[str], T]) -> dict[str, list[T]]:
    """``measure(name)`` for every name in turn, ``rounds`` times over: a drift in the
    machine's load falls on every variant alike, not on the last one measured."""
    out: dict[str, list[T]] = {name: [] for name in names}
    for _ in range(rounds):
        for name, results in out.items():
            results.append(measure(name))
    return out


def print_ratios(labels: dict[str, str], rps: dict[str, list[float]], base: str = "bare") -> None:
    """Median requests/s of each variant and its ratio to ``base``'s median."""
    width = max(len("sidecar carries"), *(len(labels[name]) for name in rps)) + 4
    print(f"{'sidecar carries':<{width}} {'req/s (median)':>15} {'ratio to bare':>14}")
    reference = statistics.median(rps[base])
    for name, rates in rps.items():
        median = statistics.median(rates)
        print(f"{labels[name]:<{width}} {median:>15,.0f} {median / reference:>14.2f}")


def serve_grpc(add_servicers: Callable[[Any], None]) -> int:
    """A grpc.aio server on a free loopback port, on an event loop in a daemon thread of
    this process (the sidecars reach it while the main thread drives wrk); returns its port.
    ``add_servicers(server)`` registers what it serves."""
    import grpc

    port_box: list[int] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        server = grpc.aio.server()
        add_servicers(server)
        port_box.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await server.wait_for_termination()

    threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True).start()
    if not ready.wait(10):
        raise RuntimeError("the in-process gRPC server did not start within 10 s")
    return port_box[0]


# --- servers in processes of their own, pinned to one core -------------------------------


def start_pinned(
    argv: list[str],
    port: int,
    *,
    cpu: int = 0,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 15.0,
) -> subprocess.Popen[bytes]:
    """Start a server process in its own session, pinned to ``cpu`` (where the machine
    allows), and wait until it listens on ``port``. Stop it with ``stop``."""
    from controlplane.netutil import wait_for_port

    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True
    )
    try:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(process.pid, {cpu})
        wait_for_port("127.0.0.1", port, timeout=timeout)
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process by its PID: SIGTERM, then SIGKILL after 5 s."""
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_redis(cpu: int | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Debian's redis-server on a free loopback port, no persistence, in its own session
    (pinned to ``cpu`` where the machine allows): the process (stop it with ``stop``) and
    its URL."""
    from controlplane.netutil import free_port, wait_for_port

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is needed: make setup installs it")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(process.pid, {cpu})
        wait_for_port("127.0.0.1", port, timeout=10)
    except BaseException:
        stop(process)
        raise
    return process, f"redis://127.0.0.1:{port}/0"
