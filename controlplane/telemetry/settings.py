"""Telemetry settings of one control plane: what its sidecars record and where it goes.

They are the control plane's own configuration (``modelguard serve``/``run`` flags), not a
policy kind: like Istio's mesh-wide ``meshConfig`` defaults, they hold for every sidecar the
control plane serves. This module has no heavy imports: compile reads it too.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

# Request headers whose values are credentials: they are never stored, shown or forwarded
# as they are, only as a hash (see ``records.hash_secret``).
DEFAULT_SECRET_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "cookie")

_HEADER = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")


class SettingsError(ValueError):
    """A telemetry setting out of range; the message names the setting."""


@dataclass(frozen=True)
class TelemetrySettings:
    enabled: bool = True
    # Percentage of requests a sidecar traces (Envoy's random_sampling). Access-log records
    # are the audit trail: every request gets one, whatever this says. 1 % is Istio's
    # default: the access log already carries each request's verdict, client, status and
    # duration, so a span per request would double the receiver's work (bench/policy_tax.py)
    # for latency detail that a sample shows as well. A request with an x-client-trace-id
    # header is still always traced (Envoy's client_sampling, 100 %).
    sampling_percent: float = 1.0
    # Request headers recorded on spans and log records (lower-case names).
    header_attributes: tuple[str, ...] = ()
    # The header that identifies a client (its API key). Always recorded, hashed.
    client_key_header: str = "x-api-key"
    secret_headers: tuple[str, ...] = DEFAULT_SECRET_HEADERS
    # Where everything received (and the control plane's own telemetry) is forwarded:
    # an OTLP/gRPC endpoint HOST:PORT (a Collector, Jaeger, Tempo). Empty: kept locally only.
    forward_endpoint: str = ""
    # Bounds of the in-memory store of recent records; the oldest go first.
    max_records: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    # Forwarding queue bound (export requests); overflow drops the oldest, counted.
    forward_queue: int = 1024

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.sampling_percent <= 100.0:
            problems.append(f"sampling_percent: must be within 0..100, got {self.sampling_percent}")
        for name in (*self.header_attributes, self.client_key_header, *self.secret_headers):
            if not _HEADER.match(name):
                problems.append(f"header {name!r}: must be a lower-case HTTP header name")
        for key in ("max_records", "max_bytes", "forward_queue"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be at least 1")
        if self.forward_endpoint and not re.match(r"^[\w.\-\[\]:]+:\d+$", self.forward_endpoint):
            problems.append(f"forward_endpoint: expected HOST:PORT, got {self.forward_endpoint!r}")
        if problems:
            raise SettingsError("telemetry settings: " + "; ".join(problems))

    def is_secret(self, header: str) -> bool:
        return header in self.secret_headers or header == self.client_key_header


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The telemetry flags of ``modelguard serve`` and ``modelguard run``."""
    group = parser.add_argument_group("telemetry")
    group.add_argument(
        "--trace-sampling",
        type=float,
        default=TelemetrySettings.sampling_percent,
        metavar="PERCENT",
        help="percentage of requests the sidecars trace, default 1 (access logs record all)",
    )
    group.add_argument(
        "--trace-header",
        action="append",
        default=[],
        metavar="NAME",
        help="request header recorded on spans and access logs (repeatable; secrets hashed)",
    )
    group.add_argument(
        "--client-key-header",
        default=TelemetrySettings.client_key_header,
        help="header that identifies a client; recorded hashed",
    )
    group.add_argument(
        "--otlp-endpoint",
        default="",
        metavar="HOST:PORT",
        help="forward traces, logs and metrics to this OTLP/gRPC endpoint",
    )
    group.add_argument(
        "--telemetry-max-records",
        type=int,
        default=TelemetrySettings.max_records,
        help="recent spans and log records kept in memory",
    )
    group.add_argument(
        "--telemetry-max-bytes",
        type=int,
        default=TelemetrySettings.max_bytes,
        help="bound of the in-memory telemetry store, in bytes",
    )
    group.add_argument("--no-telemetry", action="store_true", help="sidecars send no telemetry")


def from_args(args: argparse.Namespace) -> TelemetrySettings:
    return TelemetrySettings(
        enabled=not args.no_telemetry,
        sampling_percent=args.trace_sampling,
        header_attributes=tuple(h.lower() for h in args.trace_header),
        client_key_header=args.client_key_header.lower(),
        forward_endpoint=args.otlp_endpoint,
        max_records=args.telemetry_max_records,
        max_bytes=args.telemetry_max_bytes,
    )
