"""Budgets (RLQS) while the quota service is gone: real Envoys, a real ``modelguard serve``
SIGKILLed by PID, budgets in a real Redis.

Two sidecars in front of the demo model, one per failure mode, each with a per-day Global
budget. While the last assignment is valid each sidecar keeps enforcing it; once it has
expired (the server's assignment TTL, short here) FailOpen lets requests through and
FailClosed refuses them with the budget's deny response; when the control plane is back,
assignments resume from what Redis kept, and usage reported after recovery is counted.
The quota service up but Redis gone sends new clients to their failure mode at once.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import Popen
from typing import TypeVar

import grpc
import pytest

from controlplane.app.usage_cli import fetch_usage
from controlplane.netutil import free_port, http_request, port_open
from controlplane.policies.rate.translate import BUDGET_EXHAUSTED_OR_UNCOUNTED
from controlplane.ratelimit import QuotaService
from controlplane.ratelimit.admin import fingerprint
from controlplane.ratelimit.service import REPORT_INTERVAL_SECONDS
from tests.conftest import Processes, Redis, demo_sidecar
from tests.resilience.conftest import write_policies

pytestmark = pytest.mark.envoy

T = TypeVar("T")

TTL = 7  # seconds; must outlive the sidecars' 5 s reports (the server refuses less)
OPEN_BUDGET, CLOSED_BUDGET = 5, 100


def budget(name: str, service: str, mode: str, requests: int) -> str:
    return f"""\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {{name: {name}, namespace: demo}}
spec:
  targetRef: {{service: {service}}}
  failureMode: {mode}
  limits:
  - {{name: daily, clientKey: {{header: x-api-key}}, requests: {requests}, per: day, scope: Global}}
"""


class Plane:
    """``modelguard serve`` as a subprocess (so it can be SIGKILLed), budgets in Redis."""

    def __init__(self, processes: Processes, policies: Path, redis: Redis) -> None:
        self.processes, self.policies, self.redis = processes, policies, redis
        self.xds, self.admin = free_port(), free_port()
        self.process = self.start()

    def start(self) -> Popen[bytes]:
        process = self.processes.start(
            [
                str(Path(sys.executable).parent / "modelguard"), "serve", "--insecure",
                "--policies", str(self.policies),
                "--xds-port", str(self.xds), "--admin-port", str(self.admin),
                "--rate-limit-backend", self.redis.url,
                "--quota-assignment-ttl", str(TTL),
                "--verdicts", "",
            ],
            name="modelguard-serve",
        )
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", self.admin):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"modelguard serve did not start:\n{self.processes.log_of(process)}")
            time.sleep(0.1)
        return process

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def used(self, limit: str, client: str) -> int | None:
        """What the quota service has counted for ``client`` (None: not reported yet)."""
        try:
            report = fetch_usage(f"127.0.0.1:{self.admin}", limit_filter=limit, top=100)
        except grpc.RpcError:
            return None
        for usage in report.limits:
            for row in usage.clients:
                if row.client == fingerprint(client):  # usage names clients by fingerprint
                    return int(row.used)
        return None

    def counted(self, limit: str, client: str, used: int) -> Callable[[], bool]:
        return lambda: self.used(limit, client) == used


class Gate:
    """One sidecar's inbound listener: GET /healthz as a client (``x-api-key``)."""

    def __init__(self, processes: Processes, tmp: Path, service: str, app_port: int, xds: int):
        self.envoy, self.port = demo_sidecar(app_port, xds, tmp / f"{service}.log", service=service)
        processes.track(self.envoy)
        self.envoy.start()

    def get(self, key: str) -> tuple[int, bytes]:
        status, _, body = http_request(
            "GET", f"http://127.0.0.1:{self.port}/healthz", None, {"x-api-key": key}
        )
        return status, body

    def status(self, key: str) -> int:
        return self.get(key)[0]


