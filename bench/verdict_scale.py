"""What quarantining many distinct attacker keys costs (issue 18, item 7): the sidecar's
configuration (config_dump bytes per key), Envoy's memory and the control plane's memory.

A real control plane (in this process: its RSS is measured here) and a real Envoy sidecar.
N quarantines are put into the verdict store the way the monitor puts them (``ClientRef.of``
digests each key), the sidecar is waited for until its configuration holds the last one,
and a quarantined key is checked to get 403 (another key does not). The monitor's own
per-client state is bounded separately (``ExtractionMonitor.max_clients``) and not part of
this figure.

    .venv/bin/python bench/verdict_scale.py [--keys 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.extraction.verdicts import ClientRef, Enforcement, digest
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.sidecar.bootstrap import build_bootstrap

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection: {detectors: [prada, nearDuplicate]}  # the reference detectors need reference data
  actions:
    onSuspicion: {throttle: {requests: 60, per: minute}}
    onDetection: {quarantine: {duration: 24h}}
"""


@dataclass
class Figures:
    keys: int
    config_dump_before: int
    config_dump_after: int
    envoy_rss_before: int  # bytes
    envoy_rss_after: int
    plane_rss_before: int
    plane_rss_after: int
    seconds_to_sidecar: float

    @property
    def bytes_per_key(self) -> float:
        return (self.config_dump_after - self.config_dump_before) / self.keys

    @property
    def envoy_growth(self) -> int:
        return self.envoy_rss_after - self.envoy_rss_before

    @property
    def plane_growth(self) -> int:
        return self.plane_rss_after - self.plane_rss_before

    def summary(self) -> str:
        mb = 1024 * 1024
        return (
            f"{self.keys:,} keys quarantined: config_dump {self.config_dump_before:,} → "
            f"{self.config_dump_after:,} bytes ({self.bytes_per_key:.1f} bytes/key); "
            f"Envoy RSS +{self.envoy_growth / mb:.1f} MB; control plane RSS "
            f"+{self.plane_growth / mb:.1f} MB; in the sidecar after "
            f"{self.seconds_to_sidecar:.1f} s"
        )


def rss(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _settle() -> None:
    for _ in range(3):
        gc.collect()
        await asyncio.sleep(0.2)


async def measure(keys: int, workdir: Path) -> Figures:
    policies = workdir / "policies"
    policies.mkdir(parents=True, exist_ok=True)
    (policies / "extraction.yaml").write_text(POLICY)
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(policies),), xds_port=free_port(), admin_port=free_port(),
            debounce_quiet=0.05, debounce_max=0.5, watch=False,
            verdicts_path=str(workdir / "verdicts.jsonl"),
        )
    )
    await plane.start()
    envoy: EnvoyProcess | None = None
    try:
        listen, envoy_admin = free_port(), free_port()
        sidecar = Sidecar(
            node_id="digits-model-0", service="digits-model", namespace="demo",
            identity="spiffe://cluster.local/ns/demo/sa/digits-model",
            app_port=free_port(), inbound_port=listen, inbound_address="127.0.0.1",
        )
        envoy = EnvoyProcess(
            build_bootstrap(sidecar, xds_host="127.0.0.1", xds_port=plane.xds_port,
                            admin_port=envoy_admin),
            admin_port=envoy_admin, log_path=workdir / "envoy.log",
        )
        envoy.start()
        await asyncio.to_thread(envoy.wait_ready, 30)
        assert envoy.pid is not None
        store = plane.extraction.verdicts
        # One verdict first, so the baseline has the filters a verdict brings.
        first = ClientRef.of("demo/digits-model", "attacker-first")
        now = time.time()
        store.put(Enforcement("quarantine", first, now, now + 86400, "coverage"))
        await _until_in_dump(envoy, digest("attacker-first")[:32])
        await asyncio.sleep(1.0)
        await _settle()
        dump_before = len(await asyncio.to_thread(envoy.admin_get, "/config_dump"))
        envoy_before, plane_before = rss(envoy.pid), rss()
        started = time.monotonic()
        for i in range(keys):
            client = ClientRef.of("demo/digits-model", f"attacker-{i:06d}-" + "x" * 40)
            store.put(Enforcement("quarantine", client, now, now + 86400, "coverage"))
        last = digest(f"attacker-{keys - 1:06d}-" + "x" * 40)[:32]
        await _until_in_dump(envoy, last, timeout=300)
        seconds = time.monotonic() - started
        await asyncio.sleep(2.0)  # old listener drained, workers settled
        await _settle()
        dump_after = len(await asyncio.to_thread(envoy.admin_get, "/config_dump"))
        figures = Figures(
            keys, dump_before, dump_after, envoy_before, rss(envoy.pid), plane_before, rss(),
            seconds,
        )
        # Enforced: a quarantined key gets 403, another key does not.
        status = await asyncio.to_thread(_status, listen, f"attacker-{keys // 2:06d}-" + "x" * 40)
        other = await asyncio.to_thread(_status, listen, "innocent")
        assert status == 403 and other != 403, (status, other)
        return figures
    finally:
        if envoy is not None:
            envoy.stop()
        await plane.stop(grace=0)


def _status(port: int, key: str) -> int:
    code, _, _ = http_request(
        "POST", f"http://127.0.0.1:{port}/v1/predict", b"{}",
        {"content-type": "application/json", "x-api-key": key},
    )
    return code


async def _until_in_dump(envoy: EnvoyProcess, marker: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dump = await asyncio.to_thread(envoy.admin_get, "/config_dump?resource=dynamic_listeners")
        if marker in dump:
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{marker} not in the sidecar's configuration within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="modelguard-verdict-scale-") as tmp:
        figures = asyncio.run(measure(args.keys, Path(tmp)))
    print(figures.summary())
    print(json.dumps({**figures.__dict__, "bytes_per_key": figures.bytes_per_key}))


if __name__ == "__main__":
    main()
