"""RatePolicy end to end: policy files → control plane → a real Envoy → the demo model.

Local token buckets, the per-request rate limit service and RLQS budgets, each observed
through the sidecar: status codes, RateLimit-* headers, Envoy's own counters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.bootstrap import build_bootstrap
from controlplane.inventory import Sidecar
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.server import ControlPlane, ControlPlaneConfig

pytestmark = pytest.mark.envoy

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  shadow: {shadow}
  failureMode: {failure_mode}
  limits:
{limits}
"""


def policy(*limits: str, shadow: bool = False, failure_mode: str = "FailOpen") -> str:
    return POLICY.format(
        shadow=str(shadow).lower(),
        failure_mode=failure_mode,
        limits="\n".join(f"  - {limit}" for limit in limits),
    )


@dataclass
class RateSystem:
    plane: ControlPlane
    envoy: EnvoyProcess
    port: int

    async def get(self, key: str | None = None) -> tuple[int, dict[str, str]]:
        headers = {"x-api-key": key} if key is not None else {}
        status, got, _ = await asyncio.to_thread(
            http_request, "GET", f"http://127.0.0.1:{self.port}/healthz", None, headers
        )
        return status, got

    async def statuses(self, key: str, n: int) -> list[int]:
        return [(await self.get(key))[0] for _ in range(n)]


Start = Callable[..., Awaitable[RateSystem]]


@asynccontextmanager
async def rate_system(
    tmp_path: Path, model_port: int, policy_text: str, backend: str = "memory"
) -> AsyncIterator[RateSystem]:
    policies = tmp_path / f"policies-{time.monotonic_ns()}"
    policies.mkdir()
    (policies / "rate.yaml").write_text(policy_text)
    xds_port, admin_port, listen_port, envoy_admin = (free_port() for _ in range(4))
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(policies),),
            xds_port=xds_port,
            admin_port=admin_port,
            debounce_quiet=0.02,
            debounce_max=0.2,
            watch=False,
            rate_limit_backend=backend,
        )
    )
    await plane.start()
    sidecar = Sidecar(
        node_id="digits-model-0",
        service="digits-model",
        namespace="demo",
        identity="spiffe://cluster.local/ns/demo/sa/digits-model",
        app_port=model_port,
        inbound_port=listen_port,
        inbound_address="127.0.0.1",
    )
    envoy = EnvoyProcess(
        build_bootstrap(sidecar, xds_host="127.0.0.1", xds_port=xds_port, admin_port=envoy_admin),
        admin_port=envoy_admin,
        log_path=policies / "envoy.log",
    )
    envoy.start()
    try:
        await asyncio.to_thread(envoy.wait_ready, 20)
        yield RateSystem(plane, envoy, listen_port)
    finally:
        envoy.stop()
        await plane.stop(grace=0)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s")


async def test_local_limit_refuses_the_next_request_with_headers_per_client(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    text = policy("{name: per-key, clientKey: {header: x-api-key}, requests: 3, per: minute}")
    async with rate_system(tmp_path, demo_model[1], text) as system:
        remaining = []
        for _ in range(3):
            status, headers = await system.get("alice")
            assert status == 200
            assert headers["ratelimit-limit"] == "3"
            remaining.append(headers["ratelimit-remaining"])
            assert "x-ratelimit-limit" not in headers
        assert remaining == ["2", "1", "0"]
        status, headers = await system.get("alice")
        assert status == 429
        assert headers["ratelimit-limit"] == "3"
        assert headers["ratelimit-remaining"] == "0"
        assert 0 < int(headers["ratelimit-reset"]) <= 60
        # Another client has its own bucket; so do callers without a key (as one client).
        assert await system.statuses("bob", 3) == [200, 200, 200]
        assert await system.statuses("bob", 1) == [429]
        assert (await system.get(None))[0] == 200


async def test_local_window_resets(tmp_path: Path, demo_model: tuple[str, int]) -> None:
    text = policy("{name: per-key, clientKey: {header: x-api-key}, requests: 2, per: second}")
    async with rate_system(tmp_path, demo_model[1], text) as system:
        # A refill may fall between two requests: go until the bucket is empty.
        codes = []
        while 429 not in codes and len(codes) < 20:
            codes.append((await system.get("carol"))[0])
        assert codes[-1] == 429 and codes.count(200) <= 4, codes
        refused_at = time.monotonic()

        async def allowed() -> bool:
            return (await system.get("carol"))[0] == 200

        await eventually(allowed, timeout=3)
        assert time.monotonic() - refused_at <= 1.5


async def test_several_limits_on_one_request_the_tightest_decides(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    text = policy(
        "{name: per-key, clientKey: {header: x-api-key}, requests: 5, per: minute}",
        "{name: per-ip, clientKey: {sourceIP: true}, requests: 3, per: minute}",
    )
    async with rate_system(tmp_path, demo_model[1], text) as system:
        assert await system.statuses("dave", 2) == [200, 200]
        # Same source IP, another key: the per-IP limit (3) binds before the per-key one (5).
        assert await system.statuses("erin", 2) == [200, 429]
        assert await system.statuses("dave", 1) == [429]


async def test_shadow_mode_lets_everything_through_while_counting(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    text = policy(
        "{name: per-key, clientKey: {header: x-api-key}, requests: 2, per: minute}", shadow=True
    )
    async with rate_system(tmp_path, demo_model[1], text) as system:
        assert await system.statuses("frank", 6) == [200] * 6
        stats = await asyncio.to_thread(system.envoy.stats, "local_rate_limit")
        limited = {k: v for k, v in stats.items() if k.endswith(".rate_limited")}
        assert sum(limited.values()) == 4, stats
        assert not any(v for k, v in stats.items() if k.endswith(".enforced")), stats