def until(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except OSError:
            last = None
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def test_budgets_keep_their_assignment_then_follow_the_failure_mode_and_recover(
    tmp_path: Path, processes: Processes, demo_model: tuple[str, int], redis_server: Redis
) -> None:
    policies = write_policies(
        tmp_path / "policies",
        budget("open", "open-model", "FailOpen", OPEN_BUDGET),
        budget("closed", "closed-model", "FailClosed", CLOSED_BUDGET),
    )
    plane = Plane(processes, policies, redis_server)
    opened = Gate(processes, tmp_path, "open-model", demo_model[1], plane.xds)
    closed = Gate(processes, tmp_path, "closed-model", demo_model[1], plane.xds)
    opened.envoy.wait_ready(30)
    closed.envoy.wait_ready(30)
    open_limit, closed_limit = "demo.open.daily", "demo.closed.daily"

    # --- the quota service up ------------------------------------------------------------
    until(lambda: opened.status("warm-up") and closed.status("warm-up"), 20, "configured")
    # A new client's first request passes in both modes: a FailClosed budget must not
    # refuse it while its first assignment is on its way.
    assert closed.status("active") == 200 and opened.status("steady") == 200
    assert opened.status("spender") == 200
    # Each first request is reported at once: steady and spender have 4 left, active 99.
    for limit, client in (
        (open_limit, "steady"), (open_limit, "spender"), (closed_limit, "active")
    ):
        until(plane.counted(limit, client, 1), 10, f"{client}'s usage reported")
    # Until its assignment lands one more request may pass (a new client's overshoot).
    spent = [opened.status("spender") for _ in range(OPEN_BUDGET + 1)]
    passed = spent.index(429) if 429 in spent else len(spent)
    assert passed in (OPEN_BUDGET - 1, OPEN_BUDGET) and set(spent[passed:]) == {429}, spent

    # --- the quota service gone: SIGKILL --------------------------------------------------
    plane.kill()
    killed = time.monotonic()
    # (a) The last assignments are still valid (renewed at most 5 s ago, TTL 7 s).
    assert opened.get("spender") == (429, b"query budget exhausted\n")
    assert closed.status("active") == 200
    flips: dict[str, float] = {}
    seen: dict[str, list[int]] = {"open": [], "closed": []}
    refusal = b""
    while len(flips) < 2 and time.monotonic() - killed < TTL + 4:
        now = time.monotonic() - killed
        status = opened.status("spender")
        seen["open"].append(status)
        if status == 200:
            flips.setdefault("open", now)
        status, body = closed.get("active")
        seen["closed"].append(status)
        if status == 429:
            flips.setdefault("closed", now)
            refusal = body
        time.sleep(0.25)
    # (b) Once expired, each budget follows its failure mode, and keeps following it.
    assert set(flips) == {"open", "closed"}, (flips, seen)
    for mode, before, after in (("open", 429, 200), ("closed", 200, 429)):
        statuses = seen[mode]
        flip = statuses.index(after)
        assert set(statuses[:flip]) == {before} and set(statuses[flip:]) == {after}, seen
        # Not before the last renewal (<= 5 s before the kill) has run out, not after TTL.
        assert TTL - REPORT_INTERVAL_SECONDS - 0.5 <= flips[mode] <= TTL + 2, flips
    assert refusal == BUDGET_EXHAUSTED_OR_UNCOUNTED
    assert opened.status("spender") == 200
    assert closed.get("active") == (429, BUDGET_EXHAUSTED_OR_UNCOUNTED)
    # Clients first seen while the service is gone have no assignment to expire: they pass
    # under both modes (Envoy's no-assignment behaviour; the README says so).
    assert opened.status("newcomer") == 200 and closed.status("newcomer") == 200

    # --- the quota service back: same ports, same Redis -----------------------------------
    plane.process = plane.start()
    # (c) Assignments resume from what Redis kept: spender is over again, active allowed.
    until(lambda: opened.status("spender") == 429, 20, "spender refused again")
    until(lambda: closed.status("active") == 200, 20, "active allowed again")
    # steady sent nothing while the service was gone: it has exactly 4 of its 5 left.
    assert [opened.status("steady") for _ in range(4)] == [200] * 4
    until(plane.counted(open_limit, "steady", OPEN_BUDGET), 15, "steady's usage counted")
    until(lambda: opened.status("steady") == 429, 5, "steady refused once spent")

    # --- the quota service up, Redis gone -------------------------------------------------
    # The service cannot count a new client and sends it an assignment that expires on
    # arrival: its failure mode applies at once (FailClosed refuses after its first request).
    redis_server.stop()
    assert closed.status("redis-gone") == 200
    until(
        lambda: closed.get("redis-gone") == (429, BUDGET_EXHAUSTED_OR_UNCOUNTED),
        5,
        "a new client refused by the fail-closed budget",
    )
    assert [opened.status("redis-gone") for _ in range(OPEN_BUDGET + 2)] == [200] * (
        OPEN_BUDGET + 2
    )
    assert opened.envoy.server_state() == "LIVE" and closed.envoy.server_state() == "LIVE"


def test_the_assignment_ttl_must_outlive_the_sidecars_reports() -> None:
    from controlplane.ratelimit import Budgets, MemoryBackend

    budgets = Budgets(MemoryBackend())
    with pytest.raises(ValueError, match="5 s usage reports"):
        QuotaService(budgets, assignment_ttl=REPORT_INTERVAL_SECONDS)
    assert QuotaService(budgets, assignment_ttl=TTL).assignment_ttl == TTL
