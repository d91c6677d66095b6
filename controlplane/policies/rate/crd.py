"""RatePolicy's CRD extras: its names, the burst bound, limits as a map keyed by name."""

from __future__ import annotations

from typing import Final

from controlplane.api.crd import CrdExtras, Names, rule

EXTRAS: Final = CrdExtras(
    names=Names("ratepolicies", "ratepolicy", ("mgrp",)),
    validations={
        "Limit": [
            rule(
                "!has(self.burst) || self.burst >= self.requests",
                "must be at least requests",
                ".burst",
            )
        ],
    },
    list_types={
        ("RatePolicySpec", "limits"): {
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    },
)
