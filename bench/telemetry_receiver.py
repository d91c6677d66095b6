"""CPU per access-log record of the OTLP receiver, as a ratio to a no-op LogsService.

Envoy's OpenTelemetry access logger sends one record per request in LogsService.Export
batches of up to 1 MiB (translate/telemetry.py), so the receiver's cost per record is
the control plane's cost per request. Each server is a ``grpc.aio`` process of its own,
pinned to CPU 0 (as the control plane serves the OTLP port), fed over real gRPC by this
process on CPU 1 with pre-encoded exports shaped like Envoy's (the attributes of
``LOG_ATTRIBUTES``, the client key, Envoy's resource attributes; 100 clients, a mix of
allowed, denied and rate-limited requests). Servers, interleaved in rounds:

  noop       a LogsService that decodes each export (grpc does) and answers at once
  receiver   the control plane's telemetry service (receiver, store, verdict counters)
  --tree NAME=DIR  the same receiver served from another source tree (e.g. an older
                   commit unpacked with ``git archive``), for before/after in one run

Reported per server: records/s (median of rounds), CPU µs per record (the server
process's user + system time from /proc over the records it took in) and both as
ratios to the no-op server measured in the same rounds.

    .venv/bin/python bench/telemetry_receiver.py [--seconds 3] [--rounds 5]
                                                 [--tree before=/tmp/old] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOGS_EXPORT = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"
CLIENTS = 100
RECORDS_PER_EXPORT = 1_300  # ~1 MiB: the access logger's buffer_size_bytes
EXPORTS = 8  # distinct exports, sent in turn
IN_FLIGHT = 2  # exports in flight at once (a few sidecars flushing together)


# --- servers (child processes) -------------------------------------------------------------


async def serve(kind: str, port: int) -> None:
    import grpc

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)])
    if kind == "noop":
        from opentelemetry.proto.collector.logs.v1 import (
            logs_service_pb2,
            logs_service_pb2_grpc,
        )

        class NoOp(logs_service_pb2_grpc.LogsServiceServicer):  # type: ignore[misc]
            async def Export(self, request: Any, context: Any) -> Any:
                return logs_service_pb2.ExportLogsServiceResponse()

        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(NoOp(), server)
    else:
        from controlplane.telemetry.service import TelemetryService
        from controlplane.telemetry.settings import TelemetrySettings

        # As ControlPlane makes it (without a plane to instrument): receiver, bounded
        # store, the verdict and rate-limit counters fed by every export.
        TelemetryService(TelemetrySettings()).add_to(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def start_server(kind: str, tree: Path) -> tuple[subprocess.Popen[bytes], int]:
    from bench.lib.load import start_pinned
    from controlplane.netutil import free_port

    port = free_port()
    argv = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return start_pinned(argv, port, env=env, cwd=str(tree), timeout=20), port


def stop(process: subprocess.Popen[bytes]) -> None:
    from bench.lib.load import stop as stop_process

    stop_process(process)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- Envoy-shaped exports --------------------------------------------------------------------


def _outcome(rng: random.Random) -> dict[str, str]:
    """Status, details, flags and limit of one request: mostly allowed, some refused."""
    roll = rng.random()
    if roll < 0.05:
        return {
            "%RESPONSE_CODE%": "403",
            "%RESPONSE_CODE_DETAILS%": "rbac_access_denied_matched_policy[none]",
        }
    if roll < 0.08:
        return {
            "%RESPONSE_CODE%": "429",
            "%RESPONSE_CODE_DETAILS%": "request_rate_limited",
            "%RESPONSE_FLAGS%": "RL",
            "limit": "demo.digits.burst",
        }
    return {"%RESPONSE_CODE%": "200", "%RESPONSE_CODE_DETAILS%": "via_upstream"}


def envoy_export(seed: int, records: int) -> bytes:
    """An ExportLogsServiceRequest as Envoy's OTel access logger sends it with our config:
    every LOG_ATTRIBUTES operator filled the way Envoy fills it ("-" when it has nothing),
    the client key header, the logger's own resource attributes before ours."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2

    from controlplane.translate.telemetry import CLIENT_KEY_ATTRIBUTE, LOG_ATTRIBUTES

    rng = random.Random(seed)
    request = logs_service_pb2.ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    for key, value in (
        ("log_name", "modelguard.inbound"),
        ("zone_name", ""),
        ("cluster_name", "digits-model"),
        ("node_name", "digits-model-0"),
        ("service.name", "digits-model"),
        ("service.namespace", "demo"),
        ("modelguard.node_id", "digits-model-0"),
    ):
        resource_logs.resource.attributes.add(key=key).value.string_value = value
    scope = resource_logs.scope_logs.add()
    now = time.time_ns()
    for i in range(records):
        outcome = _outcome(rng)
        values = {
            "%REQ(:METHOD)%": "POST",
            "%PATH(WQ)%": "/v1/predict",
            "%DURATION%": str(rng.randint(1, 40)),
            "%BYTES_RECEIVED%": str(rng.randint(300, 700)),
            "%BYTES_SENT%": str(rng.randint(280, 320)),
            "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%": "127.0.0.1",
            "%REQ(X-REQUEST-ID)%": str(uuid.UUID(int=rng.getrandbits(128))),
            "%RESPONSE_FLAGS%": "-",
            "%ROUTE_NAME%": "-",
            **outcome,
        }
        entry = scope.log_records.add(time_unix_nano=now + i * 1000)
        entry.body.string_value = f"POST /v1/predict {values['%RESPONSE_CODE%']}"
        for key, operator in LOG_ATTRIBUTES:
            text = values.get(operator, "-")
            if key == "modelguard.ratelimit.limit":
                text = outcome.get("limit", "-")
            entry.attributes.append(
                common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=text))
            )
        client = f"key-{rng.randrange(CLIENTS)}" if rng.random() < 0.98 else "-"
        entry.attributes.add(key=CLIENT_KEY_ATTRIBUTE).value.string_value = client
    return bytes(request.SerializeToString())


