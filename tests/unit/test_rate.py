"""RatePolicy → IR, descriptors ↔ rules, and the budget arithmetic (memory backend, a clock
the test moves)."""

from __future__ import annotations

import pytest
from envoy.service.rate_limit_quota.v3 import rlqs_pb2

from controlplane.api import parse_documents
from controlplane.compile import compile_sidecar
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.ir import ClientKeyIR
from controlplane.policies.rate.ir import RateEnforcement, RateLimitIR
from controlplane.policies.rate.ir import of as rate_of
from controlplane.ratelimit import Budgets, MemoryBackend, QuotaService, Rule, backend_from_url
from controlplane.ratelimit.backend import grant_tokens
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
    ir = rate_of(compile_sidecar(SIDECAR, [lp.policy for lp in loaded]))
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
    assert rate_of(compile_sidecar(SIDECAR, [])) is None


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
    # An RLQS bucket id carries the limit in one entry (Envoy hashes a bucket id per entry).
    compact = {"rule": "demo.p.x|demo/p|5|60|1", "client": "k1"}
    assert Rule.parse(compact) == (Rule("demo.p.x", "demo/p", 5, 60, True), "k1")
    assert Rule.parse({**compact, "rule": "demo.p.x|demo/p|5|60|0"}) == (
        Rule("demo.p.x", "demo/p", 5, 60, False),
        "k1",
    )
    for bad in ("demo.p.x|demo/p|5|60", "demo.p.x|demo/p|5|60|yes", "demo.p.x|demo/p|x|60|0"):
        assert Rule.parse({**compact, "rule": bad}) is None, bad


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


def _tokens(response: rlqs_pb2.RateLimitQuotaResponse) -> int:
    """The assignment's size in requests (0: deny all): the last action for the bucket (a
    deny-all before a token bucket only makes the sidecar start the bucket anew)."""
    strategy = response.bucket_action[-1].quota_assignment_action.rate_limit_strategy
    if strategy.HasField("token_bucket"):
        return int(strategy.token_bucket.max_tokens)
    assert strategy.blanket_rule == strategy.DENY_ALL
    return 0


async def test_quota_assignments_never_add_up_to_more_than_the_budget() -> None:
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
    one, two = _Stream("one", holder="h1"), _Stream("two", holder="h2")
    first = await quota._assign(report, one)
    assert _tokens(first) == 8  # alone: all that is left
    assert first.bucket_action[0].quota_assignment_action.assignment_time_to_live.seconds > 0
    # 4 used, 6 left, two holders: a fair share would be 3, but one's 8 cover it all.
    assert _tokens(await quota._assign(report, two)) == 0
    report.bucket_quota_usages[0].num_requests_allowed = 1
    renewed = await quota._assign(report, one)
    assert _tokens(renewed) == 3  # 5 left, fair share 3
    # A token bucket after a token bucket: a deny-all first, so Envoy refills it.
    first_action = renewed.bucket_action[0].quota_assignment_action.rate_limit_strategy
    assert len(renewed.bucket_action) == 2 and first_action.blanket_rule == first_action.DENY_ALL
    assert _tokens(await quota._assign(report, two)) == 1  # 4 left, 3 held by one
    report.bucket_quota_usages[0].num_requests_allowed = 4
    assert _tokens(await quota._assign(report, one)) == 0  # 10 used


async def test_a_bucket_of_instances_is_charged_and_sized_in_instances() -> None:
    budgets = Budgets(MemoryBackend(), clock=Clock(5000.0))
    quota = QuotaService(budgets)
    bucket = {
        "limit": "demo.p.d",
        "policy": "demo/p",
        "requests": "1000",
        "window": "86400",
        "shadow": "false",
        "client": "a",
        "instances": "256",
    }
    report = rlqs_pb2.RateLimitQuotaUsageReports(domain="demo.p.d")
    usage = report.bucket_quota_usages.add(num_requests_allowed=1, num_requests_denied=5)
    usage.bucket_id.bucket.update(bucket)
    stream = _Stream("one", holder="h1")
    # One answered 256-instance request costs 256; refused ones cost nothing: 744 left,
    # two more requests of 256.
    assert _tokens(await quota._assign(report, stream)) == 2
    rule = Rule.parse(bucket)
    assert rule is not None
    assert await budgets.backend.top(rule[0].limit, 86400, 5000.0, 5) == [("a", 256)]
    # One-instance requests of the same client share what is left: 744 minus the 512 the
    # 256-class bucket holds.
    bucket["instances"] = "1"
    usage.bucket_id.bucket.update(bucket)
    usage.num_requests_allowed, usage.num_requests_denied = 0, 0
    assert _tokens(await quota._assign(report, stream)) == 232
    # Its stream gone, the 256-class holder's reservation goes with it.
    await quota._release(stream)
    assert _tokens(await quota._assign(report, _Stream("two", holder="h2"))) == 744


