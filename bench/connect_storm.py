"""Many sidecars connecting at once: does every ADS stream get through its first requests?

Issue 15: ``bench/convergence.py --sims 5000`` failed while its simulated sidecars wrote their
first subscriptions (CANCELLED, INTERNAL "Internal error from Core"). This isolates that
moment: N simulated sidecars per process (``bench/lib/simclient.py``, one channel
each) in P spawned processes open their streams against either the control plane's xDS
server (``ControlPlane``, no policies unless --policy) or a trivial gRPC ADS server with the
same keepalive options (and gRPC core's default pending-call limits) that only reads
(``--trivial``; ``--respond BYTES`` also answers each subscription with resources of about
that size), and counts the streams that fail to start.

    .venv/bin/python bench/connect_storm.py --sims 2500 --procs 2            # control plane
    .venv/bin/python bench/connect_storm.py --sims 2500 --procs 2 --trivial  # baseline

Measured 2026-12-06 (2 shared cores, load ~3), failed starts:

    control plane, 1 × 5,000   0       control plane, 2 × 1,200   ~4 %
    control plane, 2 × 2,500   8-18 %  trivial server, 2 × 2,500  0 (also answering 3 KB)

The cause (found with ``--grpc-default-limits``, which starts the control plane with gRPC
core's own limits again): core cancels a call that arrives while more than 1,000 others
wait for the application to accept them (``grpc.server.max_pending_requests``), with a
chance rising to certainty at 3,000 (``..._hard_limit``). grpc.aio accepts one call per
turn of the event loop; the trivial server's loop is idle, the control plane's is busy
admitting sidecars and rebuilding their snapshots, so calls pile up in core and some are
cancelled: INTERNAL "Internal error from Core" or CANCELLED on the sidecar's next write.
The server was at fault, not the simulator. With the limits the xDS server sets now
(``controlplane/xds/server.py``, SERVER_OPTIONS), 2 × 2,500 and 2 × 5,000: 0 failed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


def _run_sims(target: str, n: int, out: Any) -> None:
    from bench.lib.simclient import SimulatedSidecar
    from controlplane.compile.inputs.inventory import Sidecar

    metadata = Sidecar(
        "x", "digits-model", "demo", "spiffe://cluster.local/ns/demo/sa/digits-model", 18080, 15006
    ).to_metadata()

    async def main() -> None:
        ok, errors = 0, {}
        sims = []
        for i in range(n):
            sim = SimulatedSidecar(
                target, f"sim-{os.getpid()}-{i}", record=False, metadata=metadata
            )
            try:
                await sim.start()
                ok += 1
            except Exception as err:
                code = getattr(err, "code", None)
                name = str(code()) if callable(code) else type(err).__name__
                errors[name] = errors.get(name, 0) + 1
            sims.append(sim)
        out.put((ok, errors))

    asyncio.run(main())


def _resource(name: str, size: int) -> bytes:
    """A resource of any xDS type as the simulated sidecars read it: its name in field 1 (as
    every type keeps it), padded to about ``size`` bytes with a field no type defines (an
    unknown field: parsers keep it). Bare filler bytes have no name: the sidecars refused
    them with ValueError("CDS resource without a name") and stopped reading their stream."""

    def field(number: int, value: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(value)) + value

    named = field(1, name.encode())
    return named + field(999, b"x" * max(0, size - len(named) - 5))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


async def _trivial_server(respond: int) -> tuple[Any, int]:
    import grpc
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
    from google.protobuf import any_pb2

    from controlplane.xds import resources as rt

    class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
        async def StreamAggregatedResources(self, requests: Any, context: Any) -> Any:
            async for request in requests:
                # Answer each subscription once; an ACK (it names our nonce) gets nothing,
                # or every answer would be acknowledged and answered again, without end.
                if respond and not request.response_nonce:
                    wildcard = request.type_url in rt.WILDCARD_TYPES
                    names = ["storm"] if wildcard else list(request.resource_names)
                    yield discovery_pb2.DiscoveryResponse(
                        version_info="1",
                        type_url=request.type_url,
                        nonce="n",
                        resources=[
                            any_pb2.Any(type_url=request.type_url, value=_resource(n, respond))
                            for n in names
                        ],
                    )

    server = grpc.aio.server(options=SERVER_OPTIONS)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sims", type=int, default=2500, help="per process")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--trivial", action="store_true")
    parser.add_argument("--respond", type=int, default=0)
    parser.add_argument("--policy", action="store_true", help="convergence.py's AccessPolicy")
    parser.add_argument(
        "--grpc-default-limits",
        action="store_true",
        help="the control plane without its pending-call limits (gRPC core's 1,000 / 3,000)",
    )
    args = parser.parse_args()
    if args.trivial:
        server, port = await _trivial_server(args.respond)
        stop = server.stop
    else:
        import tempfile

        import controlplane.app.server
        from controlplane.app.server import ControlPlane, ControlPlaneConfig

        if args.grpc_default_limits:
            controlplane.app.server.ADS_SERVER_OPTIONS = []  # type: ignore[misc]

        policies = Path(tempfile.mkdtemp(prefix="mg-storm-"))
        if args.policy:
            sys.path.insert(0, str(ROOT / "bench"))
            from convergence import ACCESS

            (policies / "access.yaml").write_text(ACCESS.format(round=0))
        plane = ControlPlane(
            ControlPlaneConfig(policy_paths=(str(policies),), xds_port=0, admin_port=0)
        )
        await plane.start()
        port, stop = plane.xds_port, plane.stop
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_run_sims, args=(f"127.0.0.1:{port}", args.sims, out))
        for _ in range(args.procs)
    ]
    for proc in procs:
        proc.start()
    results = [await asyncio.to_thread(out.get) for _ in procs]
    for proc in procs:
        proc.kill()
    await stop(0)
    total = args.sims * args.procs
    failed = total - sum(ok for ok, _ in results)
    kind = "trivial server" if args.trivial else "control plane"
    print(f"{kind}: {args.procs} × {args.sims}: {failed} of {total} streams failed to start")
    for _, errors in results:
        print("  ", errors)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
