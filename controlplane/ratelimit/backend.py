"""Where usage is counted: in memory (one control plane) or in Redis (shared by replicas).

Both keep, per limit and window, how many requests each client made: one sorted set per
(limit, window start) in Redis, so one atomic ZINCRBY counts a request and the same set
answers "top clients" and "who is over". Keys expire with their window, so a budget
survives a restart of the service but never outlives its window.

Both also keep each budget's *holders*: every sidecar bucket (on any replica) that holds a
quota assignment for a client, with what that assignment lets it serve and when it lapses.
``grant`` sizes a new assignment from them in one atomic step (a Lua script in Redis), so
replicas sharing a Redis never hand out more than the client has left (see
``controlplane.ratelimit.service``). A holder's entry lapses with its assignment's TTL: a
replica that dies takes its holders with it after that long.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from controlplane.ratelimit.rules import window_start

KEY_PREFIX = "modelguard:rl"


class BackendError(RuntimeError):
    """The backend cannot count right now (e.g. Redis is unreachable)."""


@dataclass(frozen=True)
class Grant:
    tokens: int  # requests the holder may serve until its next report
    remaining: int  # the client's budget left in the window (units), before this grant


def grant_tokens(remaining: int, holders: int, reserved: int, units: int) -> int:
    """A holder's new assignment in requests of ``units`` each.

    Its fair share of what is left (``remaining`` over the ``holders`` that hold some of
    it, itself included), but never more than the other holders' assignments leave free
    (``reserved``): the sum of all live assignments stays within the budget. Whole requests
    only: a share smaller than one request of this size refuses requests of this size.
    ``holders`` counts only those that hold or want some of it (see ``wants``).
    """
    if remaining <= 0:
        return 0
    fair = math.ceil(remaining / max(1, holders))
    return max(0, min(fair, remaining - reserved)) // max(1, units)


def wants(remaining: int, holders: int, units: int) -> bool:
    """Whether a holder counts among those sharing the budget although it holds nothing:
    yes if its fair share would pay for one of its requests (it got nothing only because
    the others held it all: it gets its share once they report), no if not (a bucket of
    256-instance requests with 200 left must not halve what the client's smaller
    requests can use)."""
    return remaining > 0 and math.ceil(remaining / max(1, holders)) >= units


class Backend(Protocol):
    async def add(self, limit: str, window: int, client: str, hits: int, now: float) -> int:
        """Count ``hits`` requests of ``client``; returns its total in the current window."""
        ...

    async def top(self, limit: str, window: int, now: float, count: int) -> list[tuple[str, int]]:
        """The clients with the most requests in the current window, most first."""
        ...

    async def grant(
        self,
        limit: str,
        window: int,
        client: str,
        holder: str,
        *,
        hits: int,
        budget: int,
        units: int,
        now: float,
        ttl: float,
    ) -> Grant:
        """Atomically: count ``hits`` (as ``add``), size ``holder``'s next assignment
        (``grant_tokens``) from the client's usage and every live holder of it, and record
        it until ``now + ttl``."""
        ...

    async def release(self, limit: str, window: int, client: str, holder: str, now: float) -> None:
        """``holder`` no longer holds an assignment (its stream ended)."""
        ...

    async def set_throttle(self, policy: str, client: str, value: str, until: float) -> None: ...

    async def throttles(self, now: float) -> dict[tuple[str, str], str]: ...

    async def delete_throttle(self, policy: str, client: str) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """The embedded default: exact within one process, lost when it stops."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)
        self._throttles: dict[tuple[str, str], tuple[str, float]] = {}
        # (limit, window start, client) → holder → (expires at, units its assignment allows,
        # whether it wants a share: see ``wants``)
        self._holders: dict[tuple[str, int, str], dict[str, tuple[float, int, bool]]] = {}

    def _window(self, limit: str, window: int, now: float) -> dict[str, int]:
        start = window_start(now, window)
        key = (limit, start)
        if key not in self._counts:
            # A new window: drop this limit's older ones.
            for old in [k for k in self._counts if k[0] == limit and k[1] < start]:
                del self._counts[old]
            for old_h in [k for k in self._holders if k[0] == limit and k[1] < start]:
                del self._holders[old_h]
        return self._counts[key]

    async def add(self, limit: str, window: int, client: str, hits: int, now: float) -> int:
        counts = self._window(limit, window, now)
        counts[client] = counts.get(client, 0) + hits
        return counts[client]

    async def top(self, limit: str, window: int, now: float, count: int) -> list[tuple[str, int]]:
        counts = self._window(limit, window, now)
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:count]

    async def grant(
        self,
        limit: str,
        window: int,
        client: str,
        holder: str,
        *,
        hits: int,
        budget: int,
        units: int,
        now: float,
        ttl: float,
    ) -> Grant:
        remaining = budget - await self.add(limit, window, client, hits, now)
        holders = self._holders.setdefault((limit, window_start(now, window), client), {})
        for name in [h for h, (expires, _, _) in holders.items() if expires <= now]:
            del holders[name]
        others = [
            reserved
            for h, (_, reserved, wanting) in holders.items()
            if h != holder and (reserved or wanting)
        ]
        tokens = grant_tokens(remaining, len(others) + 1, sum(others), units)
        holders[holder] = (
            now + ttl,
            tokens * units,
            wants(remaining, len(others) + 1, units),
        )
        return Grant(tokens, remaining)

    async def release(self, limit: str, window: int, client: str, holder: str, now: float) -> None:
        holders = self._holders.get((limit, window_start(now, window), client))
        if holders is not None:
            holders.pop(holder, None)

    async def set_throttle(self, policy: str, client: str, value: str, until: float) -> None:
        self._throttles[(policy, client)] = (value, until)

    async def throttles(self, now: float) -> dict[tuple[str, str], str]:
        for key in [k for k, (_, until) in self._throttles.items() if until <= now]:
            del self._throttles[key]
        return {k: v for k, (v, _) in self._throttles.items()}

    async def delete_throttle(self, policy: str, client: str) -> None:
        self._throttles.pop((policy, client), None)

    async def close(self) -> None:
        return None


