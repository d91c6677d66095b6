"""RatePolicy → IR, descriptors ↔ rules, and the budget arithmetic (memory backend, a clock
the test moves)."""

from __future__ import annotations

import pytest
from envoy.service.rate_limit_quota.v3 import rlqs_pb2

from controlplane.api import parse_documents
from controlplane.compile import compile_sidecar
from controlplane.inventory import Sidecar
from controlplane.ir import ClientKeyIR, RateEnforcement, RateLimitIR
from controlplane.ratelimit import Budgets, MemoryBackend, QuotaService, Rule, backend_from_url
from controlplane.ratelimit.budgets import Decision, tightest
from controlplane.ratelimit.service import _Stream

SIDECAR = Sidecar("s-0", "digits-model", "demo", "spiffe://cluster.local/ns/demo/sa/d", 8080, 15006)

POLICY = """
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: p, namespace: demo}
spec:
  targetRef: {service: digits-model}
  failureMode: FailClosed
  limits:
  - {name: burst, clientKey: {header: X-Key}, requests: 20, per: second, burst: 40}
  - {name: exact, clientKey: {sourceIP: true}, requests: 100, per: minute, scope: Global}
  - {name: daily, clientKey: {jwtClaim: sub}, requests: 10000, per: day, scope: Global}
  - {name: monthly, clientKey: {identity: true}, requests: 5, per: month, scope: Global}
"""


def test_compile_chooses_where_each_limit_is_counted() -> None:
    loaded, violations = parse_documents(POLICY, "rate.yaml")
    assert not violations
    ir = compile_sidecar(SIDECAR, [lp.policy for lp in loaded]).rate
    assert ir is not None
    assert ir.limits == (
        RateLimitIR(
            "demo.p.burst",
            "demo/p",
            ClientKeyIR("header", "x-key"),
            20,
            1,
            40,
            RateEnforcement.LOCAL,
            False,
            True,
        ),
        RateLimitIR(
            "demo.p.exact",
            "demo/p",
            ClientKeyIR("sourceIP"),
            100,
            60,
            100,
            RateEnforcement.EXACT,
            False,
            True,
        ),
        RateLimitIR(
            "demo.p.daily",
            "demo/p",
            ClientKeyIR("header", "x-modelguard-jwt-sub"),  # set by the caller filter
            10000,
            86400,
            10000,
            RateEnforcement.QUOTA,
            False,
            True,
        ),
        RateLimitIR(
            "demo.p.monthly",
            "demo/p",
            ClientKeyIR("identity"),
            5,
            30 * 86400,
            5,
            RateEnforcement.QUOTA,
            False,
            True,
        ),
    )


def test_no_rate_policy_no_rate_ir() -> None:
    assert compile_sidecar(SIDECAR, []).rate is None


def test_rule_parse_reads_descriptors_and_rejects_foreign_ones() -> None:
    entries = {
        "limit": "demo.p.x",
        "policy": "demo/p",
        "requests": "5",
        "window": "60",
        "shadow": "true",
        "client": "k1",
    }
    assert Rule.parse(entries) == (Rule("demo.p.x", "demo/p", 5, 60, True), "k1")
    ip = {**entries, "remote_address": "10.0.0.1"}
    del ip["client"]
    assert Rule.parse(ip) == (Rule("demo.p.x", "demo/p", 5, 60, True), "10.0.0.1")
    assert Rule.parse({"generic_key": "x"}) is None
    assert Rule.parse({**entries, "requests": "many"}) is None
    assert Rule.parse({**entries, "window": "0"}) is None


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_fixed_windows_count_and_reset() -> None:
    clock = Clock(86400 * 100 + 10)
    budgets = Budgets(MemoryBackend(), clock=clock)
    rule = Rule("demo.p.daily", "demo/p", 3, 86400)
    got = [await budgets.hit(rule, "a") for _ in range(4)]
    assert [(d.over, d.remaining) for d in got] == [(False, 2), (False, 1), (False, 0), (True, 0)]
    assert got[0].reset == 86400 - 10
    assert not (await budgets.hit(rule, "b")).over  # clients do not share a budget
    clock.now += 86400  # the next day
    assert (await budgets.hit(rule, "a")).remaining == 2


async def test_usage_lists_top_clients_and_who_is_over() -> None:
    budgets = Budgets(MemoryBackend(), clock=Clock(1000.0))
    rule = Rule("demo.p.m", "demo/p", 2, 60)
    for client, n in (("a", 1), ("b", 3), ("c", 2)):
        await budgets.add(rule, client, n)
    [usage] = await budgets.usage(top=2)
    assert usage.window_start == 960
    assert [(c.client, c.used, c.remaining, c.over) for c in usage.clients] == [
        ("b", 3, 0, True),
        ("c", 2, 0, True),
    ]
    assert await budgets.usage(limit_filter="other") == []


async def test_throttle_tightens_one_client_until_it_expires() -> None:
    clock = Clock(1000.0)
    budgets = Budgets(MemoryBackend(), clock=clock)
    rule = Rule("demo.p.m", "demo/p", 100, 60)
    await budgets.throttle("demo/p", "a", 2, "minute", until=clock.now + 120)
    got = [await budgets.hit(rule, "a") for _ in range(3)]
    assert [(d.over, d.limit) for d in got] == [(False, 2), (False, 2), (True, 2)]
    assert not (await budgets.hit(rule, "b")).over
    clock.now += 121
    assert not (await budgets.hit(rule, "a")).over
    with pytest.raises(ValueError):
        await budgets.throttle("demo/p", "a", 0, "minute", until=clock.now + 1)


def test_tightest_prefers_a_refusal_then_the_fewest_left() -> None:
    ok = Decision(False, 10, 5, 30, 60)
    low = Decision(False, 100, 1, 3000, 3600)
    over = Decision(True, 1000, 0, 80000, 86400)
    assert tightest([ok, low]) == low
    assert tightest([ok, low, over]) == over


async def test_quota_assignment_splits_the_remaining_budget_among_sidecars() -> None:
    budgets = Budgets(MemoryBackend(), clock=Clock(5000.0))
    quota = QuotaService(budgets)
    bucket = {
        "limit": "demo.p.d",
        "policy": "demo/p",
        "requests": "10",
        "window": "86400",
        "shadow": "false",
        "client": "a",
    }
    report = rlqs_pb2.RateLimitQuotaUsageReports(domain="demo.p.d")
    report.bucket_quota_usages.add(num_requests_allowed=2).bucket_id.bucket.update(bucket)
    one, two = _Stream("one"), _Stream("two")
    first = await quota._assign(report, one)
    assert (
        first.bucket_action[0].quota_assignment_action.rate_limit_strategy.token_bucket.max_tokens
        == 8
    )
    second = await quota._assign(report, two)  # 4 used now, 6 left, two sidecars hold it
    strategy = second.bucket_action[0].quota_assignment_action.rate_limit_strategy
    assert strategy.token_bucket.max_tokens == 3
    assert second.bucket_action[0].quota_assignment_action.assignment_time_to_live.seconds > 0
    report.bucket_quota_usages[0].num_requests_allowed = 6
    spent = await quota._assign(report, one)
    assert spent.bucket_action[0].quota_assignment_action.rate_limit_strategy.blanket_rule == (
        spent.bucket_action[0].quota_assignment_action.rate_limit_strategy.DENY_ALL
    )


def test_backend_from_url() -> None:
    assert isinstance(backend_from_url("memory"), MemoryBackend)
    with pytest.raises(ValueError, match="redis://"):
        backend_from_url("postgres://x")
