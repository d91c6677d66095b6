"""Egress control beside the mesh, with real Envoys: a client workload whose sidecar
captures its outbound traffic (outbound port, default deny) still reaches mesh services by
their Host names, through their mTLS clusters, and the callee sees and judges its identity.

Three sidecars: the model (mTLS Strict, an AccessPolicy that allows only ``checkout``) and
two clients in namespace ``web`` with egress control and no mesh port: ``checkout`` and
``intruder``. Outside destinations stay blocked for both.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from polling import eventually

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.app.status_cli import fetch_status
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.identity.service import IdentityConfig
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.sidecar.bootstrap import XdsCredentials, build_bootstrap
from controlplane.telemetry.store import Query

pytestmark = pytest.mark.envoy

CHECKOUT_ID = "spiffe://cluster.local/ns/web/sa/checkout"

ACCESS = f"""\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  mtls: {{mode: Strict}}
  defaultAction: Deny
  rules:
  - name: checkout
    action: Allow
    from: {{identities: ["{CHECKOUT_ID}"]}}
"""

# Both clients: nothing outside is allowed but one host; an allow rule that names the
# mesh service cannot divert it to plaintext.
EGRESS = """\
apiVersion: modelguard.io/v1alpha1
kind: EgressPolicy
metadata: {{name: {service}, namespace: web}}
spec:
  targetRef: {{service: {service}}}
  allow:
  - {{host: api.localhost, ports: [80], protocol: HTTP}}
  - {{host: digits-model.demo, ports: [80, 8080], protocol: HTTP}}
"""


class _Workload(http.server.BaseHTTPRequestHandler):
    """The model's workload: answers with the Host and the caller its sidecar vouches for."""

    def do_GET(self) -> None:
        body = json.dumps(
            {"host": self.headers.get("Host"), "xfcc": self.headers.get("x-forwarded-client-cert")}
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def workload() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Workload)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Mesh:
    plane: ControlPlane
    envoys: dict[str, EnvoyProcess]
    outbound: dict[str, int]

    async def get(self, client: str, host: str) -> tuple[int, Any]:
        """GET / from a client workload through its sidecar's outbound port."""
        status, _, body = await asyncio.to_thread(
            http_request, "GET", f"http://127.0.0.1:{self.outbound[client]}/", None, {"host": host}
        )
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body




@pytest.fixture
async def mesh(tmp_path: Path, workload: int) -> AsyncIterator[Mesh]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "access.yaml").write_text(ACCESS)
    for service in ("checkout", "intruder"):
        (policies / f"egress-{service}.yaml").write_text(EGRESS.format(service=service))
    identity_dir = tmp_path / "identity"
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(policies),),
            xds_port=0,
            admin_port=0,
            debounce_quiet=0.02,
            debounce_max=0.2,
            identity=IdentityConfig(directory=str(identity_dir), svid_lifetime=3600),
        )
    )
    await plane.start()
    sides = {
        "model": Sidecar(
            node_id="digits-model-0",
            service="digits-model",
            namespace="demo",
            identity="spiffe://cluster.local/ns/demo/sa/digits-model",
            app_port=workload,
            inbound_port=free_port(),
            inbound_address="127.0.0.1",
        )
    }
    outbound = {}
    for name in ("checkout", "intruder"):
        outbound[name] = free_port()
        sides[name] = Sidecar(
            node_id=f"{name}-0",
            service=name,
            namespace="web",
            identity=f"spiffe://cluster.local/ns/web/sa/{name}",
            app_port=free_port(),  # nothing calls the clients
            inbound_port=free_port(),
            inbound_address="127.0.0.1",
            outbound_port=outbound[name],
        )
    envoys: dict[str, EnvoyProcess] = {}
    try:
        for name, side in sides.items():
            admin = free_port()
            envoys[name] = EnvoyProcess(
                build_bootstrap(
                    side,
                    xds_host="127.0.0.1",
                    xds_port=plane.xds_port,
                    admin_port=admin,
                    credentials=XdsCredentials.for_sidecar(side, identity_dir),
                ),
                admin_port=admin,
                log_path=tmp_path / f"{name}.log",
            ).start()
        for envoy in envoys.values():
            await asyncio.to_thread(envoy.wait_ready, 20)
        yield Mesh(plane, envoys, outbound)
    finally:
        for envoy in envoys.values():
            envoy.stop()
        await plane.stop(grace=0)


async def test_mesh_services_are_reached_through_the_outbound_listener_with_mtls(
    mesh: Mesh,
) -> None:
    async def reached() -> bool:
        return (await mesh.get("checkout", "digits-model.demo"))[0] == 200

    await eventually(reached)
    # The callee's sidecar terminated mTLS and vouches for the caller's SPIFFE ID.
    for host in (
        "digits-model.demo",
        "digits-model.demo:8080",
        "digits-model.demo.svc.cluster.local",
        "digits-model.demo.svc.cluster.local:80",
    ):
        status, body = await mesh.get("checkout", host)
        assert status == 200, (host, body)
        assert body["host"] == host
        assert f"URI={CHECKOUT_ID}" in body["xfcc"], body

    # Same route for the intruder; the model's AccessPolicy judges its identity and says no.
    status, body = await mesh.get("intruder", "digits-model.demo")
    assert status == 403, body
    assert body["reason"] == "rbac_access_denied_matched_policy[none]", body

    # Outside the mesh, egress control still decides: unlisted hosts are blocked.
    status, _ = await mesh.get("checkout", "evil.localhost")
    assert status == 403
    stats = await asyncio.to_thread(mesh.envoys["checkout"].stats, "outbound")
    port = mesh.outbound["checkout"]
    assert stats[f"http.outbound_{port}.rbac.denied"] == 1, stats
    # The mesh calls went over the mTLS cluster, never the plaintext forward proxy.
    assert stats["cluster.outbound|digits-model.demo.upstream_rq_completed"] >= 5, stats
    assert stats.get("cluster.outbound|dynamic-forward-proxy.upstream_rq_completed", 0) == 0

    # Telemetry: mesh calls are allowed by the mesh, the outside host blocked by the policy.
    store = mesh.plane.telemetry.store

    def verdicts() -> set[tuple[str, str, str]]:
        return {
            (
                dict(r.attributes).get("modelguard.egress.destination", ""),
                r.verdict,
                dict(r.attributes).get("modelguard.policy", ""),
            )
            for r in store.query(Query(kind="log", service="checkout"), 1000)
        }

    await eventually(
        lambda: (
            {
                ("digits-model.demo", "allowed", "mesh"),
                ("evil.localhost", "blocked", "EgressPolicy/web/checkout"),
            }
            <= verdicts()
        )
    )
    report = await asyncio.to_thread(fetch_status, f"127.0.0.1:{mesh.plane.admin_port}")
    blocked = {
        s.node_id: [(b.destination, b.count) for b in s.egress_blocked] for s in report.sidecars
    }
    assert blocked["checkout-0"] == [("evil.localhost", 1)]
    assert blocked["digits-model-0"] == []