# One atomic step of RedisBackend.grant (the same arithmetic as grant_tokens): count the
# usage reported, drop the lapsed holders, size this holder's assignment from the client's
# usage and the others' live assignments, record it.
# KEYS: the window's counts, the client's holders.
# ARGV: client, holder, budget, units, now, ttl, key expiry (Unix seconds), hits to count.
_GRANT = """
local used = tonumber(redis.call('ZINCRBY', KEYS[1], ARGV[8], ARGV[1]))
redis.call('EXPIREAT', KEYS[1], ARGV[7])
local remaining = tonumber(ARGV[3]) - used
local units, now, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local others, reserved = 0, 0
local entries = redis.call('HGETALL', KEYS[2])
for i = 1, #entries, 2 do
  local field, value = entries[i], entries[i + 1]
  local expires, held, wanting = string.match(value, '^([^:]+):(%d+):(%d)$')
  if expires == nil or tonumber(expires) <= now then
    redis.call('HDEL', KEYS[2], field)
  elseif field ~= ARGV[2] then
    held = tonumber(held)
    if held > 0 or wanting == '1' then
      others = others + 1
      reserved = reserved + held
    end
  end
end
local tokens, wants = 0, 0
if remaining > 0 then
  local fair = math.ceil(remaining / (others + 1))
  local free = math.min(fair, remaining - reserved)
  if free > 0 then tokens = math.floor(free / units) end
  if fair >= units then wants = 1 end
end
redis.call('HSET', KEYS[2], ARGV[2],
  string.format('%.3f:%d:%d', now + ttl, tokens * units, wants))
redis.call('EXPIREAT', KEYS[2], ARGV[7])
return {tokens, remaining}
"""


