"""Telemetry settings → TelemetryIR: the same for every sidecar of one control plane."""

from __future__ import annotations

from controlplane.ir import TelemetryIR
from controlplane.telemetry.settings import TelemetrySettings


def compile_telemetry(settings: TelemetrySettings | None) -> TelemetryIR | None:
    if settings is None or not settings.enabled:
        return None
    return TelemetryIR(
        sampling_percent=settings.sampling_percent,
        header_attributes=tuple(sorted(set(settings.header_attributes))),
        client_key_header=settings.client_key_header,
    )
