"""``modelguard run``: the embedded default on one machine.

The control plane (in this process), the demo model API and one real Envoy sidecar in front
of it, configured only over xDS from the policy folder, which is watched for edits.
Ctrl-C stops every process this started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

from controlplane.bootstrap import XdsCredentials, build_bootstrap, render_bootstrap
from controlplane.identity.service import config_from_args as identity_config_from_args
from controlplane.inventory import Sidecar
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, wait_for_port
from controlplane.server import ControlPlane, ControlPlaneConfig

log = logging.getLogger(__name__)

DEMO_SERVICE, DEMO_NAMESPACE = "digits-model", "demo"
EXAMPLE = (
    "curl -s -X POST http://127.0.0.1:{port}/v1/predict -H 'content-type: application/json' "
    "-H 'x-api-key: demo-key' -d '{{\"instances\": [[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,"
    "15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,"
    "13,10,0,0,0]]}}'"
)


class DemoModel:
    """The demo model API as a child process of its own session."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port, self.log_path = port, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "controlplane.local.model", "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _serve(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(args.policies,),
            xds_port=args.xds_port,
            admin_port=args.admin_port,
            # mTLS between sidecars, xDS over TLS, a token per sidecar (issue 6).
            identity=identity_config_from_args(args, str(workdir / "identity")),
        )
    )
    await plane.start()
    model = DemoModel(free_port(), workdir / "model.log")
    envoy: EnvoyProcess | None = None
    try:
        model.start()
        await asyncio.to_thread(wait_for_port, "127.0.0.1", model.port, 30)
        sidecar = Sidecar(
            node_id=f"{DEMO_SERVICE}-0",
            service=DEMO_SERVICE,
            namespace=DEMO_NAMESPACE,
            identity=f"spiffe://cluster.local/ns/{DEMO_NAMESPACE}/sa/{DEMO_SERVICE}",
            app_port=model.port,
            inbound_port=args.listen_port,
            inbound_address="127.0.0.1",
            labels=(("app", DEMO_SERVICE),),
        )
        envoy_admin = free_port()
        credentials = (
            XdsCredentials.for_sidecar(sidecar, plane.identity.config.directory)
            if plane.identity is not None
            else None
        )
        bootstrap = build_bootstrap(
            sidecar,
            xds_host="127.0.0.1",
            xds_port=plane.xds_port,
            admin_port=envoy_admin,
            credentials=credentials,
        )
        (workdir / "sidecar-bootstrap.yaml").write_text(render_bootstrap(bootstrap))
        envoy = EnvoyProcess(bootstrap, admin_port=envoy_admin, log_path=workdir / "envoy.log")
        envoy.start()
        await asyncio.to_thread(envoy.wait_ready, 30)
        print(
            "\nmodelguard is running (Ctrl-C stops everything):\n"
            f"  protected model API  http://127.0.0.1:{args.listen_port}/v1/predict "
            f"(sidecar in front of the demo model)\n"
            f"  policies             {args.policies} (edits apply live)\n"
            "  sidecar status       .venv/bin/modelguard status "
            f"--admin 127.0.0.1:{plane.admin_port}\n"
            f"  logs                 {workdir}/\n\n"
            f"Try:\n  {EXAMPLE.format(port=args.listen_port)}\n",
            flush=True,
        )
        await plane.wait_closed()
    finally:
        if envoy is not None:
            envoy.stop()
        model.stop()
        await plane.stop(grace=0)


def run_embedded(args: argparse.Namespace) -> int:
    loop = asyncio.new_event_loop()
    task = loop.create_task(_serve(args))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("\nstopped: control plane, sidecar and demo model", file=sys.stderr)
    except Exception as err:  # every child is already stopped by _serve's finally
        print(f"modelguard run failed: {err}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0
