"""What authenticating every sidecar call costs: calls/s of a no-op unary gRPC service
(the query feed's Report, answering at once) with and without SidecarAuthInterceptor,
interleaved in one run. The server runs on one core (this process's event loop); the
client is a separate process. A no-op handler is the worst case: real services (the
monitor, the OTLP store) spend more per call, so the interceptor's share is smaller.

    .venv/bin/python bench/sidecar_auth.py [--calls 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import grpc

from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.identity.interceptor import SidecarAuthInterceptor
from controlplane.identity.tokens import BootstrapTokens

CLIENT = r"""
import asyncio, sys, time
import grpc
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
port, calls, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
async def main():
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = feed_pb2_grpc.QueryFeedStub(channel)
        batch = feed_pb2.FeedBatch(node_id="web-0", policy="demo/digits-model")
        md = (("authorization", "Bearer " + token),)
        await stub.Report(batch, metadata=md)
        sem = asyncio.Semaphore(32)
        async def one():
            async with sem:
                await stub.Report(batch, metadata=md)
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        print(calls / (time.perf_counter() - start))
asyncio.run(main())
"""


class NoOpFeed(feed_pb2_grpc.QueryFeedServicer):  # type: ignore[misc]
    async def Report(self, request: Any, context: Any) -> Any:
        return feed_pb2.FeedAck(accepted=0)


async def serve(interceptor: SidecarAuthInterceptor | None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[interceptor] if interceptor else None)
    feed_pb2_grpc.add_QueryFeedServicer_to_server(NoOpFeed(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def measure(interceptor: SidecarAuthInterceptor | None, calls: int, token: str) -> float:
    server, port = await serve(interceptor)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(port), str(calls), token,
            stdout=subprocess.PIPE, start_new_session=True,
        )
        out, _ = await proc.communicate()
        return float(out)
    finally:
        await server.stop(0)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as key_dir:
        tokens = BootstrapTokens.load_or_create(key_dir)
    token = tokens.issue("web-0", "spiffe://cluster.local/ns/demo/sa/web")
    interceptor = SidecarAuthInterceptor(tokens)
    bare: list[float] = []
    checked: list[float] = []
    for _ in range(args.rounds):
        bare.append(await measure(None, args.calls, token))
        checked.append(await measure(interceptor, args.calls, token))
    assert not interceptor.refused, interceptor.refused
    ratios = [c / b for b, c in zip(bare, checked, strict=True)]
    print(f"no-op feed Report, calls/s: bare {statistics.median(bare):.0f} "
          f"(runs {', '.join(f'{v:.0f}' for v in bare)}), authenticated "
          f"{statistics.median(checked):.0f} (runs {', '.join(f'{v:.0f}' for v in checked)})")
    print(f"ratio authenticated/bare: median {statistics.median(ratios):.2f} "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    asyncio.run(main())
