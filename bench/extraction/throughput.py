"""The extraction monitor's throughput as a ratio to a no-op gRPC server, and what it
observes under overload (issue 9).

Two servers, each its own process and the same grpc.aio model as the control plane:

  noop     ``QueryFeed/Report`` answered at once, the batch not even decoded: the floor of
           the gRPC path on this machine
  monitor  the control plane's real ``QueryFeedService`` (protobuf decode, then on a worker
           thread: JSON bodies, feature extraction, all four detectors, verdicts) and its
           admin service (``Quarantines.GetMonitorStats``)

Part A, throughput: a closed loop of ``--in-flight`` concurrent Report calls (as many as a
sidecar worker keeps in flight) with batches as the sidecar ships them (128 queries, the
digits model's real JSON bodies, spread over ``--clients`` API keys), ``--seconds`` on each
server, alternating noop, monitor, noop, ... for ``--rounds`` rounds. Per round: queries/s
and the server's CPU per query (user + system from /proc: on a shared machine a steadier
figure than the rate); reported as medians with their spread, and monitor/noop ratios.

Part B, overload: simulated sidecar workers that ship as the Wasm filter does (batches of
128, at most 4 calls in flight, 5 s timeout; a query that finds the batch full and every
call slot taken is counted ``buffer_full``, a failed call's queries ``call_failed``, and the
counts travel in the next batch's ``unobserved``) offer ``--overload`` times the monitor's
measured rate for ``--overload-seconds``. Afterwards every offered query must be in the
monitor's counters as observed, unobserved or unreadable: lost = offered - all of those
must be 0 (a negative number would be double counting).

    .venv/bin/python bench/extraction/throughput.py [--seconds 4] [--rounds 3]
        [--clients 100] [--traffic test|repeats] [--overload 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
# A server child may run another tree's control plane (--before): its package goes first.
_tree = sys.argv[sys.argv.index("--root") + 1] if "--root" in sys.argv else str(ROOT)
sys.path.insert(0, _tree)

import grpc  # noqa: E402

from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc  # noqa: E402
from controlplane.gen.modelguard.feed.v1 import feed_pb2  # noqa: E402

REPORT = "/modelguard.feed.v1.QueryFeed/Report"
POLICY_KEY = "demo/digits-model"
BATCH = 128
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the servers (child processes) ----------------------------------------------------------


async def serve(kind: str) -> None:
    server = grpc.aio.server()
    if kind == "noop":

        async def report(request: bytes, context: Any) -> bytes:
            return b""  # an empty FeedAck

        handler = grpc.method_handlers_generic_handler(
            "modelguard.feed.v1.QueryFeed",
            {"Report": grpc.unary_unary_rpc_method_handler(report)},  # bytes in, bytes out
        )
        server.add_generic_rpc_handlers((handler,))
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        import tempfile

        from run import POLICY

        from controlplane.api import parse_documents
        from controlplane.extraction.admin import QuarantineAdmin
        from controlplane.extraction.feed import Extraction
        from controlplane.extraction.verdicts import InMemoryVerdictSink
        from controlplane.local.model import load_model, reference_csv

        # The bench's policy names its reference data relative to the policy file (issue 13).
        folder = Path(tempfile.mkdtemp(prefix="mg-throughput-"))
        (folder / "reference.csv").write_text(reference_csv(load_model(0)))
        policy_file = folder / "extraction.yaml"
        policy_file.write_text(POLICY.format(service="digits-model"))
        loaded, problems = parse_documents(policy_file.read_text(), str(policy_file))
        assert not problems, problems
        policies = [lp.policy for lp in loaded]
        extraction = Extraction(lambda: policies, sink=InMemoryVerdictSink())
        # The policy's profile is calibrated (or read from its cache) before the clock starts.
        from controlplane.extraction.monitor import WatchedPolicy

        watched = WatchedPolicy.of(policies[0])
        assert watched is not None
        extraction.profiles(watched)
        extraction.profiles.wait(watched.key)
        extraction.feed.add_to(server)
        QuarantineAdmin(extraction.monitor).add_to(server)
        await extraction.feed.start()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


class Server:
    def __init__(self, kind: str, root: Path = ROOT) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--root", str(root)],
            stdout=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = f"127.0.0.1:{int(self.proc.stdout.readline())}"

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- traffic ------------------------------------------------------------------------------------


def queries(clients: int, traffic: str, n: int) -> list[tuple[str, bytes]]:
    """(client key, one serialized Query as a FeedBatch fragment): concatenated after a
    batch header they are a FeedBatch, as the Wasm filter assembles one."""
    import numpy as np

    from controlplane.local.model import load_model

    model = load_model(0)
    rng = np.random.default_rng(0)
    if traffic == "repeats":  # the policy-tax load: 64 digits cycled over the keys
        rows = model.test_X[np.arange(n) % 64]
    else:
        rows = model.test_X[rng.integers(0, len(model.test_X), n)]
    proba = model.predict_proba(rows)
    out = []
    for i, (row, p) in enumerate(zip(rows, proba, strict=True)):
        key = f"client-{i % clients}"
        query = feed_pb2.Query(
            client_key=key,
            status=200,
            path="/v1/predict",
            request_body=json.dumps({"instances": [row.tolist()]}).encode(),
            response_body=json.dumps(
                {"predictions": [{"label": int(p.argmax()), "probabilities": p.tolist()}]}
            ).encode(),
        )
        out.append((key, feed_pb2.FeedBatch(queries=[query]).SerializeToString()))
    return out


def header(node: str, sequence: int) -> bytes:
    batch = feed_pb2.FeedBatch(node_id=node, policy=POLICY_KEY, sequence=sequence)
    return batch.SerializeToString()


# --- part A: throughput ---------------------------------------------------------------------------


async def closed_loop(address: str, batches: list[bytes], seconds: float, in_flight: int) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        report = channel.unary_unary(REPORT)  # bytes in, bytes out: no client-side encoding
        await report(batches[0], timeout=30)  # connected and warm before the clock starts
        done = 0
        deadline = time.monotonic() + seconds

        async def worker(start: int) -> None:
            nonlocal done
            i = start
            while time.monotonic() < deadline:
                await report(batches[i % len(batches)], timeout=30)
                done += 1
                i += in_flight

        await asyncio.gather(*(worker(k) for k in range(in_flight)))
        return done


def measure(
    server: Server, batches: list[bytes], seconds: float, in_flight: int
) -> dict[str, float]:
    cpu, started = server.cpu(), time.monotonic()
    done = asyncio.run(closed_loop(server.address, batches, seconds, in_flight))
    elapsed, used = time.monotonic() - started, server.cpu() - cpu
    n = done * BATCH
    return {"queries_per_second": n / elapsed, "cpu_us_per_query": used / n * 1e6}


# --- part B: overload -----------------------------------------------------------------------------


class Sidecar:
    """One sidecar worker's feed, as the Wasm filter ships it (wasm/src/filter.c)."""

    def __init__(self, report: Any, node: str, max_in_flight: int = 4, timeout: float = 5.0):
        self.report, self.node = report, node
        self.max_in_flight, self.timeout = max_in_flight, timeout
        self.batch: list[tuple[str, bytes]] = []
        self.unobserved: Counter[tuple[str, str]] = Counter()
        self.in_flight = 0
        self.sequence = 0
        self.calls: set[asyncio.Task[None]] = set()
        self.offered = 0
        self.failed_calls = 0

    def offer(self, key: str, query: bytes) -> None:
        self.offered += 1
        if len(self.batch) >= BATCH and not self.flush():
            self.unobserved[key, "buffer_full"] += 1
            return
        self.batch.append((key, query))

    def flush(self) -> bool:
        if not self.batch and not self.unobserved:
            return True
        if self.in_flight >= self.max_in_flight:
            return False
        self.sequence += 1
        gaps = feed_pb2.FeedBatch(
            unobserved=[
                feed_pb2.Unobserved(client_key=key, count=n, reason=reason)
                for (key, reason), n in self.unobserved.items()
            ]
        )
        body = header(self.node, self.sequence) + b"".join(q for _, q in self.batch)
        body += gaps.SerializeToString()
        shipped = Counter(key for key, _ in self.batch)
        self.batch, self.unobserved = [], Counter()
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._call(body, shipped, gaps))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        return True

    async def _call(self, body: bytes, shipped: Counter[str], gaps: feed_pb2.FeedBatch) -> None:
        try:
            await self.report(body, timeout=self.timeout)
        except grpc.aio.AioRpcError:
            self.failed_calls += 1
            for key, n in shipped.items():
                self.unobserved[key, "call_failed"] += n
            for gap in gaps.unobserved:  # the gaps it carried travel again
                self.unobserved[gap.client_key, gap.reason] += gap.count
        finally:
            self.in_flight -= 1

    async def drain(self) -> None:
        while self.batch or self.unobserved or self.calls:
            self.flush()
            await asyncio.sleep(0.05)