class RedisBackend:
    """Counts in Redis: every replica of the control plane sees and updates one budget."""

    def __init__(self, url: str, *, timeout: float = 0.2) -> None:
        self.url = url
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            # A pooled connection that Redis closed while it sat idle (Redis restarted or
            # failed over) fails on its next use: redis-py does not notice it when it hands
            # the connection out. Without one retry, at once and on a new connection, each
            # such connection would send one request to the policy's failure mode after
            # Redis is back (measured: "Connection closed by server"). Not after a timeout:
            # Envoy's 250 ms would be over before a second one. A request counted twice
            # (Redis ran it, the connection broke before the answer) is a limit's safe side.
            retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
        )
        self._grant = self._redis.register_script(_GRANT)

    @staticmethod
    def _key(limit: str, window: int, now: float) -> str:
        return f"{KEY_PREFIX}:{{{limit}}}:{window}:{window_start(now, window)}"

    async def add(self, limit: str, window: int, client: str, hits: int, now: float) -> int:
        key = self._key(limit, window, now)
        expire_at = window_start(now, window) + window + 60
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zincrby(key, hits, client)
                pipe.expireat(key, expire_at)
                results = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as err:
            raise BackendError(f"redis {self.url}: {err}") from err
        return int(results[0])

    async def top(self, limit: str, window: int, now: float, count: int) -> list[tuple[str, int]]:
        try:
            rows: Any = await self._redis.zrevrange(
                self._key(limit, window, now), 0, count - 1, withscores=True
            )
        except (TimeoutError, RedisError, OSError) as err:
            raise BackendError(f"redis {self.url}: {err}") from err
        return [(str(member), int(score)) for member, score in rows]

    @staticmethod
    def _holders_key(limit: str, window: int, now: float, client: str) -> str:
        # The client's digest, not the client (often an API key), names the key.
        digest = hashlib.sha256(client.encode(errors="surrogatepass")).hexdigest()[:32]
        return f"{KEY_PREFIX}:{{{limit}}}:{window}:{window_start(now, window)}:holders:{digest}"

    async def grant(
        self,
        limit: str,
        window: int,
        client: str,
        holder: str,
        *,
        hits: int,
        budget: int,
        units: int,
        now: float,
        ttl: float,
    ) -> Grant:
        expire_at = window_start(now, window) + window + 60
        keys = [self._key(limit, window, now), self._holders_key(limit, window, now, client)]
        args: list[str | int | float] = [
            client,
            holder,
            budget,
            units,
            f"{now:.3f}",
            ttl,
            expire_at,
            hits,
        ]
        try:
            tokens, remaining = await self._grant(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as err:
            raise BackendError(f"redis {self.url}: {err}") from err
        return Grant(int(tokens), int(remaining))

    async def release(self, limit: str, window: int, client: str, holder: str, now: float) -> None:
        try:
            await self._redis.hdel(self._holders_key(limit, window, now, client), holder)
        except (TimeoutError, RedisError, OSError) as err:
            raise BackendError(f"redis {self.url}: {err}") from err

    async def set_throttle(self, policy: str, client: str, value: str, until: float) -> None:
        ttl_ms = max(1, int((until - time.time()) * 1000))
        try:
            await self._redis.set(f"{KEY_PREFIX}:throttle:{policy}\x00{client}", value, px=ttl_ms)
        except (TimeoutError, RedisError, OSError) as err:
            raise BackendError(f"redis {self.url}: {err}") from err

    async def throttles(self, now: float) -> dict[tuple[str, str], str]:
        prefix = f"{KEY_PREFIX}:throttle:"
        out: dict[tuple[str, str], str] = {}
        try:
            keys = [k async for k in self._redis.scan_iter(match=prefix + "*", count=500)]
            values = await self._redis.mget(keys) if keys else []
        except (TimeoutError, RedisError, OSError) as err:
            raise BackendError(f"redis {self.url}: {err}") from err
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue
            policy, _, client = str(key)[len(prefix) :].partition("\x00")
            out[(policy, client)] = str(value)
        return out

    async def delete_throttle(self, policy: str, client: str) -> None:
        try:
            await self._redis.delete(f"{KEY_PREFIX}:throttle:{policy}\x00{client}")
        except (TimeoutError, RedisError, OSError) as err:
            raise BackendError(f"redis {self.url}: {err}") from err

    async def close(self) -> None:
        await self._redis.aclose()
