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

import grpc
import pytest
from google.protobuf import timestamp_pb2
from polling import eventually

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.app.usage_cli import fetch_usage, render
from controlplane.gen.modelguard.admin.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.ratelimit.admin import fingerprint
from controlplane.ratelimit.rules import window_start
from tests.conftest import Redis, demo_sidecar

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
    policies: Path = Path()
    xds_port: int = 0
    admin_port: int = 0

    async def get(self, key: str | None = None) -> tuple[int, dict[str, str]]:
        headers = {"x-api-key": key} if key is not None else {}
        status, got, _ = await asyncio.to_thread(
            http_request, "GET", f"http://127.0.0.1:{self.port}/healthz", None, headers
        )
        return status, got

    async def statuses(self, key: str, n: int) -> list[int]:
        return [(await self.get(key))[0] for _ in range(n)]


Start = Callable[..., Awaitable[RateSystem]]


async def start_plane(
    policies: Path, xds_port: int, admin_port: int, backend: str = "memory"
) -> ControlPlane:
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
    return plane


def start_sidecar(policies: Path, model_port: int, xds_port: int, name: str) -> RateSystem:
    envoy, listen_port = demo_sidecar(model_port, xds_port, policies / f"{name}.log", node_id=name)
    envoy.start()
    envoy.wait_ready(20)
    return RateSystem(None, envoy, listen_port)  # type: ignore[arg-type]


@asynccontextmanager
async def rate_system(
    tmp_path: Path, model_port: int, policy_text: str, backend: str = "memory"
) -> AsyncIterator[RateSystem]:
    policies = tmp_path / f"policies-{time.monotonic_ns()}"
    policies.mkdir()
    (policies / "rate.yaml").write_text(policy_text)
    xds_port, admin_port = free_port(), free_port()
    plane = await start_plane(policies, xds_port, admin_port, backend)
    system: RateSystem | None = None
    try:
        system = await asyncio.to_thread(
            start_sidecar, policies, model_port, xds_port, "digits-model-0"
        )
        system.plane = plane
        system.policies, system.xds_port, system.admin_port = policies, xds_port, admin_port
        yield system
    finally:
        if system is not None:
            system.envoy.stop()
        await (system.plane if system is not None else plane).stop(grace=0)




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


