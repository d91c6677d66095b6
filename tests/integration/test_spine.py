"""The spine end to end: policy files → control plane → real Envoy over ADS → demo model."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from polling import eventually

from controlplane.app.status_cli import fetch_status
from controlplane.netutil import http_request
from tests.integration.conftest import Deployment

pytestmark = pytest.mark.envoy

ACCESS = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  defaultAction: Deny
  rules:
  - action: Allow
    to: {{methods: [{methods}], paths: [/v1/predict]}}
  - action: Allow
    to: {{methods: [GET], paths: [/healthz]}}
"""

INSTANCE = {"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}


class System(Deployment):
    async def predict(self) -> int:
        status, _, _ = await asyncio.to_thread(
            http_request,
            "POST",
            f"http://127.0.0.1:{self.listen_port}/v1/predict",
            json.dumps(INSTANCE).encode(),
            {"content-type": "application/json"},
        )
        return status


@pytest.fixture
async def system(
    request: pytest.FixtureRequest, tmp_path: Path, demo_model: tuple[str, int]
) -> AsyncIterator[System]:
    delta = getattr(request, "param", "SotW") == "Delta"
    async with await System.start(
        tmp_path,
        demo_model[1],
        {"access.yaml": ACCESS.format(methods="POST")},
        delta=delta,
        ready_timeout=20,
    ) as system:
        yield system


async def status(system: System):  # type: ignore[no-untyped-def]
    # The admin server runs on this event loop: a blocking call must leave it free.
    return await asyncio.to_thread(fetch_status, f"127.0.0.1:{system.admin_port}")


async def _sidecar_synced(system: System) -> bool:
    report = await status(system)
    return any(s.node_id == "digits-model-0" and s.state == "SYNCED" for s in report.sidecars)


async def test_config_arrives_over_ads_and_traffic_reaches_the_model(system: System) -> None:
    assert await system.predict() == 200
    status, _, body = await asyncio.to_thread(
        http_request,
        "POST",
        f"http://127.0.0.1:{system.listen_port}/v1/predict",
        json.dumps(INSTANCE).encode(),
        {"content-type": "application/json"},
    )
    answer = json.loads(body)
    assert len(answer["predictions"]) == 1
    assert abs(sum(answer["predictions"][0]["probabilities"]) - 1.0) < 1e-6
    # Default deny: a path no rule allows is refused by the sidecar, not the model.
    status, _, body = await asyncio.to_thread(
        http_request, "GET", f"http://127.0.0.1:{system.listen_port}/v1/model"
    )
    assert status == 403, body
    await eventually(lambda: _sidecar_synced(system))
    dump = json.dumps(system.envoy.config_dump())
    assert "inbound|digits-model.demo" in dump
    # What `modelguard status --json` shows users.
    result = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "modelguard"), "status", "--json",
         "--admin", f"127.0.0.1:{system.admin_port}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    (sidecar,) = shown["sidecars"]
    assert sidecar["nodeId"] == "digits-model-0" and sidecar["state"] == "SYNCED"  # camelCase
    assert {r["type"]: r["state"] for r in sidecar["resources"]} == {
        "CDS": "SYNCED", "EDS": "SYNCED", "LDS": "SYNCED", "RDS": "SYNCED"
    }
    (policy,) = shown["policies"]
    assert (policy["kind"], policy["state"], policy["sidecars"]) == (
        "AccessPolicy", "Accepted", ["digits-model-0"]
    )


async def test_policy_edit_is_applied_live(system: System) -> None:
    assert await system.predict() == 200
    (system.policies / "access.yaml").write_text(ACCESS.format(methods="PUT"))
    await eventually(lambda: _predict_is(system, 403))
    (system.policies / "access.yaml").write_text(ACCESS.format(methods="POST"))
    await eventually(lambda: _predict_is(system, 200))


async def _predict_is(system: System, code: int) -> bool:
    return await system.predict() == code


async def test_invalid_edit_is_rejected_and_traffic_keeps_flowing(system: System) -> None:
    await eventually(lambda: _sidecar_synced(system))
    version_before = {s.node_id: s.snapshot_version for s in (await status(system)).sidecars}
    (system.policies / "access.yaml").write_text(
        ACCESS.format(methods="POST").replace("defaultAction: Deny", "defaultAction: Maybe")
    )

    async def rejected() -> bool:
        report = await status(system)
        return any(
            p.name == "digits-model"
            and p.state == "Rejected"
            and p.serving
            and any("spec.defaultAction" in e for e in p.errors)
            for p in report.policies
        )

    await eventually(rejected)
    for _ in range(5):
        assert await system.predict() == 200
    report = await status(system)
    assert {s.node_id: s.snapshot_version for s in report.sidecars} == version_before
    # A YAML syntax error is rejected the same way.
    (system.policies / "access.yaml").write_text("kind: [AccessPolicy\n")
    async def syntax_error_reported() -> bool:
        # On the file's policy, no longer shown Accepted: Rejected, its last good serving.
        return any(
            p.name == "digits-model" and p.state == "Rejected" and p.serving
            and any("invalid YAML" in e and "line 2" in e for e in p.errors)
            for p in (await status(system)).policies
        )  # fmt: skip

    await eventually(syntax_error_reported)
    assert await system.predict() == 200
    # The next good edit is applied.
    (system.policies / "access.yaml").write_text(ACCESS.format(methods="PUT"))
    await eventually(lambda: _predict_is(system, 403))


async def test_control_plane_restart_envoy_keeps_serving_then_resyncs(system: System) -> None:
    assert await system.predict() == 200
    await system.plane.stop(grace=0)
    # The sidecar keeps enforcing its last configuration with no control plane at all.
    for _ in range(10):
        assert await system.predict() == 200
    status, _, _ = await asyncio.to_thread(
        http_request, "GET", f"http://127.0.0.1:{system.listen_port}/v1/model"
    )
    assert status == 403
    (system.policies / "access.yaml").write_text(ACCESS.format(methods="PUT"))
    await system.start_plane()
    # It reconnects, gets the policy edited while the control plane was down, and ACKs.
    await eventually(lambda: _predict_is(system, 403), timeout=30)
    await eventually(lambda: _sidecar_synced(system))


@pytest.mark.parametrize("system", ["Delta"], indirect=True)
async def test_delta_sidecar_is_configured_and_follows_edits(system: System) -> None:
    assert await system.predict() == 200
    report = await status(system)
    assert [s.stream for s in report.sidecars] == ["Delta"]
    await eventually(lambda: _sidecar_synced(system))
    (system.policies / "access.yaml").write_text(ACCESS.format(methods="PUT"))
    await eventually(lambda: _predict_is(system, 403))
    await eventually(lambda: _sidecar_synced(system))
