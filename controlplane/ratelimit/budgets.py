"""Counting against limits, run-time throttles, and the usage report: what both rate limit
services share, over one backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from controlplane.api.common import WINDOW_SECONDS, parse_duration
from controlplane.ratelimit.backend import Backend, BackendError, Grant
from controlplane.ratelimit.rules import Rule, window_start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throttle:
    """A limit pushed at run time on one client of one policy (the extraction defense's
    ``throttle`` response): at most ``requests`` per ``per`` seconds, until ``until``."""

    requests: int
    per: int
    until: float

    def encode(self) -> str:
        return f"{self.requests}/{self.per}/{self.until}"

    @classmethod
    def decode(cls, text: str) -> Throttle:
        requests, per, until = text.split("/")
        return cls(int(requests), int(per), float(until))


@dataclass(frozen=True)
class Decision:
    over: bool  # the request is over a limit (enforced unless the limit is shadow)
    limit: int  # requests allowed in the window that decided
    remaining: int
    reset: int  # seconds until that window ends
    window: int


@dataclass(frozen=True)
class ClientUsage:
    client: str
    used: int
    remaining: int
    over: bool  # at or over the limit: its next request is refused


@dataclass(frozen=True)
class LimitUsage:
    rule: Rule
    window_start: int
    clients: tuple[ClientUsage, ...]  # most used first


def _seconds(per: str | int) -> int:
    if isinstance(per, int):
        return per
    return WINDOW_SECONDS.get(per) or parse_duration(per)


ThrottleListener = Callable[[str, str], Awaitable[None]]

# The longest a run-time throttle may last (30 days): one mistaken or forged call must not
# lock a paying client out for ever. Longer ones are refused (the admin API says so).
MAX_THROTTLE_SECONDS = 30 * 86400


class Budgets:
    def __init__(
        self,
        backend: Backend,
        *,
        clock: Callable[[], float] = time.time,
        throttle_refresh: float = 1.0,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.throttle_refresh = throttle_refresh
        # Every limit this service has been asked about: what the usage report lists.
        self.rules: dict[str, Rule] = {}
        self._throttles: dict[tuple[str, str], Throttle] = {}
        self._listeners: list[ThrottleListener] = []
        self._refresh_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._refresh_task = asyncio.create_task(self._refresh_throttles())

    async def stop(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        await self.backend.close()

    # --- counting ---------------------------------------------------------------------------

    async def add(self, rule: Rule, client: str, hits: int) -> int:
        """Count ``hits`` requests; the client's total in the rule's current window."""
        self.rules[rule.limit] = rule
        return await self.backend.add(rule.limit, rule.window, client, hits, self.clock())

    async def grant(
        self, rule: Rule, client: str, holder: str, *, hits: int, units: int, ttl: float
    ) -> Grant:
        """Count ``hits`` and size the next assignment of one holder of ``client``'s budget,
        in one step (see ``Backend.grant``)."""
        self.rules[rule.limit] = rule
        return await self.backend.grant(
            rule.limit,
            rule.window,
            client,
            holder,
            hits=hits,
            budget=rule.requests,
            units=units,
            now=self.clock(),
            ttl=ttl,
        )

    async def release(self, rule: Rule, client: str, holder: str) -> None:
        await self.backend.release(rule.limit, rule.window, client, holder, self.clock())

    async def hit(self, rule: Rule, client: str, hits: int = 1) -> Decision:
        """Count a request against ``rule`` (and any throttle on its client): the decision."""
        now = self.clock()
        total = await self.add(rule, client, hits)
        start = window_start(now, rule.window)
        decision = Decision(
            over=total > rule.requests,
            limit=rule.requests,
            remaining=max(0, rule.requests - total),
            reset=max(1, round(start + rule.window - now)),
            window=rule.window,
        )
        throttle = self.throttle_for(rule.policy, client)
        if throttle is not None:
            counted = await self.backend.add(
                f"{rule.limit}#throttle", throttle.per, client, hits, now
            )
            t_start = window_start(now, throttle.per)
            throttled = Decision(
                over=counted > throttle.requests,
                limit=throttle.requests,
                remaining=max(0, throttle.requests - counted),
                reset=max(1, round(t_start + throttle.per - now)),
                window=throttle.per,
            )
            decision = tightest([decision, throttled])
        return decision

    # --- throttles ---------------------------------------------------------------------------

    def on_throttle(self, listener: ThrottleListener) -> None:
        self._listeners.append(listener)

    def throttle_for(self, policy: str, client: str) -> Throttle | None:
        throttle = self._throttles.get((policy, client))
        if throttle is not None and throttle.until <= self.clock():
            del self._throttles[(policy, client)]
            return None
        return throttle

    async def throttle(
        self, policy: str, client: str, requests: int, per: str | int, until: float
    ) -> Throttle:
        """Limit one client of one policy to ``requests`` per ``per`` until ``until``
        (Unix time), on every sidecar, without a configuration push.

        ``policy`` is ``<namespace>/<name>`` of the RatePolicy; ``per`` a window name
        (``minute``), a duration (``90s``) or seconds.
        """
        if requests <= 0:
            raise ValueError("requests must be positive")
        if until > self.clock() + MAX_THROTTLE_SECONDS:
            raise ValueError(
                f"until: at most {MAX_THROTTLE_SECONDS // 86400} days from now "
                "(a run-time throttle is a stopgap; use a RatePolicy for a lasting limit)"
            )
        throttle = Throttle(requests, _seconds(per), until)
        await self.backend.set_throttle(policy, client, throttle.encode(), until)
        self._throttles[(policy, client)] = throttle
        for listener in list(self._listeners):
            await listener(policy, client)
        return throttle

    def runtime_throttles(self) -> dict[tuple[str, str], Throttle]:
        """Run-time throttles in force, by (policy, client)."""
        now = self.clock()
        return {k: t for k, t in self._throttles.items() if t.until > now}

    async def unthrottle(self, client: str, policy: str | None = None) -> list[tuple[str, str]]:
        """End the run-time throttles of a client, named by its key or anything
        ``matches`` accepts (its SHA-256, a fingerprint), of one policy or all; returns the
        (policy, client) pairs ended. Sidecars hear of it at once (listeners)."""
        from controlplane.extraction.verdicts import matches

        gone = [
            (p, c)
            for p, c in list(self._throttles)
            if (policy is None or p == policy) and matches(client, c, digested=False)
        ]
        for p, c in gone:
            await self.backend.delete_throttle(p, c)
            self._throttles.pop((p, c), None)
            for listener in list(self._listeners):
                await listener(p, c)
        return gone

    async def _refresh_throttles(self) -> None:
        # Throttles set through another replica arrive through the shared backend.
        while True:
            await asyncio.sleep(self.throttle_refresh)
            try:
                stored = await self.backend.throttles(self.clock())
            except BackendError as err:
                log.debug("throttles not refreshed: %s", err)
                continue
            fresh = {k: Throttle.decode(v) for k, v in stored.items()}
            new = [k for k, t in fresh.items() if self._throttles.get(k) != t]
            self._throttles = fresh
            for policy, client in new:
                for listener in list(self._listeners):
                    await listener(policy, client)

    # --- usage -------------------------------------------------------------------------------

    async def usage(self, limit_filter: str = "", top: int = 10) -> list[LimitUsage]:
        """Per limit seen: its top clients by requests in the current window."""
        now = self.clock()
        out = []
        for name in sorted(self.rules):
            if limit_filter and limit_filter not in name:
                continue
            rule = self.rules[name]
            rows = await self.backend.top(rule.limit, rule.window, now, top)
            out.append(
                LimitUsage(
                    rule=rule,
                    window_start=window_start(now, rule.window),
                    clients=tuple(
                        ClientUsage(
                            client=client,
                            used=used,
                            remaining=max(0, rule.requests - used),
                            over=used >= rule.requests,
                        )
                        for client, used in rows
                    ),
                )
            )
        return out


def tightest(decisions: list[Decision]) -> Decision:
    """The decision that binds: any refusal first, then the fewest requests left."""
    return min(decisions, key=lambda d: (not d.over, d.remaining, -d.reset))
