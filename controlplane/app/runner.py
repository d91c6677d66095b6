"""``modelguard run``: the embedded default on one machine.

The control plane (in this process), the demo model API and one real Envoy sidecar in front
of it, configured only over xDS from the policy folder, which is watched for edits. The
sidecar also has an outbound port: the demo workload's way out, where the EgressPolicy in
the folder is enforced (default deny). Ctrl-C stops every process this started, by PID.

Callers need a registered API key (policies/access.yaml names the Secret ``demo-keys``). On
its first start the runner writes that Secret to ``WORKDIR/api-keys/`` with digests only,
and the keys themselves once to ``WORKDIR/demo-keys.txt`` (mode 0600), so the banner can
show them again on every start: two keys of tenant ``acme`` (tiers standard and premium)
and one of tenant ``globex``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from controlplane.app.cliutil import cli_command
from controlplane.app.server import ControlPlane, ControlPlaneConfig, PortInUse
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.identity.apikeys import digest
from controlplane.identity.service import config_from_args as identity_config_from_args
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, port_available, port_in_use_message, wait_for_port
from controlplane.sidecar.bootstrap import XdsCredentials, write_bootstrap

log = logging.getLogger(__name__)

DEMO_SERVICE, DEMO_NAMESPACE = "digits-model", "demo"
EXAMPLE = (
    "curl -s -X POST http://127.0.0.1:{port}/v1/predict -H 'content-type: application/json' "
    "-H 'x-api-key: {key}' -d '{{\"instances\": [[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,"
    "15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,"
    "13,10,0,0,0]]}}'"
)
# What the demo workload would send outside, through its sidecar: an HTTP proxy request to
# a host no policy allows (403, logged, in `modelguard status`), and how TLS goes out.
EGRESS_EXAMPLE = "curl -s -x http://127.0.0.1:{port} http://example.com/  # 403: not allowed"
EGRESS_TLS = (
    "curl --connect-to bucket.s3.amazonaws.com:443:127.0.0.1:{port} "
    "https://bucket.s3.amazonaws.com/  # TLS by SNI"
)


# (key id, tenant, tier): the demo's registered callers.
DEMO_KEYS = (
    ("acme-standard", "acme", "standard"),
    ("acme-premium", "acme", "premium"),
    ("globex-standard", "globex", "standard"),
)
DEMO_SECRET = "demo-keys"


def demo_keys(workdir: Path) -> tuple[Path, dict[str, str]]:
    """The demo key Secret (digests only) and the keys by id, written on the first start.

    The keys are kept in ``demo-keys.txt`` (0600) beside the run's other state, never in the
    Secret: what the control plane loads is the same as for any registered key."""
    folder, plain = workdir / "api-keys", workdir / "demo-keys.txt"
    workdir.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    if plain.exists():
        for line in plain.read_text().splitlines():
            key_id, _, key = line.partition(" ")
            if key_id and key:
                keys[key_id] = key
    if set(keys) != {key_id for key_id, _, _ in DEMO_KEYS}:
        keys = {key_id: f"mg_{secrets.token_urlsafe(24)}" for key_id, _, _ in DEMO_KEYS}
        fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("".join(f"{key_id} {key}\n" for key_id, key in keys.items()))
    os.chmod(plain, 0o600)
    folder.mkdir(parents=True, exist_ok=True)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": DEMO_SECRET,
            "namespace": DEMO_NAMESPACE,
            "labels": {"modelguard.io/api-keys": "true"},
            "annotations": {
                "modelguard.io/keys": yaml.safe_dump(
                    {key_id: {"tenant": t, "tier": tier} for key_id, t, tier in DEMO_KEYS},
                    sort_keys=True,
                )
            },
        },
        "stringData": {key_id: f"sha256:{digest(keys[key_id])}" for key_id, _, _ in DEMO_KEYS},
    }
    (folder / f"{DEMO_SECRET}.yaml").write_text(yaml.safe_dump(secret, sort_keys=False))
    return folder, keys


def banner(
    args: argparse.Namespace,
    admin_port: int,
    workdir: Path,
    envoy_admin: int | None = None,
    keys: dict[str, str] | None = None,
    web: str | None = None,
    cli: str | None = None,
) -> str:
    keys = keys or {}
    cli = cli or cli_command()
    lines = [
        "",
        "modelguard is running (Ctrl-C stops everything):",
        f"  protected model API  http://127.0.0.1:{args.listen_port}/v1/predict "
        "(sidecar in front of the demo model)",
    ]
    if args.outbound_port:
        lines += [
            f"  model's way out      127.0.0.1:{args.outbound_port} (egress: use it as HTTP_PROXY, "
            "or send TLS there with the real SNI;",
            f"{'':23}only what an EgressPolicy in {args.policies} allows gets through)",
        ]
    lines += [
        f"  policies             {args.policies} (edits apply live)",
        f"  sidecar status       {cli} status --admin 127.0.0.1:{admin_port}",
    ]
    if envoy_admin is not None:
        lines += [
            f"  sidecar Envoy admin  http://127.0.0.1:{envoy_admin}/ "
            f"({cli} proxy-config {DEMO_SERVICE}-0 stats "
            f"--admin 127.0.0.1:{admin_port})",
        ]
    if web is not None:
        lines += [
            f"  live defense page    {web}/ui",
            f"  Prometheus metrics   {web}/metrics",
        ]
    lines += [
        f"  logs                 {workdir}/",
    ]
    if keys:
        lines += [
            "",
            f"API keys (digests in {workdir}/api-keys/, the keys in {workdir}/demo-keys.txt):",
        ]
        for key_id, tenant, tier in DEMO_KEYS:
            if key_id in keys:
                lines.append(f"  {key_id:<16} tenant {tenant:<7} tier {tier:<9} {keys[key_id]}")
    first = keys.get(DEMO_KEYS[0][0], "YOUR-KEY")
    insecure = bool(getattr(args, "insecure", False))
    if insecure and keys:
        # The keys exist, but without the CA none is loaded: the curl below gets 403.
        lines += ["  (--insecure loads none of them: the demo policy admits nobody)"]
    lines += [
        "",
        "Try (403 under --insecure):" if insecure else "Try (without a registered key: 403):",
        f"  {EXAMPLE.format(port=args.listen_port, key=first)}",
    ]
    if args.outbound_port:
        lines += [
            f"  {EGRESS_EXAMPLE.format(port=args.outbound_port)}",
            f"  {EGRESS_TLS.format(port=args.outbound_port)}",
            f"  {cli} traces --admin 127.0.0.1:{admin_port} --verdict blocked",
        ]
    return "\n".join(lines) + "\n"


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


def demo_sidecar(args: argparse.Namespace, model_port: int) -> Sidecar:
    return Sidecar(
        node_id=f"{DEMO_SERVICE}-0",
        service=DEMO_SERVICE,
        namespace=DEMO_NAMESPACE,
        identity=f"spiffe://cluster.local/ns/{DEMO_NAMESPACE}/sa/{DEMO_SERVICE}",
        app_port=model_port,
        inbound_port=args.listen_port,
        inbound_address="127.0.0.1",
        labels=(("app", DEMO_SERVICE),),
        # The model's outbound traffic: it has no business calling out, so what
        # policies/egress.yaml does not allow is refused and shows up in status.
        outbound_port=args.outbound_port or None,
    )


async def _serve(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # The sidecar's ports are bound by Envoy, later and without SO_REUSEPORT: a taken port
    # would only show as a NACKed listener. Refuse now, naming it (the control plane's own
    # ports are refused by its bind).
    for what, port in (("sidecar listener", args.listen_port), ("outbound", args.outbound_port)):
        if port and not port_available("127.0.0.1", port):
            raise PortInUse(port_in_use_message(what, "127.0.0.1", port))
    key_folder, keys = demo_keys(workdir)
    identity = identity_config_from_args(args, str(workdir / "identity"))
    if identity is not None:
        # The demo keys beside any --api-keys the user gave.
        identity = dataclasses.replace(
            identity, api_key_paths=(*identity.api_key_paths, str(key_folder))
        )
    else:
        log.warning("--insecure: no API keys are loaded, so policies requiring keys admit nobody")
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(args.policies,),
            xds_port=args.xds_port,
            admin_port=args.admin_port,
            # mTLS between sidecars, xDS over TLS, a token per sidecar (issue 6).
            identity=identity,
            xff_num_trusted_hops=getattr(args, "xff_num_trusted_hops", 0),
            watch_plaintext=True,
            metrics_port=getattr(args, "metrics_port", None),
            # Quarantines stay in memory, but a restart need not recalibrate (~10 s of CPU).
            profiles_dir=str(workdir / "profiles"),
        )
    )
    await plane.start()
    model = DemoModel(free_port(), workdir / "model.log")
    envoy: EnvoyProcess | None = None
    try:
        model.start()
        await asyncio.to_thread(wait_for_port, "127.0.0.1", model.port, 30)
        sidecar = demo_sidecar(args, model.port)
        envoy_admin = free_port()
        credentials = (
            XdsCredentials.for_sidecar(sidecar, plane.identity.config.directory)
            if plane.identity is not None
            else None
        )
        # As `modelguard bootstrap -o` writes it: the bootstrap (0600) holds no secret, the
        # token is in its own 0600 file beside it, read by Envoy through file SDS.
        bootstrap_path = write_bootstrap(
            workdir / "sidecar-bootstrap.yaml",
            sidecar,
            xds_host="127.0.0.1",
            xds_port=plane.xds_port,
            admin_port=envoy_admin,
            credentials=credentials,
        )
        envoy = EnvoyProcess(
            bootstrap_path.read_text(), admin_port=envoy_admin, log_path=workdir / "envoy.log"
        )
        envoy.start()
        await asyncio.to_thread(envoy.wait_ready, 30)
        web = plane.http.url if plane.http is not None else None
        print(banner(args, plane.admin_port, workdir, envoy_admin, keys, web), flush=True)
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
