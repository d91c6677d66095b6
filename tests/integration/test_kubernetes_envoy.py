"""Cluster mode end to end: a policy object in the (kmock) API server → control plane →
real Envoy sidecar → demo model; the policy's status says Programmed once Envoy ACKed it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.netutil import free_port, http_request
from controlplane.sources.kubernetes import KubernetesSource, ProgramTracker, StatusWriter
from tests.conftest import demo_sidecar
from tests.integration.conftest import (
    GROUP,
    VERSION,
    call,
    conditions,
    create_policy,
    read_policy,
)

pytestmark = pytest.mark.envoy

SPEC = {
    "targetRef": {"service": "digits-model"},
    "rules": [
        {"name": "health", "action": "Allow", "to": {"methods": ["GET"], "paths": ["/healthz"]}}
    ],
}
INSTANCE = {"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}


@pytest.fixture
async def cluster_plane(
    cluster: kmock.KubernetesEmulator,
    api_client: client.ApiClient,
    tmp_path: Path,
    demo_model: tuple[str, int],
) -> AsyncIterator[tuple[ControlPlane, int]]:
    xds_port, admin_port = free_port(), free_port()
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(),
            xds_port=xds_port,
            admin_port=admin_port,
            watch=False,
            debounce_quiet=0.05,
            debounce_max=0.5,
        )
    )
    tracker = ProgramTracker(plane.store, plane.pipeline, plane.sync_status, plane.cache)
    source = KubernetesSource(api_client, plane.store, plane.inventory, retry_interval=0.1)
    source.start()
    await plane.start()
    writer = StatusWriter(api_client, source, lambda: True, tracker.nodes, plane.inventory.snapshot)
    stop = asyncio.Event()
    task = asyncio.create_task(writer.run(stop, interval=0.05))
    envoy, listen_port = demo_sidecar(
        demo_model[1], xds_port, tmp_path / "envoy.log", node_id="digits-model-0.demo"
    )
    envoy.start()
    try:
        await asyncio.to_thread(envoy.wait_ready, 20)
        yield plane, listen_port
    finally:
        stop.set()
        await task
        envoy.stop()
        await asyncio.to_thread(source.stop)
        await plane.stop(grace=0)


async def _request(port: int, method: str, path: str) -> int:
    body = json.dumps(INSTANCE).encode() if method == "POST" else None
    status, _, _ = await asyncio.to_thread(
        http_request,
        method,
        f"http://127.0.0.1:{port}{path}",
        body,
        {"content-type": "application/json"},
    )
    return int(status)


async def _status(api_client: client.ApiClient) -> dict[str, Any]:
    return await read_policy(api_client, "AccessPolicy", "digits-model")


async def test_policy_object_is_enforced_and_reported_programmed(
    cluster_plane: tuple[ControlPlane, int], api_client: client.ApiClient
) -> None:
    _, port = cluster_plane
    api = client.CustomObjectsApi(api_client)
    await create_policy(api_client, "AccessPolicy", "digits-model", SPEC)

    async def wait_programmed(generation: int) -> None:
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            obj = await _status(api_client)
            c = conditions(obj).get("Programmed", {})
            if c.get("status") == "True" and c.get("observedGeneration") == generation:
                return
            assert asyncio.get_running_loop().time() < deadline, obj.get("status")
            await asyncio.sleep(0.05)

    await wait_programmed(1)
    obj = await _status(api_client)
    assert conditions(obj)["Programmed"]["message"] == "1 of 1 targeted sidecars ACKed"
    assert await _request(port, "GET", "/healthz") == 200
    assert await _request(port, "POST", "/v1/predict") == 403

    allow_predict = {
        "name": "predict",
        "action": "Allow",
        "to": {"methods": ["POST"], "paths": ["/v1/predict"]},
    }
    await call(
        api.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        "demo",
        "accesspolicies",
        "digits-model",
        {"metadata": {"generation": 2}, "spec": {"rules": [*SPEC["rules"], allow_predict]}},
        _content_type="application/merge-patch+json",
    )
    await wait_programmed(2)
    assert await _request(port, "POST", "/v1/predict") == 200
