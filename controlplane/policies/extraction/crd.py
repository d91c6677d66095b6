"""ExtractionPolicy's CRD extras: its names and the CEL twins of its model validators."""

from __future__ import annotations

from typing import Final

from controlplane.api.crd import CrdExtras, Names, is_set, is_true, rule

_HARDENING_RULES = [
    rule(
        f"!{is_true('labelOnly')} || !(has(self.topK) || has(self.roundDigits) || has(self.noise))",
        "labelOnly returns no scores, so topK, roundDigits and noise cannot apply",
        ".labelOnly",
    )
]

EXTRAS: Final = CrdExtras(
    names=Names("extractionpolicies", "extractionpolicy", ("mgxp",)),
    validations={
        "Hardening": _HARDENING_RULES,
        "OutputHardening": [
            *_HARDENING_RULES,
            rule(
                f"!({is_set('tiers')}) || has(self.tierHeader)",
                "required when tiers are set",
                ".tierHeader",
            ),
            rule(
                f"!has(self.tierHeader) || ({is_set('tiers')})",
                "required when tierHeader is set",
                ".tiers",
            ),
        ],
        "ResponseFields": [
            rule(
                "has(self.scores) || has(self.label)",
                "must set at least one of scores, label",
            )
        ],
        "ExtractionPolicySpec": [
            rule(
                "!has(self.output) || has(self.response.scores)",
                "hardens the model's scores: set spec.response.scores, or remove it (a model "
                "that answers labels only has nothing to harden)",
                ".output",
            ),
            rule(
                "!has(self.actions) || has(self.detection)",
                "requires detection: actions follow its verdicts",
                ".actions",
            ),
        ],
    },
    list_types={("Detection", "detectors"): {"x-kubernetes-list-type": "set"}},
)
