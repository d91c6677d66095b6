"""The registry of policy kinds: each kind lives in ``controlplane/policies/<kind>/`` and is
registered here: its modules imported, its entry in ``REGISTRY`` (and its model in the static
type union ``Policy``, which only mypy reads).

A kind's folder holds ``api.py`` (its model), ``crd.py`` (its CRD names and CEL rules),
``ir.py`` (its part of the IR, keyed by kind in ``SidecarIR.features``), ``compile.py``
(``KIND``, ``compile_feature``) and ``translate.py`` (``MODULES``: its translation modules,
each with the ``Phase`` that places its HTTP filters in the chain).

Everything per kind outside the folder is derived from ``REGISTRY``: the loader's ``KINDS``
(``controlplane/api/kinds.py``) at run time; and, written by ``make crds``
(``python -m controlplane.crdgen``, checked by ``make gen-check``), the CRDs, the
ClusterRole's rules, the demo kustomization's examples, the import contracts' kind lists
(``pyproject.toml``), the compile dispatch (``compilers.py``) and the translate modules
(``translators.py``). tests/unit/test_sample_kind.py adds a kind this way.

This module sits at the API layer (it imports the kinds' ``api`` and ``crd`` modules only),
so the loader can read it; compile and translate read the generated tables instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from controlplane.api.base import PolicyBase
from controlplane.api.crd import CrdExtras
from controlplane.policies.access import api as access
from controlplane.policies.access import crd as access_crd
from controlplane.policies.egress import api as egress
from controlplane.policies.egress import crd as egress_crd
from controlplane.policies.extraction import api as extraction
from controlplane.policies.extraction import crd as extraction_crd
from controlplane.policies.rate import api as rate
from controlplane.policies.rate import crd as rate_crd


@dataclass(frozen=True)
class Kind:
    """One registered policy kind: its model and its CRD extras."""

    model: type[PolicyBase]
    crd: CrdExtras

    @property
    def name(self) -> str:
        return self.model.KIND

    @property
    def folder(self) -> str:
        """Its folder under ``controlplane/policies/`` (also the name of its example,
        ``policies/<folder>.yaml``)."""
        return self.model.__module__.split(".")[-2]


# Static type of "any policy" (mypy narrows it with isinstance); a kind is in both lines.
Policy = access.AccessPolicy | egress.EgressPolicy | rate.RatePolicy | extraction.ExtractionPolicy

REGISTRY: Final[tuple[Kind, ...]] = (
    Kind(access.AccessPolicy, access_crd.EXTRAS),
    Kind(egress.EgressPolicy, egress_crd.EXTRAS),
    Kind(rate.RatePolicy, rate_crd.EXTRAS),
    Kind(extraction.ExtractionPolicy, extraction_crd.EXTRAS),
)
