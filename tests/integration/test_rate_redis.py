"""Budgets counted in a real Redis (Debian's redis-server), without Envoy: what the rate
limit service decides across a Redis restart."""

from __future__ import annotations

import asyncio
import time

import pytest

from controlplane.ratelimit.backend import BackendError, RedisBackend
from controlplane.ratelimit.budgets import Budgets
from controlplane.ratelimit.rules import Rule
from tests.conftest import Redis

RULE = Rule(limit="demo.digits-model.minute", policy="demo/digits-model", requests=4, window=60)


async def test_every_request_is_counted_again_once_redis_is_back(redis_server: Redis) -> None:
    # One instant for every decision: all of them fall in one window of the minute.
    now = time.time()
    budgets = Budgets(RedisBackend(redis_server.url), clock=lambda: now)
    try:
        # Two requests at once: the service holds two connections to Redis.
        decisions = await asyncio.gather(budgets.hit(RULE, "mona"), budgets.hit(RULE, "mona"))
        assert sorted(d.remaining for d in decisions) == [2, 3]
        redis_server.stop()
        with pytest.raises(BackendError):  # Envoy applies the policy's failure mode
            await budgets.hit(RULE, "mona")
        redis_server.start()  # empty: no persistence
        # Redis is back: each request is counted, on whichever connection it gets (one
        # that Redis closed while it was idle as well), none is sent to the failure mode.
        decisions = await asyncio.gather(budgets.hit(RULE, "mona"), budgets.hit(RULE, "mona"))
        assert sorted(d.remaining for d in decisions) == [2, 3]
        decisions = [await budgets.hit(RULE, "mona") for _ in range(3)]
        assert [(d.over, d.remaining) for d in decisions] == [(False, 1), (False, 0), (True, 0)]
    finally:
        await budgets.stop()
