"""Telemetry wired into one control plane: receiver + store + forwarder + own instrumentation.

The app makes one ``TelemetryService``: it is a sidecar service (the OTLP receiver on the xDS
port) and brings the admin service that reads it (``admin``). The app then hands it the parts
of the control plane its own metrics read (``instrument``), never the control plane itself.
"""

from __future__ import annotations

from typing import Any

import grpc

from controlplane.telemetry.admin import TelemetryAdmin
from controlplane.telemetry.forwarder import OtlpForwarder
from controlplane.telemetry.instrument import Observed, SelfTelemetry
from controlplane.telemetry.receiver import CONTROL_PLANE, OtlpReceiver
from controlplane.telemetry.settings import TelemetrySettings
from controlplane.telemetry.store import TelemetryStore


class TelemetryService:
    def __init__(self, settings: TelemetrySettings) -> None:
        self.settings = settings
        self.store = TelemetryStore(settings.max_records, settings.max_bytes)
        self.forwarder = (
            OtlpForwarder(settings.forward_endpoint, settings.forward_queue)
            if settings.forward_endpoint
            else None
        )
        forward = self.forwarder.enqueue if self.forwarder is not None else None
        self.receiver = OtlpReceiver(settings, self.store, forward)
        self.instrumentation = SelfTelemetry(self._own_spans, forward)
        self.receiver.observe = self.instrumentation.observe_requests
        self.admin = TelemetryAdmin(
            self.store, self.instrumentation.metric_points, self.forwarder
        )

    def instrument(self, plane: Observed) -> None:
        """Spans and metrics of the control plane's parts (``Observed``), and of this service."""
        self.instrumentation.instrument(plane, self.store, self.forwarder)

    def _own_spans(self, request: Any) -> None:
        self.receiver.ingest_traces(request, source=CONTROL_PLANE)

    # -- SidecarService --

    def add_to(self, server: grpc.aio.Server) -> None:
        self.receiver.add_to(server)

    async def start(self) -> None:
        if self.forwarder is not None:
            await self.forwarder.start()

    async def stop(self) -> None:
        await self.instrumentation.shutdown()
        if self.forwarder is not None:
            await self.forwarder.stop()
