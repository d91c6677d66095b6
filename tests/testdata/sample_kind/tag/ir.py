"""TagPolicy's part of one sidecar's IR: the headers, merged over its policies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from controlplane.ir import SidecarIR

KIND: Final = "TagPolicy"


@dataclass(frozen=True)
class TagIR:
    headers: tuple[tuple[str, str], ...]  # sorted by name; a later policy's value wins


def of(ir: SidecarIR) -> TagIR | None:
    value = ir.feature(KIND)
    return value if isinstance(value, TagIR) else None