async def overload(
    address: str, traffic: list[tuple[str, bytes]], rate: float, seconds: float, workers: int
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        report = channel.unary_unary(REPORT)
        admin = admin_pb2_grpc.QuarantinesStub(channel)
        before = await admin.GetMonitorStats(admin_pb2.MonitorStatsRequest(), timeout=10)
        sidecars = [Sidecar(report, f"sidecar-{w}") for w in range(workers)]
        i = 0
        started = last_tick = time.monotonic()
        while (now := time.monotonic()) < started + seconds:
            due = int((now - started) * rate)
            while i < due:  # open loop: what should have arrived by now, whatever happened
                key, query = traffic[i % len(traffic)]
                sidecars[i % workers].offer(key, query)
                i += 1
            if now - last_tick >= 0.25:  # the filter's tick ships partial batches too
                last_tick = now
                for sidecar in sidecars:
                    sidecar.flush()
            await asyncio.sleep(0.01)
        offered_time = time.monotonic() - started
        for sidecar in sidecars:
            await sidecar.drain()
        after = await admin.GetMonitorStats(admin_pb2.MonitorStatsRequest(), timeout=10)
    offered = sum(s.offered for s in sidecars)
    observed = after.queries - before.queries
    unobserved = after.unobserved - before.unobserved
    by_reason = {
        k: v - before.unobserved_by_reason.get(k, 0)
        for k, v in after.unobserved_by_reason.items()
        if v - before.unobserved_by_reason.get(k, 0)
    }
    unreadable = sum(after.unparsable.values()) - sum(before.unparsable.values())
    return {
        "offered": offered,
        "offered_per_second": offered / offered_time,
        "observed": observed,
        "unobserved": unobserved,
        "unobserved_by_reason": by_reason,
        "unreadable": unreadable,
        "lost": offered - observed - unobserved - unreadable,
        "observed_share": observed / offered if offered else 0.0,
        "failed_calls": sum(s.failed_calls for s in sidecars),
        "clients_tracked": after.clients_tracked,
    }


# --- the run --------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=("noop", "monitor"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--traffic", choices=("test", "repeats"), default="test")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--overload", type=float, default=3.0, help="x the monitor's rate")
    parser.add_argument("--overload-seconds", type=float, default=5.0)
    parser.add_argument("--sidecars", type=int, default=2, help="sidecar workers feeding")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--before",
        type=Path,
        help="another work tree (e.g. a git worktree of an older commit): its monitor is "
        "measured too, interleaved, as 'before'",
    )
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0

    traffic = queries(args.clients, args.traffic, 400 * BATCH)
    batches = [
        header("bench", b) + b"".join(q for _, q in traffic[b * BATCH : (b + 1) * BATCH])
        for b in range(len(traffic) // BATCH)
    ]
    servers = {kind: Server(kind) for kind in ("noop", "monitor")}
    if args.before:
        servers["before"] = Server("monitor", args.before.resolve())
    rounds: dict[str, list[dict[str, float]]] = {kind: [] for kind in servers}
    try:
        for _ in range(args.rounds):
            for kind in servers:
                rounds[kind].append(measure(servers[kind], batches, args.seconds, args.in_flight))
        monitor_rate = med([r["queries_per_second"] for r in rounds["monitor"]])
        loaded = asyncio.run(
            overload(
                servers["monitor"].address,
                traffic,
                args.overload * monitor_rate,
                args.overload_seconds,
                args.sidecars,
            )
        )
    finally:
        for server in servers.values():
            server.stop()

    ratios = [
        m["queries_per_second"] / n["queries_per_second"]
        for n, m in zip(rounds["noop"], rounds["monitor"], strict=True)
    ]
    cpu_ratios = [
        m["cpu_us_per_query"] / n["cpu_us_per_query"]
        for n, m in zip(rounds["noop"], rounds["monitor"], strict=True)
    ]
    print(
        f"\nExtraction monitor vs a no-op QueryFeed server ({args.rounds} rounds x "
        f"{args.seconds:.0f} s each, interleaved; {args.in_flight} calls in flight, "
        f"{BATCH} queries per batch, {args.clients} clients, traffic '{args.traffic}')\n"
    )
    print("| server | queries/s (median, min-max) | server CPU µs/query (median, min-max) |")
    print("|---|---|---|")
    for kind in servers:
        qps = [r["queries_per_second"] for r in rounds[kind]]
        cpu = [r["cpu_us_per_query"] for r in rounds[kind]]
        print(
            f"| {kind} | {med(qps):,.0f} ({min(qps):,.0f}-{max(qps):,.0f}) "
            f"| {med(cpu):.1f} ({min(cpu):.1f}-{max(cpu):.1f}) |"
        )
    print(
        f"\nmonitor / no-op: queries/s {med(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}), "
        f"CPU per query {med(cpu_ratios):.1f}x ({min(cpu_ratios):.1f}-{max(cpu_ratios):.1f})"
    )
    print(
        f"\nOverload: {loaded['offered']:,} queries offered at "
        f"{loaded['offered_per_second']:,.0f}/s "
        f"({args.overload:g}x the monitor's rate) by {args.sidecars} simulated sidecar workers "
        f"for {args.overload_seconds:g} s\n"
    )
    print("| offered | observed | counted unobserved | unreadable | lost | observed share |")
    print("|---|---|---|---|---|---|")
    reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(loaded["unobserved_by_reason"].items()))
    print(
        f"| {loaded['offered']:,} | {loaded['observed']:,} | {loaded['unobserved']:,}"
        f"{f' ({reasons})' if reasons else ''} | {loaded['unreadable']:,} | {loaded['lost']:,} "
        f"| {loaded['observed_share']:.1%} |"
    )
    if args.before:
        before_cpu = med([r["cpu_us_per_query"] for r in rounds["before"]])
        after_cpu = med([r["cpu_us_per_query"] for r in rounds["monitor"]])
        before_qps = med([r["queries_per_second"] for r in rounds["before"]])
        print(
            f"monitor before ({args.before}) -> now: CPU per query {before_cpu:.0f} -> "
            f"{after_cpu:.0f} µs, queries/s {before_qps:,.0f} -> {monitor_rate:,.0f}"
        )
    out = {
        "settings": vars(args),
        "rounds": rounds,
        "ratio_queries_per_second": {"median": med(ratios), "min": min(ratios), "max": max(ratios)},
        "ratio_cpu_per_query": {
            "median": med(cpu_ratios),
            "min": min(cpu_ratios),
            "max": max(cpu_ratios),
        },
        "overload": loaded,
    }
    print(json.dumps(out, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 1 if loaded["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
