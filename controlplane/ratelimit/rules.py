"""A limit as the sidecar describes it: descriptors and bucket ids carry the limit itself.

The translator puts the limit's name, policy, size, window and shadow flag into every
descriptor (classic path) and bucket id (RLQS), so the services need no copy of the
policies and every control-plane replica answers the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# The keys controlplane.policies.rate.translate writes, from the one module both ends import.
from controlplane.contracts.ratelimit import (
    ANONYMOUS,
    CLIENT_KEY,
    LIMIT_KEY,
    POLICY_KEY,
    REMOTE_ADDRESS_KEY,
    REQUESTS_KEY,
    RULE_KEY,
    SHADOW_KEY,
    UNITS_KEY,
    WINDOW_KEY,
    parse_rule_entry,
)

CLIENT_KEYS = (CLIENT_KEY, REMOTE_ADDRESS_KEY)


@dataclass(frozen=True)
class Rule:
    limit: str  # <ns>.<policy>.<limit>
    policy: str  # <ns>/<policy>
    requests: int
    window: int  # seconds
    shadow: bool = False

    @classmethod
    def parse(cls, entries: Mapping[str, str]) -> tuple[Rule, str] | None:
        """(rule, client) from descriptor entries or a bucket id; None if not ours."""
        if RULE_KEY in entries:
            compact = parse_rule_entry(entries[RULE_KEY])
            if compact is None:
                return None
            entries = {**entries, **compact}
        try:
            rule = cls(
                limit=entries[LIMIT_KEY],
                policy=entries.get(POLICY_KEY, ""),
                requests=int(entries[REQUESTS_KEY]),
                window=int(entries[WINDOW_KEY]),
                shadow=entries.get(SHADOW_KEY) == "true",
            )
        except (KeyError, ValueError):
            return None
        if rule.requests <= 0 or rule.window <= 0:
            return None
        client = next((entries[k] for k in CLIENT_KEYS if k in entries), ANONYMOUS)
        return rule, client or ANONYMOUS


def units(entries: Mapping[str, str]) -> int:
    """What one request of this bucket costs: its instance class, or 1 (a request)."""
    try:
        return max(1, int(entries.get(UNITS_KEY, "1")))
    except ValueError:
        return 1


def window_start(now: float, window: int) -> int:
    """Fixed windows aligned to the Unix epoch, as Envoy's reference rate limit service."""
    return int(now // window) * window
