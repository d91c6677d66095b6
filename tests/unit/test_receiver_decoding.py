"""Services registered through grpcutil refuse undecodable unary requests (INVALID_ARGUMENT)
and count them; behind the sidecar interceptor, an unauthenticated call is refused first
and not counted, an authenticated one still reaches the handler as its caller."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import pytest

from controlplane.gen.modelguard.admin.v1 import telemetry_pb2, telemetry_pb2_grpc
from controlplane.gen.modelguard.feed.v1 import feed_pb2, feed_pb2_grpc
from controlplane.grpcutil import decode_checked, decode_failures
from controlplane.identity.interceptor import SidecarAuthInterceptor, current_caller
from controlplane.identity.tokens import AuthenticationError, Caller

FEED = ("modelguard.feed.v1.QueryFeed", "Report")
WATCH = ("modelguard.admin.v1.Telemetry", "WatchTelemetry")
JUNK = b"\xff\xff\xff\xff not protobuf"
TOKEN = (("authorization", "Bearer good"),)


class Feed(feed_pb2_grpc.QueryFeedServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.callers: list[str] = []

    async def Report(self, request: feed_pb2.FeedBatch, context: Any) -> feed_pb2.FeedAck:
        caller = current_caller()
        self.callers.append(caller.identity if caller else "")
        return feed_pb2.FeedAck(accepted=len(request.queries))


class Watch(telemetry_pb2_grpc.TelemetryServicer):  # type: ignore[misc]
    async def WatchTelemetry(
        self, request: telemetry_pb2.TelemetryQuery, context: Any
    ) -> AsyncIterator[telemetry_pb2.TelemetryRecord]:
        for seq in range(request.limit):
            yield telemetry_pb2.TelemetryRecord(seq=seq + 1)


class Tokens:
    def identify(self, metadata: Mapping[str, str]) -> Caller:
        if metadata.get("authorization") != "Bearer good":
            raise AuthenticationError("no valid credential")
        return Caller("spiffe://td/ns/a/sa/web", frozenset({"web-0"}))


@pytest.mark.parametrize("authenticated", [False, True])
async def test_undecodable_requests_are_refused_and_counted(authenticated: bool) -> None:
    interceptors = [SidecarAuthInterceptor(Tokens())] if authenticated else None
    server = grpc.aio.server(interceptors=interceptors)
    feed = Feed()
    feed_pb2_grpc.add_QueryFeedServicer_to_server(feed, decode_checked(server))
    telemetry_pb2_grpc.add_TelemetryServicer_to_server(Watch(), decode_checked(server))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    metadata = TOKEN if authenticated else None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            report = channel.unary_unary("/modelguard.feed.v1.QueryFeed/Report")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await report(JUNK, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "undecodable request to modelguard.feed.v1.QueryFeed/Report" in (
                err.value.details() or ""
            )
            assert "Error parsing message" in (err.value.details() or "")
            watch = channel.unary_stream("/modelguard.admin.v1.Telemetry/WatchTelemetry")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in watch(JUNK, metadata=metadata, timeout=5):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert decode_failures(server).counts() == {FEED: 1, WATCH: 1}
            # Good requests are served as before, and not counted.
            stub = feed_pb2_grpc.QueryFeedStub(channel)
            batch = feed_pb2.FeedBatch(policy="demo/p")
            batch.queries.add(client_key="k")
            assert (await stub.Report(batch, metadata=metadata, timeout=5)).accepted == 1
            query = telemetry_pb2.TelemetryQuery(limit=3)
            seqs = [
                r.seq
                async for r in telemetry_pb2_grpc.TelemetryStub(channel).WatchTelemetry(
                    query, metadata=metadata, timeout=5
                )
            ]
            assert seqs == [1, 2, 3]
            assert feed.callers == ["spiffe://td/ns/a/sa/web" if authenticated else ""]
            if authenticated:
                # The interceptor answers first: junk without a credential is not ours to count.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await report(JUNK, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert decode_failures(server).total() == 2
    finally:
        await server.stop(0)