@pytest.mark.parametrize(
    ("remaining", "holders", "reserved", "units", "tokens"),
    [
        (0, 1, 0, 1, 0),
        (-3, 1, 0, 1, 0),
        (10, 1, 0, 1, 10),
        (10, 2, 0, 1, 5),
        (11, 2, 0, 1, 6),
        (10, 2, 8, 1, 2),
        (10, 2, 12, 1, 0),
        (300, 1, 0, 256, 1),
        (300, 2, 0, 256, 0),
        (255, 1, 0, 256, 0),
    ],
)
def test_grant_arithmetic(
    remaining: int, holders: int, reserved: int, units: int, tokens: int
) -> None:
    assert grant_tokens(remaining, holders, reserved, units) == tokens


def test_backend_from_url() -> None:
    assert isinstance(backend_from_url("memory"), MemoryBackend)
    with pytest.raises(ValueError, match="redis://"):
        backend_from_url("postgres://x")


@pytest.mark.parametrize(
    ("limit", "path"),
    [
        ("{name: l, clientKey: {header: k}, requests: 5, per: day, cost: instances}", "cost"),
        (
            "{name: l, clientKey: {header: k}, requests: 5, per: minute, scope: Global,"
            " cost: instances}",
            "cost",
        ),
        (
            "{name: l, clientKey: {header: k}, requests: 5, per: day, scope: Global, cost: bytes}",
            "cost",
        ),
    ],
)
def test_only_budgets_charge_instances(limit: str, path: str) -> None:
    text = POLICY.split("  limits:")[0] + f"  limits:\n  - {limit}\n"
    _, violations = parse_documents(text, "rate.yaml")
    assert [v.path for v in violations] == [f"spec.limits[0].{path}"], violations


def test_a_budget_of_instances_reaches_the_ir() -> None:
    text = POLICY.split("  limits:")[0] + (
        "  limits:\n  - {name: d, clientKey: {header: k}, requests: 5, per: day,"
        " scope: Global, cost: Instances}\n"
    )
    loaded, violations = parse_documents(text, "rate.yaml")
    assert not violations
    ir = rate_of(compile_sidecar(SIDECAR, [lp.policy for lp in loaded]))
    assert ir is not None and ir.limits[0].cost == "instances"
    assert ir.limits[0].enforcement == RateEnforcement.QUOTA


async def test_memory_holders_lapse_and_release_as_in_redis() -> None:
    """The sequence tests/resilience/test_budget_replicas.py runs on Redis, in memory."""
    clock = Clock(5000.0)
    budgets = Budgets(MemoryBackend(), clock=clock)
    parsed = Rule.parse(
        {"limit": "demo.p.d", "policy": "demo/p", "requests": "10", "window": "86400"}
    )
    assert parsed is not None
    rule = parsed[0]

    async def grant(holder: str, hits: int) -> tuple[int, int]:
        g = await budgets.grant(rule, "c", holder, hits=hits, units=1, ttl=15)
        return g.tokens, g.remaining

    assert await grant("A/1/1", 2) == (8, 8)
    assert await grant("B/1/1", 2) == (0, 6)
    assert await grant("A/1/1", 1) == (3, 5)
    assert await grant("B/1/1", 1) == (1, 4)
    clock.now += 16  # A's holder lapsed with its assignment
    assert await grant("B/1/1", 0) == (4, 4)
    assert await grant("A/2/1", 0) == (0, 4)
    await budgets.release(rule, "c", "B/1/1")
    assert await grant("A/2/1", 0) == (4, 4)