# --- the client ------------------------------------------------------------------------------


async def feed(port: int, exports: list[bytes], seconds: float) -> tuple[int, float]:
    """Exports sent for ``seconds`` (each answered before the next of its lane goes):
    (exports sent, elapsed seconds)."""
    import grpc

    options = [("grpc.max_send_message_length", 4 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        export = channel.unary_unary(LOGS_EXPORT)  # bytes as they are: no client-side encoding
        await export(exports[0], timeout=30)
        sent = 0
        stop_at = time.perf_counter() + seconds

        async def lane(first: int) -> None:
            nonlocal sent
            i = first
            while time.perf_counter() < stop_at:
                await export(exports[i % len(exports)], timeout=30)
                sent += 1
                i += IN_FLIGHT

        started = time.perf_counter()
        await asyncio.gather(*(lane(n) for n in range(IN_FLIGHT)))
        return sent, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["noop", "receiver"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also serve the receiver from this source tree (before/after in one run)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port))
        return 0
    sys.path.insert(0, str(ROOT))
    trees = {"noop": ROOT, "receiver": ROOT}
    for spec in args.tree:
        name, _, folder = spec.partition("=")
        trees[f"receiver@{name}"] = Path(folder).resolve()
    exports = [envoy_export(seed, RECORDS_PER_EXPORT) for seed in range(EXPORTS)]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {1})
    servers = {
        name: start_server("noop" if name == "noop" else "receiver", tree)
        for name, tree in trees.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in servers}
    cpu_us: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(args.rounds):
            for name, (process, port) in servers.items():
                before = cpu_seconds(process.pid)
                sent, elapsed = asyncio.run(feed(port, exports, args.seconds))
                spent = cpu_seconds(process.pid) - before
                records = sent * RECORDS_PER_EXPORT
                rates[name].append(records / elapsed)
                cpu_us[name].append(spent / records * 1e6)
    finally:
        for process, _ in servers.values():
            stop(process)
    noop_rate = statistics.median(rates["noop"])
    noop_cpu = statistics.median(cpu_us["noop"])
    results: dict[str, Any] = {
        "records_per_export": RECORDS_PER_EXPORT,
        "export_bytes": statistics.median(len(e) for e in exports),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "servers": {},
    }
    print(
        f"{RECORDS_PER_EXPORT:,} records per export ({results['export_bytes'] / 2**20:.2f} MiB),"
        f" {args.rounds} interleaved rounds of {args.seconds:g} s per server\n"
    )
    print(
        "| server | records/s (median) | ratio to no-op | CPU µs/record (median, range)"
        " | CPU ratio to no-op |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in servers:
        rate, cpu = statistics.median(rates[name]), statistics.median(cpu_us[name])
        low, high = min(cpu_us[name]), max(cpu_us[name])
        print(
            f"| {name} | {rate:,.0f} | {rate / noop_rate:.2f} | {cpu:.1f} ({low:.1f}–{high:.1f})"
            f" | {cpu / noop_cpu:.2f} |"
        )
        results["servers"][name] = {
            "records_per_s": rate,
            "ratio_to_noop": rate / noop_rate,
            "cpu_us_per_record": cpu,
            "cpu_ratio_to_noop": cpu / noop_cpu,
            "rounds_records_per_s": rates[name],
            "rounds_cpu_us_per_record": cpu_us[name],
        }
    print()
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
