"""Forwarding to the user's OTLP endpoint (a Collector, Jaeger, Tempo) over OTLP/gRPC.

Export requests wait in a bounded queue and go out from one task, so a slow or absent
backend never slows the receiver: when the queue is full the oldest request is dropped,
and every drop and failed export is counted (``stats()``), never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwarderStats:
    endpoint: str
    sent: int
    failed: int
    dropped: int
    queued: int


class OtlpForwarder:
    def __init__(self, endpoint: str, max_queue: int = 1024, timeout: float = 5.0) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self._queue: deque[Message] = deque()
        self._max_queue = max_queue
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self.sent = self.failed = self.dropped = 0

    def enqueue(self, request: Message) -> None:
        """Queue an ExportTrace/Logs/MetricsServiceRequest; callable from any thread."""
        loop = self._loop
        if loop is None:  # before start(): kept, sent once the forwarder runs
            self._put(request)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._put(request)
        else:
            loop.call_soon_threadsafe(self._put, request)

    def _put(self, request: Message) -> None:
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(request)
        if self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self.endpoint)
        self._task = asyncio.create_task(self._run())

    async def stop(self, drain: float = 2.0) -> None:
        """Send what is queued (for at most ``drain`` seconds), then close."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), drain)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._channel is not None:
            await self._channel.close(None)
        self._task = None

    async def _drained(self) -> None:
        while self._queue:
            await asyncio.sleep(0.02)

    async def _run(self) -> None:
        assert self._channel is not None and self._wake is not None
        traces = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        logs = logs_service_pb2_grpc.LogsServiceStub(self._channel)
        metrics = metrics_service_pb2_grpc.MetricsServiceStub(self._channel)
        backoff = 0.1
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            request = self._queue[0]
            try:
                if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                    await traces.Export(request, timeout=self.timeout)
                elif isinstance(request, logs_service_pb2.ExportLogsServiceRequest):
                    await logs.Export(request, timeout=self.timeout)
                elif isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                    await metrics.Export(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as err:
                self.failed += 1
                log.warning("OTLP export to %s failed: %s", self.endpoint, err.code().name)
                # Keep the request and back off: a backend restart loses nothing that fits
                # in the queue.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if self._queue and self._queue[0] is request:
                self._queue.popleft()
            self.sent += 1

    def stats(self) -> ForwarderStats:
        return ForwarderStats(self.endpoint, self.sent, self.failed, self.dropped, len(self._queue))
