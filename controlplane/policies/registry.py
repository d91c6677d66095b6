"""The registry of policy kinds: each kind lives in ``controlplane/policies/<kind>/``
(``api.py`` its model, ``crd.py`` its CRD extras, ``compile.py``, ``translate.py``) and is
registered here with one line of ``REGISTRY``.

Everything per kind outside the kind's folder is derived from this tuple: the loader's
``KINDS`` (``controlplane/api/kinds.py``), the CRDs, the RBAC rules and the demo's
kustomization lines (``python -m controlplane.crdgen``, checked by ``make gen-check``).

This module sits at the API layer (it imports the kinds' ``api`` and ``crd`` modules
only), so the loader can read it; compile and translate name their kind modules
themselves, in the order that matters to them (``compile/__init__.py``,
``translate/httpfilters.py``).
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
