"""The policy store: the current valid policies, their generations and per-object status.

Sources (the policy folder, Kubernetes) hand the store whole *units* — a file, or one
Kubernetes object — each with the policies it parsed to and the violations found. A unit
is applied whole or not at all: if it has any violation, or would clash with a policy of
another unit, the last good version of that unit keeps serving and its errors are kept
for status. Nothing is ever half-applied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.api import LoadedPolicy, Policy, Violation
from controlplane.api.warnings import policy_warnings

PolicyKey = tuple[str, str, str]  # kind, namespace, name

ACCEPTED = "Accepted"
REJECTED = "Rejected"


@dataclass(frozen=True)
class UnitContent:
    """What a source read from one unit (a file, a Kubernetes object)."""

    policies: tuple[LoadedPolicy, ...]
    violations: tuple[Violation, ...]


@dataclass(frozen=True)
class PolicyStatus:
    key: PolicyKey
    source: str
    generation: int
    state: str  # ACCEPTED | REJECTED
    errors: tuple[str, ...] = ()
    serving: bool = True  # a version of it is enforced (the last good one when REJECTED)
    warnings: tuple[str, ...] = ()  # valid, but gives something away (api/warnings.py)


@dataclass(frozen=True)
class PolicySet:
    """An immutable view of the policies that are enforced now."""

    revision: int
    policies: tuple[Policy, ...]

    def of_kind(self, kind: str) -> tuple[Policy, ...]:
        return tuple(p for p in self.policies if p.kind == kind)


def _key(policy: Policy) -> PolicyKey:
    return (policy.kind, policy.metadata.namespace, policy.metadata.name)


def _spec_fingerprint(policy: Policy) -> str:
    return policy.spec.model_dump_json(by_alias=True)


@dataclass
class PolicyStore:
    _good: dict[str, tuple[LoadedPolicy, ...]] = field(default_factory=dict)  # unit → last good
    # unit → (policies its latest, rejected content names; why it was rejected)
    _rejected: dict[str, tuple[tuple[PolicyKey, ...], tuple[str, ...]]] = field(
        default_factory=dict
    )
    _generations: dict[PolicyKey, tuple[int, str]] = field(default_factory=dict)
    _revision: int = 0
    _listeners: list[Callable[[PolicySet], None]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _current: PolicySet = field(default_factory=lambda: PolicySet(0, ()))

    # ---- writing -------------------------------------------------------------------------

    def apply(self, changed: Mapping[str, UnitContent], removed: Iterable[str] = ()) -> bool:
        """Apply changed and removed units; returns whether the enforced set changed."""
        with self._lock:
            before = self._current.policies
            for unit in removed:
                self._good.pop(unit, None)
                self._rejected.pop(unit, None)
            for unit, content in sorted(changed.items()):
                problems = [str(v) for v in content.violations]
                problems += self._clashes(unit, content.policies)
                if problems:
                    self._rejected[unit] = (_keys_named(content), tuple(problems))
                    continue
                self._rejected.pop(unit, None)
                self._good[unit] = content.policies
            policies = tuple(
                sorted((lp.policy for lps in self._good.values() for lp in lps), key=_key)
            )
            self._bump_generations(policies)
            if policies == before:
                return False
            self._revision += 1
            self._current = PolicySet(self._revision, policies)
            current = self._current
        for listener in list(self._listeners):
            listener(current)
        return True

    def _clashes(self, unit: str, loaded: tuple[LoadedPolicy, ...]) -> list[str]:
        owners = {
            _key(lp.policy): (other, lp)
            for other, lps in self._good.items()
            if other != unit
            for lp in lps
        }
        out = []
        for lp in loaded:
            owner = owners.get(_key(lp.policy))
            if owner is not None:
                kind, ns, name = _key(lp.policy)
                out.append(
                    f"{lp.source}[{lp.index}] {kind} {ns}/{name}: metadata.name: "
                    f"duplicate of {owner[1].source}[{owner[1].index}]"
                )
        return out

    def _bump_generations(self, policies: tuple[Policy, ...]) -> None:
        # Like Kubernetes' metadata.generation: bumped on every change of the spec.
        for policy in policies:
            key, fingerprint = _key(policy), _spec_fingerprint(policy)
            generation, seen = self._generations.get(key, (0, ""))
            if seen != fingerprint:
                self._generations[key] = (generation + 1, fingerprint)

    # ---- reading -------------------------------------------------------------------------

    def current(self) -> PolicySet:
        with self._lock:
            return self._current

    def subscribe(self, listener: Callable[[PolicySet], None]) -> None:
        self._listeners.append(listener)

    def generation(self, key: PolicyKey) -> int:
        with self._lock:
            return self._generations.get(key, (0, ""))[0]

    def statuses(self) -> list[PolicyStatus]:
        """Every policy we know of, serving or rejected, with its errors."""
        with self._lock:
            out: dict[PolicyKey, PolicyStatus] = {}
            for unit, lps in self._good.items():
                for lp in lps:
                    key = _key(lp.policy)
                    out[key] = PolicyStatus(
                        key, unit, self.generation(key), ACCEPTED,
                        warnings=tuple(policy_warnings(lp.policy)),
                    )
            for unit, (keys, errors) in self._rejected.items():
                for key in keys:
                    mine = tuple(e for e in errors if _names(e, key)) or errors
                    serving = key in out
                    out[key] = PolicyStatus(
                        key, unit, self.generation(key), REJECTED, mine, serving=serving
                    )
            return [out[k] for k in sorted(out)]

    def unit_errors(self) -> dict[str, tuple[str, ...]]:
        """Errors of rejected units, including those no policy name can be pinned on."""
        with self._lock:
            return {unit: errors for unit, (_, errors) in sorted(self._rejected.items())}


def _names(error: str, key: PolicyKey) -> bool:
    kind, ns, name = key
    return f" {kind} {ns}/{name}:" in error


def _keys_named(content: UnitContent) -> tuple[PolicyKey, ...]:
    """Every policy a unit names, whether it parsed or not."""
    keys = {_key(lp.policy) for lp in content.policies}
    for violation in content.violations:
        if violation.kind and violation.name and "/" in violation.name:
            namespace, name = violation.name.split("/", 1)
            keys.add((violation.kind, namespace, name))
    return tuple(sorted(keys))