async def test_global_per_minute_limit_asks_the_rate_limit_service(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    text = policy(
        "{name: minute, clientKey: {header: x-api-key}, requests: 3, per: minute, scope: Global}"
    )
    async with rate_system(tmp_path, demo_model[1], text) as system:
        seen = []
        for _ in range(3):
            status, headers = await system.get("gina")
            assert status == 200
            seen.append((headers["ratelimit-limit"], headers["ratelimit-remaining"]))
        assert seen == [("3", "2"), ("3", "1"), ("3", "0")]
        status, headers = await system.get("gina")
        assert status == 429
        assert headers["ratelimit-remaining"] == "0"
        assert 0 < int(headers["ratelimit-reset"]) <= 60
        assert (await system.get("hank"))[0] == 200
        usage = await system.plane.rate_limits.budgets.usage()
        assert [(u.rule.limit, [(c.client, c.used, c.over) for c in u.clients]) for u in usage] == [
            ("demo.digits-model.minute", [("gina", 4, True), ("hank", 1, False)])
        ]


async def test_daily_budget_is_enforced_by_the_sidecar_from_quota_assignments(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    text = policy(
        "{name: daily, clientKey: {header: x-api-key}, requests: 5, per: day, scope: Global}"
    )
    async with rate_system(tmp_path, demo_model[1], text) as system:
        # The first request of a new client passes before its assignment arrives; after
        # that the sidecar enforces the assigned share without asking anyone.
        assert (await system.get("ivan"))[0] == 200

        async def assigned() -> bool:
            return any(u.clients for u in await system.plane.rate_limits.budgets.usage())

        await eventually(assigned)
        codes = await system.statuses("ivan", 8)
        # The service has counted ivan; its assignment may still be on its way to the
        # sidecar, and until it lands one more request passes (the documented overshoot of
        # a brand-new client). After the first refusal, every request is refused.
        passed = codes.index(429) if 429 in codes else len(codes)
        assert passed in (4, 5) and set(codes[passed:]) == {429}, codes
        status, headers = await system.get("ivan")
        assert status == 429 and headers["ratelimit-limit"] == "5"
        assert (await system.get("judy"))[0] == 200


# --- Redis ---------------------------------------------------------------------------------


MINUTE_LIMIT = (
    "{name: minute, clientKey: {header: x-api-key}, requests: 4, per: minute, scope: Global}"
)


async def window_with_room(window: int, seconds: float) -> None:
    """Return in a window of the limit (fixed, aligned to the epoch: the service's windows,
    on this process's clock) with at least ``seconds`` left, waiting for the next one if
    need be. Requests counted against a limit must not straddle two windows: a new window
    counts every client from zero, and a 429 expected in the old one never comes."""
    now = time.time()
    left = window_start(now, window) + window - now
    if left < seconds:
        await asyncio.sleep(left + 0.05)


async def test_two_rate_limit_service_instances_share_one_budget_in_redis(
    tmp_path: Path, demo_model: tuple[str, int], redis_server: Redis
) -> None:
    async with rate_system(tmp_path, demo_model[1], policy(MINUTE_LIMIT), redis_server.url) as a:
        # A second control plane (its own services) and its own sidecar, on the same Redis.
        xds_port = free_port()
        plane_b = await start_plane(a.policies, xds_port, free_port(), redis_server.url)
        try:
            b = await asyncio.to_thread(
                start_sidecar, a.policies, demo_model[1], xds_port, "digits-model-1"
            )
            try:
                # From the first request to the check after the restart (at most 15 s of
                # it waiting for the new service), one window of the minute.
                await window_with_room(60, seconds=20)
                codes = []
                for system in (a, b, a, b, a, b):
                    codes.append((await system.get("kate"))[0])
                assert codes == [200, 200, 200, 200, 429, 429]
                _, headers = await b.get("kate")
                assert headers["ratelimit-remaining"] == "0"
            finally:
                b.envoy.stop()
        finally:
            await plane_b.stop(grace=0)
        # The budget survives a restart of the rate limit service.
        await a.plane.stop(grace=0)
        a.plane = await start_plane(a.policies, a.xds_port, a.admin_port, redis_server.url)

        async def counted() -> tuple[int, str] | None:
            # Until the new service answers, the failure mode (FailOpen) lets requests
            # through uncounted, without RateLimit-* headers.
            status, headers = await a.get("kate")
            remaining = headers.get("ratelimit-remaining")
            return None if remaining is None else (status, remaining)

        # Its first answer counted, not one after a few more: a budget started anew would
        # refuse as well once they had spent it.
        assert await eventually(counted, timeout=15) == (429, "0")
        assert (await a.get("liam"))[0] == 200


@pytest.mark.parametrize(("failure_mode", "while_down"), [("FailOpen", 200), ("FailClosed", 500)])
async def test_redis_down_applies_the_failure_mode_and_recovers(
    tmp_path: Path,
    demo_model: tuple[str, int],
    redis_server: Redis,
    failure_mode: str,
    while_down: int,
) -> None:
    text = policy(MINUTE_LIMIT, failure_mode=failure_mode)
    async with rate_system(tmp_path, demo_model[1], text, redis_server.url) as system:
        status, headers = await system.get("mona")
        assert status == 200 and headers["ratelimit-remaining"] == "3"
        redis_server.stop()
        for _ in range(3):
            status, headers = await system.get("mona")
            assert status == while_down
            assert "ratelimit-remaining" not in headers
        redis_server.start()  # empty: no persistence in this test

        async def counted_again() -> bool:
            status, headers = await system.get("mona")
            return status == 200 and "ratelimit-remaining" in headers

        await eventually(counted_again, timeout=10)
        # The next 5 go in the window that counted that one, or all in a fresh one
        # (measured: 2 counted before the minute turned and 3 after, all 200, no 429).
        await window_with_room(60, seconds=5)
        codes = await system.statuses("mona", 5)
        assert 429 in codes and codes[: codes.index(429)] == [200] * codes.index(429)


async def test_usage_command_and_a_runtime_throttle_pushed_to_the_sidecar(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    text = policy(
        "{name: daily, clientKey: {header: x-api-key}, requests: 1000, per: day, scope: Global}"
    )
    async with rate_system(tmp_path, demo_model[1], text) as system:
        address = f"127.0.0.1:{system.admin_port}"
        assert (await system.get("zed"))[0] == 200

        async def reported() -> bool:
            report = await asyncio.to_thread(fetch_usage, address)
            # Named by fingerprint: a client key is often an API key.
            return any(
                c.client == fingerprint("zed") for limit in report.limits for c in limit.clients
            )

        await eventually(reported)
        assert await system.statuses("zed", 5) == [200] * 5
        # The extraction defense throttles one client: no config push, the quota service
        # sends the sidecar a new assignment for that client's bucket.
        version = system.envoy.config_dump()

        def throttle() -> None:
            until = timestamp_pb2.Timestamp()
            until.FromSeconds(int(time.time()) + 600)
            with grpc.insecure_channel(address) as channel:
                ratelimit_pb2_grpc.RateLimitsStub(channel).Throttle(
                    ratelimit_pb2.ThrottleRequest(
                        policy="demo/digits-model",
                        client="zed",
                        requests=2,
                        per_seconds=60,
                        until=until,
                    ),
                    timeout=5,
                )

        # The admin server runs on this event loop: blocking calls go to a thread.
        await asyncio.to_thread(throttle)

        async def throttled() -> bool:
            return (await system.get("zed"))[0] == 429

        await eventually(throttled, timeout=5)
        assert (await system.get("amy"))[0] == 200
        assert system.envoy.config_dump() == version
        text_out = render(await asyncio.to_thread(fetch_usage, address))
        assert "demo.digits-model.daily  1000 per 86400s" in text_out
        assert any(
            line.split()[0] == fingerprint("zed") for line in text_out.splitlines()[2:] if line
        )
        assert "zed" not in text_out
