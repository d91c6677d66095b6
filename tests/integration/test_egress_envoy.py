"""Egress control end to end: EgressPolicy files → control plane → a real Envoy's outbound
listener → real HTTP and TLS destinations on loopback.

The workload is played by the test: it points its requests at the sidecar's outbound port
(HTTP with the real Host; TLS with the real SNI) as a workload does in the embedded default.
Names under ``.localhost`` resolve to 127.0.0.1 in Envoy's resolver, so every destination
is a local server the test starts.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import http.server
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from polling import eventually

from controlplane.netutil import free_port
from controlplane.telemetry.store import Query
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.envoy

TLS_NAMES = ["tls.localhost", "evil.localhost", "wild.localhost", "*.wild.localhost"]

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: EgressPolicy
metadata: {{name: digits-egress, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  mode: {mode}
  allow:
  - {{host: api.localhost, ports: [{http}], protocol: HTTP}}
  - {{host: "*.wild.localhost", ports: [{tls}, {http}]}}  # TLS dials the first port
  - {{host: tls.localhost, ports: [{tls}], protocol: TLS}}
{extra}"""


# --- destinations ----------------------------------------------------------------------------


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers who it is and which Host it was asked for."""

    def do_GET(self) -> None:
        body = f"{self.server.label} host={self.headers.get('Host')}".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egress test destination")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in TLS_NAMES]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "dest.crt", tmp / "dest.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Destinations:
    http_port: int
    tls_port: int
    ca: Path
    servers: list[http.server.ThreadingHTTPServer]


@pytest.fixture(scope="module")
def destinations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Destinations]:
    tmp = tmp_path_factory.mktemp("egress-destinations")
    cert, key = _self_signed(tmp)
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    plain.label = "http-server"  # type: ignore[attr-defined]
    secure = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    secure.label = "tls-server"  # type: ignore[attr-defined]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    servers = [plain, secure]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield Destinations(plain.server_address[1], secure.server_address[1], cert, servers)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


# --- the workload's side: requests through the outbound port ----------------------------------


def http_via(outbound: int, host: str, port: int) -> tuple[int, str]:
    """A plain HTTP request sent to the sidecar with the destination's real Host."""
    conn = http.client.HTTPConnection("127.0.0.1", outbound, timeout=5)
    try:
        conn.request("GET", "/data", headers={"Host": f"{host}:{port}"})
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def tls_via(outbound: int, host: str, ca: Path) -> str:
    """A TLS connection to the sidecar whose SNI names the destination; the certificate is
    checked against ``host``, so the bytes went through untouched to the real server."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", outbound), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        conn.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    return data.decode()


def tls_refused(outbound: int, host: str, ca: Path) -> bool:
    try:
        tls_via(outbound, host, ca)
    except (OSError, ssl.SSLError):
        return True
    return False


# --- the system ------------------------------------------------------------------------------


def egress_policy(dest: Destinations, mode: str = "Enforce", extra: str = "") -> str:
    return POLICY.format(mode=mode, http=dest.http_port, tls=dest.tls_port, extra=extra)


class System(Deployment):
    outbound: int  # the sidecar's outbound capture port
    dest: Destinations  # set by the fixture

    def write_policy(self, mode: str = "Enforce", extra: str = "") -> None:
        (self.policies / "egress.yaml").write_text(egress_policy(self.dest, mode, extra))

    async def http(self, host: str) -> tuple[int, str]:
        return await asyncio.to_thread(http_via, self.outbound, host, self.dest.http_port)

    async def tls(self, host: str) -> str:
        return await asyncio.to_thread(tls_via, self.outbound, host, self.dest.ca)

    async def tls_refused(self, host: str) -> bool:
        return await asyncio.to_thread(tls_refused, self.outbound, host, self.dest.ca)

    def egress_log(self) -> list[dict[str, Any]]:
        records = []
        for line in self.envoy.log_text().splitlines():
            if line.startswith("{") and '"modelguard.egress"' in line:
                records.append(json.loads(line))
        return records




@pytest.fixture
async def system(tmp_path: Path, destinations: Destinations) -> AsyncIterator[System]:
    outbound = free_port()
    async with await System.start(
        tmp_path,
        free_port(),  # no inbound traffic in these tests
        {"egress.yaml": egress_policy(destinations)},
        ready_timeout=20,
        outbound_port=outbound,
        # The stdout access log is flushed every 10 s by default: the tests read it sooner.
        envoy_args=("--file-flush-interval-msec", "100"),
    ) as system:
        system.outbound, system.dest = outbound, destinations
        await eventually(lambda: system.http("api.localhost"))
        yield system


# --- tests -----------------------------------------------------------------------------------


async def test_allowed_hosts_pass_and_everything_else_is_refused(system: System) -> None:
    status, body = await system.http("api.localhost")
    assert (status, body) == (200, f"http-server host=api.localhost:{system.dest.http_port}")
    # TLS by SNI, not terminated: the client verified the destination's own certificate.
    assert (await system.tls("tls.localhost")).startswith("HTTP/1.0 200")
    assert "tls-server host=tls.localhost" in await system.tls("tls.localhost")

    # Not on the list: refused, by HTTP (403 from the sidecar) and by TLS (closed).
    status, body = await system.http("evil.localhost")
    assert status == 403, body
    assert await system.tls_refused("evil.localhost")
    # HTTP to an allowed host on a port the rule does not list is refused too.
    status, _ = await asyncio.to_thread(http_via, system.outbound, "api.localhost", 1)
    assert status == 403
    # api.localhost is allowed for HTTP only, so not by SNI.
    assert await system.tls_refused("api.localhost")

    # A wildcard matches subdomains, at any depth, but not the bare parent.
    assert (await system.http("a.wild.localhost"))[0] == 200
    assert (await system.http("x.y.wild.localhost"))[0] == 200
    assert "tls-server" in await system.tls("a.wild.localhost")
    assert (await system.http("wild.localhost"))[0] == 403
    assert await system.tls_refused("wild.localhost")

    # Blocked attempts are visible: counted, and logged with destination and policy.
    stats = system.envoy.stats("outbound")
    assert stats[f"http.outbound_{system.outbound}.rbac.denied"] == 3
    assert stats["tcp.outbound_tls_blocked.downstream_cx_total"] == 3

    def blocked() -> list[dict[str, Any]]:
        return [r for r in system.egress_log() if r["verdict"] == "blocked"]

    await eventually(lambda: len(blocked()) == 6)
    by_destination = {(r["protocol"], r["destination"]) for r in blocked()}
    assert ("HTTP", f"evil.localhost:{system.dest.http_port}") in by_destination
    assert ("HTTP", f"wild.localhost:{system.dest.http_port}") in by_destination
    assert ("TLS", "evil.localhost") in by_destination
    assert ("TLS", "wild.localhost") in by_destination
    assert {r["policy"] for r in blocked()} == {"EgressPolicy/demo/digits-egress"}
    allowed = [r for r in system.egress_log() if r["verdict"] == "allowed"]
    assert {
        (r["protocol"], r["destination"], r["rule"])
        for r in allowed
        if r["destination"].startswith(("tls.", "api."))
    } >= {
        ("TLS", "tls.localhost", "demo.digits-egress.allow-2"),
        ("HTTP", f"api.localhost:{system.dest.http_port}", "demo.digits-egress.allow-0"),
    }


async def test_audit_mode_lets_through_and_logs_and_edits_apply_live(system: System) -> None:
    assert (await system.http("evil.localhost"))[0] == 403
    assert await system.tls_refused("evil.localhost")

    system.write_policy(mode="Audit")

    async def http_passes() -> bool:
        return (await system.http("evil.localhost"))[0] == 200

    await eventually(http_passes)
    # An unlisted TLS host is passed on too; with no rule to say the port, the sidecar
    # dials 443 (nothing listens there on loopback, so the handshake itself fails here).
    await system.tls_refused("evil.localhost")
    assert system.envoy.stat("tcp.outbound_tls_audit.downstream_cx_total") == 1

    def would_block() -> set[tuple[str, str, str]]:
        return {
            (r["protocol"], r["destination"], r["policy"])
            for r in system.egress_log()
            if r["verdict"] == "would-block"
        }

    await eventually(
        lambda: (
            {
                (
                    "HTTP",
                    f"evil.localhost:{system.dest.http_port}",
                    "EgressPolicy/demo/digits-egress",
                ),
                ("TLS", "evil.localhost", "EgressPolicy/demo/digits-egress"),
            }
            <= would_block()
        )
    )
    # Counted as would-be denials, never as denials.
    prefix = f"http.outbound_{system.outbound}.rbac"
    before = system.envoy.stats("outbound")
    assert (await system.http("evil.localhost"))[0] == 200
    after = system.envoy.stats("outbound")
    assert after[f"{prefix}.shadow_denied"] == before[f"{prefix}.shadow_denied"] + 1
    assert after[f"{prefix}.denied"] == before[f"{prefix}.denied"]

    # Back to Enforce, now with evil.localhost on the list for HTTP only.
    system.write_policy(
        extra=f"  - {{host: evil.localhost, ports: [{system.dest.http_port}], protocol: HTTP}}\n"
    )

    async def tls_refused_again() -> bool:
        return await system.tls_refused("evil.localhost")

    await eventually(tls_refused_again)
    assert (await system.http("evil.localhost"))[0] == 200
    # Removing the policy falls back to the sidecar's own default deny.
    (system.policies / "egress.yaml").unlink()

    async def http_refused() -> bool:
        return (await system.http("api.localhost"))[0] == 403

    await eventually(http_refused)
    await eventually(
        lambda: any(
            r["verdict"] == "blocked" and r["policy"] == "default-deny" for r in system.egress_log()
        )
    )


async def test_blocked_attempts_reach_telemetry_traces_and_status(
    system: System, capsys: pytest.CaptureFixture[str]
) -> None:
    """The sidecar's OpenTelemetry access logger sends every egress decision to the control
    plane: `modelguard traces --verdict blocked` finds them, `modelguard status` sums them up
    per sidecar with the destination and the deciding policy."""
    from controlplane.app.cli import main
    from controlplane.app.status_cli import fetch_status, render

    admin = f"127.0.0.1:{system.plane.admin_port}"
    http_destination = f"evil.localhost:{system.dest.http_port}"
    assert (await system.http("evil.localhost"))[0] == 403
    assert (await system.http("evil.localhost"))[0] == 403
    assert await system.tls_refused("c2.localhost")
    assert (await system.http("api.localhost"))[0] == 200
    store = system.plane.telemetry.store

    def egress(verdict: str) -> dict[str, dict[str, str]]:
        found = store.query(Query(verdict=verdict, kind="log"), 1000)
        return {
            dict(r.attributes)["modelguard.egress.destination"]: dict(r.attributes)
            for r in found
            if r.node == "digits-model-0"
        }

    blocked = await eventually(
        lambda: (b := egress("blocked")) and {http_destination, "c2.localhost"} <= set(b) and b
    )
    for destination, protocol in ((http_destination, "HTTP"), ("c2.localhost", "TLS")):
        attrs = blocked[destination]
        assert attrs["modelguard.egress.protocol"] == protocol
        assert attrs["modelguard.policy"] == "EgressPolicy/demo/digits-egress"
        assert attrs["modelguard.verdict"] == "blocked"
        assert attrs["modelguard.verdict.rule"] == "default-deny"
    allowed = await eventually(lambda: egress("allowed"))
    api = allowed[f"api.localhost:{system.dest.http_port}"]
    assert api["modelguard.verdict.rule"] == "demo.digits-egress.allow-0"
    assert api["http.response.status_code"] == "200"

    # modelguard traces --verdict blocked, over the admin API.
    assert (
        await asyncio.to_thread(
            main, ["traces", "--admin", admin, "--verdict", "blocked", "--json"]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["verdict"] for r in lines} == {"blocked"}
    assert {r["attributes"]["modelguard.egress.destination"] for r in lines} == {
        http_destination,
        "c2.localhost",
    }

    # modelguard status: per sidecar, count, last seen, policy.
    report = await asyncio.to_thread(fetch_status, admin)
    (sidecar,) = report.sidecars
    by_destination = {b.destination: b for b in sidecar.egress_blocked}
    assert set(by_destination) == {http_destination, "c2.localhost"}
    assert by_destination[http_destination].count == 2
    assert by_destination[http_destination].verdict == "blocked"
    assert by_destination["c2.localhost"].protocol == "TLS"
    assert by_destination["c2.localhost"].policy == "EgressPolicy/demo/digits-egress"
    assert by_destination["c2.localhost"].last_seen.seconds > 0
    assert "c2.localhost" in render(report)

    # Audit: what would have been blocked is listed as such, and let through.
    system.write_policy(mode="Audit")

    async def passes() -> bool:
        return (await system.http("audited.localhost"))[0] == 200

    await eventually(passes)

    async def listed() -> bool:
        report = await asyncio.to_thread(fetch_status, admin)
        return any(
            b.destination == f"audited.localhost:{system.dest.http_port}"
            and b.verdict == "would-block"
            for b in report.sidecars[0].egress_blocked
        )

    await eventually(listed)
