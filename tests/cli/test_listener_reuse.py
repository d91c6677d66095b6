"""Two sidecars given one inbound port: the second one's listener is refused (its LDS is
NACKed and `status` shows it), not silently shared through SO_REUSEPORT (issue 19)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from controlplane.netutil import free_port
from tests.cli.embedded import modelguard, start_serve
from tests.conftest import Processes

pytestmark = pytest.mark.envoy


@pytest.mark.timeout(180)
def test_a_second_sidecar_on_a_taken_listener_port_is_nacked(
    processes: Processes, tmp_path: Path, envoy_bin: Path
) -> None:
    xds, admin, inbound = free_port(), free_port(), free_port()
    start_serve(
        processes, "--insecure", "--policies", "policies/", "--verdicts", "",
        "--xds-port", str(xds), "--admin-port", str(admin),
    )  # fmt: skip
    for name in ("first", "second"):
        bootstrap = tmp_path / f"{name}.yaml"
        made = modelguard(
            "bootstrap", "--service", "digits-model", "--namespace", "demo",
            "--node-id", f"digits-model-{name}", "--app-port", str(free_port()),
            "--inbound-port", str(inbound), "--admin-port", str(free_port()),
            "--xds", f"127.0.0.1:{xds}", "-o", str(bootstrap),
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        processes.start(
            [str(envoy_bin), "-c", str(bootstrap), "--use-dynamic-base-id"], name=name
        )
        time.sleep(3)  # the first one binds its listener before the second one tries

    def lds(report: dict, node: str) -> dict:  # type: ignore[type-arg]
        (sidecar,) = [s for s in report.get("sidecars", []) if s["nodeId"] == node]
        return next(r for r in sidecar["resources"] if r["type"] == "LDS")

    deadline = time.monotonic() + 60
    while True:
        result = modelguard("status", "--admin", f"127.0.0.1:{admin}", "-o", "json")
        report = json.loads(result.stdout)
        try:
            first, second = lds(report, "digits-model-first"), lds(report, "digits-model-second")
        except (ValueError, StopIteration):
            first = second = {}
        if second.get("state") == "NACKED":
            break
        assert time.monotonic() < deadline, result.stdout
        time.sleep(0.5)
    assert first["state"] == "SYNCED"
    assert "Address already in use" in second["lastNackError"], second
    assert result.returncode == 1  # a NACK makes status exit 1
