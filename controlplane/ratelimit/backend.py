"""Where usage is counted: in memory (one control plane) or in Redis (shared by replicas).

Both keep, per limit and window, how many requests each client made: one sorted set per
(limit, window start) in Redis, so one atomic ZINCRBY counts a request and the same set
answers "top clients" and "who is over". Keys expire with their window, so a budget
survives a restart of the service but never outlives its window.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from controlplane.ratelimit.rules import window_start

KEY_PREFIX = "modelguard:rl"


class BackendError(RuntimeError):
    """The backend cannot count right now (e.g. Redis is unreachable)."""


class Backend(Protocol):
    async def add(self, limit: str, window: int, client: str, hits: int, now: float) -> int:
        """Count ``hits`` requests of ``client``; returns its total in the current window."""
        ...

    async def top(self, limit: str, window: int, now: float, count: int) -> list[tuple[str, int]]:
        """The clients with the most requests in the current window, most first."""
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

    def _window(self, limit: str, window: int, now: float) -> dict[str, int]:
        start = window_start(now, window)
        key = (limit, start)
        if key not in self._counts:
            # A new window: drop this limit's older ones.
            for old in [k for k in self._counts if k[0] == limit and k[1] < start]:
                del self._counts[old]
        return self._counts[key]

    async def add(self, limit: str, window: int, client: str, hits: int, now: float) -> int:
        counts = self._window(limit, window, now)
        counts[client] = counts.get(client, 0) + hits
        return counts[client]

    async def top(self, limit: str, window: int, now: float, count: int) -> list[tuple[str, int]]:
        counts = self._window(limit, window, now)
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:count]

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


class RedisBackend:
    """Counts in Redis: every replica of the control plane sees and updates one budget."""

    def __init__(self, url: str, *, timeout: float = 0.2) -> None:
        self.url = url
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )

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
