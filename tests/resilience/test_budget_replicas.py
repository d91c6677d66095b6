"""Budgets across replicas (issue 15): two ``modelguard serve`` control planes sharing one
real Redis, a real Envoy on each, one client spending one budget through both.

Each replica sizes its sidecars' assignments from the holders on every replica (kept in
Redis, each until its assignment lapses), so a budget of N allows at most N plus the
README's bound: what each sidecar serves before its first assignment arrives (one request
of a sequential client per sidecar) and while a report's answer is on its way.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from controlplane.ratelimit import Budgets, RedisBackend, Rule
from controlplane.ratelimit.backend import Grant
from tests.conftest import Processes, Redis
from tests.resilience.conftest import write_policies
from tests.resilience.test_budget_instances import Predict, body
from tests.resilience.test_quota_service_gone import Plane, until

BUDGET = 30
LIMIT = "demo.digits-model.daily"
# One request before each sidecar's first assignment, one in flight during a report.
BOUND = 2 * 2

POLICY = f"""\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {{name: digits-model, namespace: demo}}
spec:
  targetRef: {{service: digits-model}}
  limits:
  - {{name: daily, clientKey: {{header: x-api-key}}, requests: {BUDGET}, per: day,
     scope: Global}}
"""


async def test_holders_on_all_replicas_share_one_budget_and_a_dead_replicas_lapse(
    redis_server: Redis,
) -> None:
    """The arithmetic of the Redis script, as two replicas see it (one clock they share;
    Redis expires the keys by the real clock, so it starts now)."""
    now = [time.time()]
    a = Budgets(RedisBackend(redis_server.url), clock=lambda: now[0])
    b = Budgets(RedisBackend(redis_server.url), clock=lambda: now[0])
    parsed = Rule.parse(
        {"limit": LIMIT, "policy": "demo/p", "requests": "10", "window": "86400", "client": "c"}
    )
    assert parsed is not None
    rule_a = rule_b = parsed[0]
    try:
        assert await a.grant(rule_a, "c", "A/1/1", hits=2, units=1, ttl=15) == Grant(8, 8)
        await b.add(rule_b, "c", 2)
        # B's sidecar: 6 left, but A's sidecar holds 8 of them: nothing until A reports.
        assert await b.grant(rule_b, "c", "B/1/1", hits=0, units=1, ttl=15) == Grant(0, 6)
        assert await a.grant(rule_a, "c", "A/1/1", hits=1, units=1, ttl=15) == Grant(
            3, 5
        )  # B wants a share
        assert await b.grant(rule_b, "c", "B/1/1", hits=1, units=1, ttl=15) == Grant(1, 4)
        # Replica A dies: its holder lapses with its assignment (15 s), B gets what is left.
        now[0] += 16
        assert await b.grant(rule_b, "c", "B/1/1", hits=0, units=1, ttl=15) == Grant(4, 4)
        # A holder released (its stream ended) frees its share at once.
        assert await a.grant(rule_a, "c", "A/2/1", hits=0, units=1, ttl=15) == Grant(0, 4)
        await b.release(rule_b, "c", "B/1/1")
        assert await a.grant(rule_a, "c", "A/2/1", hits=0, units=1, ttl=15) == Grant(4, 4)
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.envoy
def test_a_budget_of_30_over_two_replicas_allows_at_most_30_plus_the_bound(
    tmp_path: Path, processes: Processes, demo_model: tuple[str, int], redis_server: Redis
) -> None:
    policies = write_policies(tmp_path / "policies", POLICY)
    one = Plane(processes, policies, redis_server)
    two = Plane(processes, policies, redis_server)
    gates = [
        Predict(processes, tmp_path, demo_model[1], one.xds, "digits-model-a"),
        Predict(processes, tmp_path, demo_model[1], two.xds, "digits-model-b"),
    ]
    for gate in gates:
        gate.envoy.wait_ready(30)
        until(lambda g=gate: g.post("warm-up", body(1)) == 200, 20, "configured")  # type: ignore[misc]

    # One client alternating between the two replicas' sidecars, in three bursts over
    # two report intervals, asking for three times its budget.
    statuses: list[int] = []
    for _ in range(3):
        statuses += [gates[i % 2].post("spender", body(1)) for i in range(2 * BUDGET)]
        time.sleep(6)
    served = statuses.count(200)
    assert set(statuses) <= {200, 429}, statuses
    assert BUDGET - BOUND <= served <= BUDGET + BOUND, (served, statuses)
    # Both replicas see the one count in Redis (a budget of requests also counts the
    # refused ones: every request of the three bursts).
    everything = len(statuses)
    until(lambda: one.used(LIMIT, "spender") == everything, 10, "counted on replica one")
    assert two.used(LIMIT, "spender") == everything
    # And the budget stays spent through either replica.
    assert [gate.post("spender", body(1)) for gate in gates] == [429, 429]
