"""EgressPolicy's part of one sidecar's IR: its outbound listener (``of`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from controlplane.ir import PolicyRef, SidecarIR

KIND: Final = "EgressPolicy"  # the key of this kind's feature in SidecarIR.features


class EgressProtocol(StrEnum):
    HTTP = "HTTP"  # plain HTTP, matched by Host / :authority
    TLS = "TLS"  # TLS passed through untouched, matched by SNI


@dataclass(frozen=True)
class EgressBudget:
    """Bytes the workload may send to one destination per window (exfiltration bound)."""

    bytes: int
    window_seconds: int


@dataclass(frozen=True)
class EgressDestination:
    """One allow-listed outside destination. ``host`` is exact or ``*.suffix``; a wildcard
    matches any subdomain (one label or more) but never the bare parent."""

    name: str  # stable, unique within the sidecar: <ns>.<policy>.allow-<i>
    policy: PolicyRef
    host: str
    ports: tuple[int, ...]
    protocols: tuple[EgressProtocol, ...]
    budget: EgressBudget | None = None

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")


@dataclass(frozen=True)
class EgressIR:
    """The sidecar's outbound listener: everything the workload sends outside goes through
    it and only allow-listed destinations pass (default deny).

    ``enforce`` False is Audit: nothing is blocked, what would be is logged. ``deciding``
    names the policies whose default deny decides for unlisted destinations (empty when no
    EgressPolicy targets the sidecar: the sidecar's own default deny decides).
    """

    listen_address: str
    port: int
    enforce: bool
    allowed: tuple[EgressDestination, ...]
    deciding: tuple[PolicyRef, ...]


def of(ir: SidecarIR) -> EgressIR | None:
    value = ir.feature(KIND)
    return value if isinstance(value, EgressIR) else None
