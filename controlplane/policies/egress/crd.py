"""EgressPolicy's CRD extras: its names; ports are a set the API server keeps unique."""

from __future__ import annotations

from typing import Final

from controlplane.api.crd import CrdExtras, Names

EXTRAS: Final = CrdExtras(
    names=Names("egresspolicies", "egresspolicy", ("mgep",)),
    list_types={("EgressRule", "ports"): {"x-kubernetes-list-type": "set"}},
)
