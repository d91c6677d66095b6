"""The verdict types compile reads: what the extraction monitor puts in force on one client.

An ``Enforcement`` (quarantine or throttle) becomes an RBAC deny or a per-client rate limit,
a ``Hardened`` record a stricter output tier, in the sidecars the client's ExtractionPolicy
targets. The monitor (``controlplane.extraction``) produces them and keeps them
(``extraction.verdicts.VerdictStore``, ``extraction.hardened.HardenStore``); compile only
reads them, so they live here, below compile, and nothing here imports the monitor.

No raw client key is kept: a header key (an API key is a secret) is filed under its SHA-256
digest (``ClientRef.of``), which is also what the sidecar matches (``translate/verdicts``
hashes the header itself). People see a ``fingerprint``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Stage = Literal["suspicion", "detection", "risk"]  # risk: an onRisk step reached
KeySource = Literal["header", "identity", "jwtClaim", "sourceIP"]
Kind = Literal["quarantine", "throttle"]

# Sources whose key is a secret (an API key in a header): filed and matched by digest only.
DIGESTED: tuple[KeySource, ...] = ("header",)
# Headers the sidecar sets itself from a verified credential (issue 14): their values are
# ids, tenants and claims, not secrets, and may be shown (up to LABEL_MAX characters).
VERIFIED_PREFIX = "x-modelguard-"
LABEL_MAX = 256
FINGERPRINT_HEX = 16  # what people see: "sha256:" + this many hex digits (as traces show)
_HEX = re.compile(r"(?:sha256:)?([0-9a-f]{12,64})")


def digest(value: str | bytes) -> str:
    """The SHA-256 (hex) of a client key as the sidecar hashes its header's bytes."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


def fingerprint_of(hexdigest: str) -> str:
    return "sha256:" + hexdigest[:FINGERPRINT_HEX]


def matches(given: str, key: str, *, digested: bool) -> bool:
    """Whether what an operator typed (the key itself, its digest, or a fingerprint of at
    least 12 hex digits, with or without ``sha256:``) names the stored ``key``."""
    full = key if digested else digest(key)
    if given == key or (digested and digest(given) == key):
        return True
    found = _HEX.fullmatch(given.lower())
    return found is not None and full.startswith(found.group(1))


@dataclass(frozen=True)
class Evidence:
    detector: str  # prada, nearDuplicate, outOfDistribution, coverage, unobserved
    statistic: float
    threshold: float
    queries: int  # the client's queries the statistic was computed over


@dataclass(frozen=True)
class ClientRef:
    """One client of one ExtractionPolicy, as the sidecar can recognise it again."""

    policy: str  # namespace/name of the ExtractionPolicy
    # The client key as stored and matched: for a header, the SHA-256 (hex) of its value
    # (never the key); otherwise the value itself (a SPIFFE ID or an IP address).
    key: str
    source: KeySource = "header"
    header: str | None = None  # for source "header": which header carries the key
    # What people may see of a header key that is no secret: a header the sidecar sets
    # itself (``x-modelguard-*``: a verified key id, tenant or JWT claim). None: a raw
    # header such as x-api-key, shown by fingerprint only.
    label: str | None = None

    @classmethod
    def of(
        cls, policy: str, value: str | bytes, source: KeySource = "header",
        header: str | None = None,
    ) -> ClientRef:
        """The reference for a key's value as the sidecar reports it: digested if secret."""
        if source in DIGESTED:
            label = None
            if header is not None and header.lower().startswith(VERIFIED_PREFIX):
                text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                label = text[:LABEL_MAX]
            return cls(policy, digest(value), source, header, label)
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return cls(policy, text, source, header)

    @property
    def digested(self) -> bool:
        return self.source in DIGESTED

    @property
    def fingerprint(self) -> str:
        """What logs, events and admin answers name the client by: API keys are secrets.
        The same name as traces give the key (``telemetry.records.hash_secret``)."""
        return fingerprint_of(self.key if self.digested else digest(self.key))

    @property
    def shown(self) -> str:
        """How admin answers and tables name the client: a label, a fingerprint for a
        secret, or the value itself (a SPIFFE ID, an address)."""
        if self.label is not None:
            return self.label
        return self.fingerprint if self.digested else self.key

    def named_by(self, given: str) -> bool:
        return given == self.label or matches(given, self.key, digested=self.digested)


@dataclass(frozen=True)
class Verdict:
    client: ClientRef
    stage: Stage
    action: Literal["alert", "throttle", "quarantine", "harden"]
    evidence: tuple[Evidence, ...]
    at: float  # unix seconds
    fidelity: float | None = None  # the client's estimated extraction fidelity (risk.py)

    def attributes(self) -> dict[str, Any]:
        first = self.evidence[0]
        return {
            "modelguard.policy": self.client.policy,
            "modelguard.client": self.client.fingerprint,
            "modelguard.client_key.source": self.client.source,
            "modelguard.verdict.stage": self.stage,
            "modelguard.verdict.action": self.action,
            "modelguard.detector": first.detector,
            "modelguard.statistic": first.statistic,
            "modelguard.threshold": first.threshold,
            "modelguard.queries": first.queries,
            "modelguard.detectors": [e.detector for e in self.evidence],
            "modelguard.statistics": [e.statistic for e in self.evidence],
            "modelguard.thresholds": [e.threshold for e in self.evidence],
        } | ({} if self.fidelity is None else {"modelguard.risk.fidelity": self.fidelity})

    def summary(self) -> str:
        parts = ", ".join(
            f"{e.detector} {e.statistic:.3g} ≥ {e.threshold:.3g} after {e.queries} queries"
            for e in self.evidence
        )
        return (
            f"extraction {self.stage} for {self.client.fingerprint} of {self.client.policy}: "
            f"{parts} → {self.action}"
        )


@dataclass(frozen=True)
class Enforcement:
    """A quarantine or throttle of one client, in force until ``until`` (unix seconds)."""

    kind: Kind
    client: ClientRef
    since: float
    until: float
    reason: str
    requests: int = 0  # throttle only: this many requests per ``per_seconds``
    per_seconds: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Enforcement:
        return cls(**{**raw, "client": ClientRef(**raw["client"])})


@dataclass(frozen=True)
class Hardened:
    """One client answered with another output tier until ``until`` (unix seconds)."""

    client: ClientRef
    since: float
    until: float
    # The client's own tier ("" = none, or a tier without its own onRisk list) → the output
    # tier it is answered with ("" = its own: its list's first step is not reached yet).
    tiers: tuple[tuple[str, str], ...]
    fidelity: float  # the estimate that reached the step

    @property
    def tier(self) -> str:
        """The tier clients without their own onRisk list get (for listings)."""
        return dict(self.tiers).get("", "")


def enforcements_of(items: Iterable[Enforcement], kind: Kind) -> list[Enforcement]:
    return [e for e in items if e.kind == kind]
