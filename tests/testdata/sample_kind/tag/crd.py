"""TagPolicy's CRD extras: its names and the CEL twin of its header-name rule."""

from __future__ import annotations

from typing import Final

from controlplane.api.crd import CrdExtras, Names, rule

EXTRAS: Final = CrdExtras(
    names=Names("tagpolicies", "tagpolicy", ("mgtp",)),
    validations={
        "TagPolicySpec": [
            rule("self.headers.all(k, k.startsWith('x-'))", "header names must start with x-")
        ]
    },
)
