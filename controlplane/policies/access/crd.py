"""AccessPolicy's CRD extras: its names and the CEL twins of its model validators."""

from __future__ import annotations

from typing import Final

from controlplane.api.crd import CrdExtras, Names, is_set, rule

# Short names carry an `mg` prefix: `ap` is Istio's AuthorizationPolicy, and a clash makes
# kubectl pick one silently.
EXTRAS: Final = CrdExtras(
    names=Names("accesspolicies", "accesspolicy", ("mgap",)),
    validations={
        "From": [
            rule(
                " || ".join(
                    (
                        f"({is_set('identities')})",
                        f"({is_set('namespaces')})",
                        "has(self.apiKeys)",
                        "has(self.jwt)",
                    )
                ),
                "must set at least one of identities, namespaces, apiKeys, jwt",
            )
        ],
        "To": [
            rule(
                f"({is_set('methods')}) || ({is_set('paths')})",
                "must set at least one of methods, paths",
            )
        ],
    },
)
