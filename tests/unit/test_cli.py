"""The `modelguard` command: validate's output and exit code, status rendering."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.app.cli import main
from controlplane.app.status_cli import render
from controlplane.gen.modelguard.admin.v1 import admin_pb2
from controlplane.pipeline import Debouncer

ROOT = Path(__file__).resolve().parents[2]

BAD = """\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: budget, namespace: ml}
spec:
  targetRef: {service: fraud-model}
  limits:
  - {name: burst, clientKey: {header: x-api-key}, requests: 20, per: second}
  - {name: daily, clientKey: {header: x-api-key}, requests: 10000, per: fortnight}
"""


def test_validate_accepts_the_example_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "policies")]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_prints_each_violation_with_its_path_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "rate.yaml"
    bad.write_text(BAD)
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{bad}[0] RatePolicy ml/budget: spec.limits[1].per: "
        "must be one of second, minute, hour, day, month"
    ]


def test_validate_is_a_console_script(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("kind: Deployment\napiVersion: apps/v1\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "modelguard"), "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "apiVersion: must be modelguard.io/v1alpha1" in result.stdout


def _report() -> admin_pb2.StatusReport:
    report = admin_pb2.StatusReport()
    sidecar = report.sidecars.add(
        node_id="digits-model-0",
        service="digits-model",
        namespace="demo",
        stream="SotW",
        snapshot_version="4c1f0e9a2b7d99",
        state="NACKED",
    )
    for kind in ("CDS", "EDS", "LDS"):
        sidecar.resources.add(type=kind, state="SYNCED", acked_version="v1")
    sidecar.resources.add(
        type="RDS",
        state="NACKED",
        acked_version="v1",
        last_nack_version="v2",
        last_nack_error="route: unknown cluster",
    )
    report.policies.add(
        kind="AccessPolicy",
        namespace="demo",
        name="digits-model",
        source="policies/a.yaml",
        generation=3,
        state="Rejected",
        serving=True,
        sidecars=["digits-model-0"],
        errors=["policies/a.yaml[0] AccessPolicy demo/digits-model: spec.x: unknown field"],
    )
    return report


def test_status_shows_states_nacks_and_policy_errors() -> None:
    text = render(_report())
    lines = text.splitlines()
    assert lines[0].split() == [
        "SIDECAR",
        "SERVICE",
        "STREAM",
        "CDS",
        "EDS",
        "LDS",
        "RDS",
        "VERSION",
    ]
    assert lines[1].split() == [
        "digits-model-0",
        "digits-model.demo",
        "SotW",
        "SYNCED",
        "SYNCED",
        "SYNCED",
        "NACKED",
        "4c1f0e9a2b7d",
    ]
    assert "digits-model-0 RDS rejected version v2: route: unknown cluster (serving v1)" in text
    assert "Rejected (last good serving)" in text
    assert "spec.x: unknown field" in text


def test_status_without_a_control_plane_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from controlplane.netutil import free_port

    assert main(["status", "--admin", f"127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the control plane" in capsys.readouterr().err


async def test_debouncer_coalesces_a_burst_and_bounds_the_delay() -> None:
    calls: list[float] = []
    debouncer = Debouncer(
        lambda: calls.append(time.monotonic()),
        asyncio.get_running_loop(),
        quiet=0.05,
        max_delay=0.3,
    )
    start = time.monotonic()
    for _ in range(5):
        debouncer.trigger()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert len(calls) == 1  # one rebuild for a burst of five events
    # A steady stream of events never quiet for 50 ms still fires by max_delay.
    calls.clear()
    start = time.monotonic()
    while time.monotonic() - start < 0.5:
        debouncer.trigger()
        await asyncio.sleep(0.02)
    assert calls, "max_delay must bound the wait under a continuous stream of events"
    assert calls[0] - start < 0.45
