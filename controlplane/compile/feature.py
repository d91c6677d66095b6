"""What a policy kind's compile module offers the assembler (``compile/__init__.py``): its
``KIND`` and ``compile_feature``, which turns the inputs of one sidecar into that kind's
part of the IR (None: nothing to enforce). The assembler calls every registered kind's
(``controlplane/policies/compilers.py``, generated from the registry)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from controlplane.api.base import PolicyBase
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.compile.inputs.verdicts import Enforcement, Hardened
from controlplane.compile.mesh import MeshInputs

_P = TypeVar("_P", bound=PolicyBase)


@dataclass(frozen=True)
class FeatureInputs:
    """One sidecar's inputs at one rebuild: the policies targeting it (every kind, sorted
    by kind, namespace, name), and what the identity box and the monitor know."""

    sidecar: Sidecar
    policies: Sequence[PolicyBase]
    mesh: MeshInputs | None = None
    verdicts: Sequence[Enforcement] = ()
    hardened: Sequence[Hardened] = ()

    def of_kind(self, cls: type[_P]) -> list[_P]:
        return [p for p in self.policies if isinstance(p, cls)]


class FeatureCompiler(Protocol):
    """A kind's compile module, as the assembler sees it."""

    @property
    def KIND(self) -> str: ...

    def compile_feature(self, inputs: FeatureInputs) -> object | None: ...
