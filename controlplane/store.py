"""The policy store: the current valid policies, their generations and per-object status.

Sources (the policy folder, Kubernetes) hand the store whole *units* — a file, or one
Kubernetes object — each with the policies it parsed to and the violations found. A unit
is applied whole or not at all: if it has any violation, or would clash with a policy of
another unit, the last good version of that unit keeps serving and its errors are kept
for status. Nothing is ever half-applied.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.api import LoadedPolicy, Policy, Violation
from controlplane.api.warnings import policy_warnings

log = logging.getLogger(__name__)

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
    _latest: dict[str, UnitContent] = field(default_factory=dict)  # unit → what it holds now
    _serving: dict[PolicyKey, str] = field(default_factory=dict)  # policy → the unit served
    # Valid but giving something away (api/warnings.py), for status.
    _warnings: dict[PolicyKey, tuple[str, ...]] = field(default_factory=dict)
    _revision: int = 0
    # The index that keeps a change local: policy → units that name it, unit → its names.
    _owners: dict[PolicyKey, LoadedPolicy] = field(default_factory=dict)
    _by_key: dict[PolicyKey, set[str]] = field(default_factory=dict)
    _named: dict[str, frozenset[PolicyKey]] = field(default_factory=dict)
    _listeners: list[Callable[[PolicySet], None]] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _current: PolicySet = field(default_factory=lambda: PolicySet(0, ()))

    # ---- writing -------------------------------------------------------------------------

    def apply(self, changed: Mapping[str, UnitContent], removed: Iterable[str] = ()) -> bool:
        """Apply changed and removed units; returns whether the enforced set changed.

        Which unit owns a policy that several define does not depend on the order edits
        arrive in: the first unit in sorted order wins, as in ``modelguard validate`` (which
        reads files in the same order). Removing or fixing the winner hands the policy to
        the next one. Only the units a change can affect are judged again: those that name
        (now, or in their last good version) a policy that a changed unit names, and so on
        transitively. No other unit shares a name with them, so none of their verdicts
        can change; a change costs what it touches, not the size of the store.
        """
        with self._lock:
            before = self._current.policies
            was_rejected = dict(self._rejected)
            new_keys = {_key(lp.policy) for c in changed.values() for lp in c.policies}
            new_keys |= {k for c in changed.values() for k in _keys_named(c)}
            affected = self._affected(set(changed) | set(removed), new_keys)
            for unit in removed:
                self._latest.pop(unit, None)
                self._good.pop(unit, None)
                self._rejected.pop(unit, None)
            self._latest.update(changed)
            # Forget what the affected units owned: it is decided again below, among them
            # only (no other unit names any of it).
            for unit in affected:
                for key in self._named.pop(unit, ()):
                    self._owners.pop(key, None)
                    self._serving.pop(key, None)
                    self._warnings.pop(key, None)
                    units = self._by_key.get(key)
                    if units is not None:
                        units.discard(unit)
                        if not units:
                            del self._by_key[key]
            owners: dict[PolicyKey, LoadedPolicy] = {}
            for unit in sorted(u for u in affected if u in self._latest):
                content = self._latest[unit]
                problems = [str(v) for v in content.violations]
                problems += _clashes(content.policies, owners)
                if problems:
                    # Also the policies its last good version holds: they are what a
                    # rejected file (a YAML syntax error names none) still serves.
                    named = set(_keys_named(content))
                    named |= {_key(lp.policy) for lp in self._good.get(unit, ())}
                    self._rejected[unit] = (tuple(sorted(named)), tuple(problems))
                    # The last good version keeps serving, but never over a winner.
                    serving = tuple(
                        lp for lp in self._good.get(unit, ()) if _key(lp.policy) not in owners
                    )
                else:
                    self._rejected.pop(unit, None)
                    self._good[unit] = serving = content.policies
                for lp in serving:
                    owners.setdefault(_key(lp.policy), lp)
                self._index(unit, content)
            for key, lp in owners.items():
                self._owners[key] = lp
                self._serving[key] = lp.source
                if warnings := policy_warnings(lp.policy):
                    self._warnings[key] = tuple(warnings)
            self._bump_generations(owners)
            policies = tuple(self._owners[key].policy for key in sorted(self._owners))
            _log_changes(was_rejected, self._rejected, changed, self._good)
            if policies == before:
                return False
            self._revision += 1
            self._current = PolicySet(self._revision, policies)
            current = self._current
        for listener in list(self._listeners):
            listener(current)
        return True

    def _affected(self, units: set[str], new_keys: set[PolicyKey]) -> set[str]:
        """``units`` and every unit that shares a policy name with one of them, or with
        ``new_keys`` (what the changed units name now), transitively."""
        affected = set(units)
        frontier = [other for key in new_keys for other in self._by_key.get(key, ())]
        frontier += units
        while frontier:
            unit = frontier.pop()
            affected.add(unit)
            for key in self._named.get(unit, ()):
                for other in self._by_key.get(key, ()):
                    if other not in affected:
                        affected.add(other)
                        frontier.append(other)
        return affected

    def _index(self, unit: str, content: UnitContent) -> None:
        """Remember every policy name the unit holds now or serves from its last good
        version (what it can own or clash on), and which units name each."""
        named = {_key(lp.policy) for lp in content.policies}
        named |= {_key(lp.policy) for lp in self._good.get(unit, ())}
        self._named[unit] = frozenset(named)
        for key in named:
            self._by_key.setdefault(key, set()).add(unit)

    def _bump_generations(self, owners: Mapping[PolicyKey, LoadedPolicy]) -> None:
        # Like Kubernetes' metadata.generation: bumped on every change of the spec.
        for key, lp in owners.items():
            fingerprint = _spec_fingerprint(lp.policy)
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
            for key, unit in self._serving.items():
                out[key] = PolicyStatus(
                    key, unit, self.generation(key), ACCEPTED,
                    warnings=self._warnings.get(key, ()),
                )
            for unit, (keys, errors) in self._rejected.items():
                for key in keys:
                    winner = self._serving.get(key)
                    if winner is not None and winner != unit:
                        # Served from another unit (this one duplicates it): the row is
                        # the winner's; this unit's errors are listed as unit errors.
                        continue
                    mine = tuple(e for e in errors if _names(e, key)) or errors
                    out[key] = PolicyStatus(
                        key, unit, self.generation(key), REJECTED, mine, serving=winner == unit
                    )
            return [out[k] for k in sorted(out)]

    def unit_errors(self) -> dict[str, tuple[str, ...]]:
        """Errors of rejected units, including those no policy name can be pinned on."""
        with self._lock:
            return {unit: errors for unit, (_, errors) in sorted(self._rejected.items())}


def _clashes(
    loaded: tuple[LoadedPolicy, ...], owners: Mapping[PolicyKey, LoadedPolicy]
) -> list[str]:
    """Policies of a unit that an earlier unit (or an earlier document) already defines."""
    out = []
    mine: dict[PolicyKey, LoadedPolicy] = {}
    for lp in loaded:
        key = _key(lp.policy)
        owner = owners.get(key) or mine.get(key)
        if owner is not None:
            kind, ns, name = key
            out.append(
                f"{lp.source}[{lp.index}] {kind} {ns}/{name}: metadata.name: "
                f"duplicate of {owner.source}[{owner.index}], which is the one served"
            )
        mine.setdefault(key, lp)
    return out


def _log_changes(
    before: Mapping[str, tuple[tuple[PolicyKey, ...], tuple[str, ...]]],
    after: Mapping[str, tuple[tuple[PolicyKey, ...], tuple[str, ...]]],
    changed: Mapping[str, UnitContent],
    good: Mapping[str, tuple[LoadedPolicy, ...]],
) -> None:
    """One line per unit whose verdict changed: rejected (every reason), or accepted again.
    A source logs its own parse errors; clashes are only known here."""
    for unit, (_, errors) in after.items():
        if before.get(unit, ((), ()))[1] != errors:
            for error in errors:
                if unit not in changed or error not in {str(v) for v in changed[unit].violations}:
                    log.error("policy rejected: %s", error)
            log.warning(
                "%s rejected: %d problem(s); its last good version keeps serving", unit, len(errors)
            )
    for unit in changed:
        if unit not in after:
            count = len(good.get(unit, ()))
            if unit in before:
                log.info("%s accepted again: %d polic%s", unit, count, "y" if count == 1 else "ies")
            elif not changed[unit].policies and not changed[unit].violations:
                log.warning("%s: no policies in this file (empty)", unit)


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
