"""The ExtractionPolicy the monitor's unit tests share: all four detectors, throttle on
suspicion, quarantine on detection; and the fixed digits profile they run with."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from controlplane.api import parse_documents
from controlplane.extraction.calibrate import Profile
from controlplane.extraction.detectors import Reference

ROOT = Path(__file__).resolve().parents[2]
DIGITS_REFERENCE = ROOT / "policies" / "digits-reference.csv"
# Thresholds of the digits model calibrated once (issue 5's procedure) and kept for the
# monitor's mechanics tests (counters, recorded streams), so they do not recalibrate.
DIGITS_PROFILE = Path(__file__).with_name("digits_profile.json")

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {file: {reference}, labelColumn: label}
  actions:
    onSuspicion: {throttle: {requests: 5, per: minute}}
    onDetection: {quarantine: {duration: 1h}}
""".replace("{reference}", str(DIGITS_REFERENCE))


def policies(text: str = POLICY) -> list[Any]:
    """The policies of ``text``, which must be valid."""
    loaded, violations = parse_documents(text, "test")
    assert not violations, violations
    return [lp.policy for lp in loaded]


@functools.cache
def digits_profile() -> Profile:
    """The fixed digits profile, its reference the demo model's training split."""
    from controlplane.local.model import load_model

    return Profile.load(DIGITS_PROFILE, Reference.fit(load_model(0).train_X))


def fixed_profile(policy: Any) -> Profile:
    """A monitor's ``profile`` callable: the fixed digits profile for every policy."""
    return digits_profile()
