"""The control plane's HTTP listener: ``/metrics`` (Prometheus) and the live page ``/ui``.

A small HTTP/1.1 server on asyncio streams, in the control plane's own loop: every route
reads state the boxes already keep, so a scrape or a poll costs one pass over it and never
blocks a push. One request per connection (``Connection: close``): Prometheus and the
page's poll reconnect, and there is no idle connection to bound.

Routes:
  GET  /metrics          every instrument of SelfTelemetry, in Prometheus' text format
  GET  /ui               the live page (server-rendered; a small script polls /ui/state)
  GET  /ui/state         the page's data as JSON
  POST /ui/release       end a client's quarantine and throttle ({"client": fingerprint})

/metrics carries no client and answers anyone who reaches the port (``--metrics-host``; in
the manifests the pod network, for Prometheus). The page names clients and can release
them, so it is held to the admin API's rules (controlplane/app/adminauth.py): it answers only
loopback peers (``kubectl port-forward``, as for the admin API), and a release must carry
the admin API's bearer token when ``--admin-token-file`` is set (the page asks for it), the
header ``X-Modelguard-Action: release`` (a page of another origin cannot send a custom
header without a CORS preflight, which this server never grants) and a ``Host`` naming a
loopback address (a rebound DNS name cannot reach it from a browser).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging

from controlplane.app import page
from controlplane.app.adminauth import TokenFile

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024
READ_TIMEOUT_S = 10.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
RELEASE_HEADER = "x-modelguard-action"
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    500: "Internal Server Error",
}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


class _Bad(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _is_loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        return ipaddress.ip_address(str(peer[0])).is_loopback
    except ValueError:
        return False


class ObservabilityServer:
    def __init__(
        self, plane: page.Sources, host: str, port: int, token_file: str | None = None
    ) -> None:
        self.plane, self.host, self.requested_port = plane, host, port
        self.tokens = TokenFile(token_file) if token_file else None
        self.port = 0
        self._server: asyncio.Server | None = None
        self.served = 0  # requests answered (the benchmark reads it)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.requested_port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    # -- one request --

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(
                self._respond(reader, writer.get_extra_info("peername")), READ_TIMEOUT_S
            )
        except _Bad as bad:
            status, ctype, body = bad.status, "text/plain; charset=utf-8", f"{bad}\n".encode()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except Exception:  # a broken route must never take the listener down
            log.exception("HTTP request failed")
            status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        reason = REASONS.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
        )
        self.served += 1
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    async def _respond(self, reader: asyncio.StreamReader, peer: object) -> tuple[int, str, bytes]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as err:
            raise _Bad(413, "request head too large") from err
        if len(raw) > MAX_HEADER_BYTES:
            raise _Bad(413, "request head too large")
        lines = raw.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError as err:
            raise _Bad(400, "malformed request line") from err
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        path = target.split("?", 1)[0]
        if path.startswith("/ui") and not _is_loopback(peer):
            raise _Bad(
                403, "the live page answers loopback only, like the admin API: port-forward"
            )
        if method == "GET":
            if path == "/metrics":
                text = self.plane.telemetry.instrumentation.prometheus_text()
                return 200, PROMETHEUS_TEXT, text
            if path in ("/ui", "/ui/"):
                budgets = await page.budget_use(self.plane)
                return 200, "text/html; charset=utf-8", page.html(self.plane, budgets).encode()
            if path == "/ui/state":
                state = page.state(self.plane, await page.budget_use(self.plane))
                return 200, "application/json", json.dumps(state).encode()
            if path == "/":
                return 200, "text/plain; charset=utf-8", b"modelguard: /metrics /ui\n"
            raise _Bad(404, f"{path}: not found (/metrics, /ui)")
        if method == "POST" and path == "/ui/release":
            length = int(headers.get("content-length", "0") or 0)
            if length > MAX_BODY_BYTES:
                raise _Bad(413, "body too large")
            body = await reader.readexactly(length) if length else b""
            self._authorize_release(peer, headers)
            try:
                client = json.loads(body or b"{}").get("client", "")
            except (ValueError, AttributeError) as err:
                raise _Bad(400, 'body: expected JSON {"client": FINGERPRINT}') from err
            if not isinstance(client, str) or not client:
                raise _Bad(400, "client: required (the fingerprint the page shows)")
            released = page.release(self.plane, client)
            if not released:
                raise _Bad(404, f"client {client}: not quarantined or throttled")
            return 200, "application/json", json.dumps({"released": released}).encode()
        if path in ("/metrics", "/ui", "/ui/state", "/ui/release"):
            raise _Bad(405, f"{method} {path}: method not allowed")
        raise _Bad(404, f"{path}: not found (/metrics, /ui)")

    def _authorize_release(self, peer: object, headers: dict[str, str]) -> None:
        if not _is_loopback(peer):
            raise _Bad(403, "release: only from loopback, like the admin API")
        if self.tokens is not None:
            scheme, _, presented = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), self.tokens.current()
            ):
                raise _Bad(401, "release: the admin API's bearer token is required")
        if headers.get(RELEASE_HEADER) != "release":
            raise _Bad(403, f"release: the {RELEASE_HEADER} header is required")
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in LOOPBACK_HOSTS:
            raise _Bad(403, "release: Host must be a loopback address")
