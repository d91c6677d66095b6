"""The ExtractionPolicy the monitor's unit tests share: all four detectors, throttle on
suspicion, quarantine on detection."""

from __future__ import annotations

from typing import Any

from controlplane.api import parse_documents

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection: {detectors: [prada, nearDuplicate, outOfDistribution, coverage]}
  actions:
    onSuspicion: {throttle: {requests: 5, per: minute}}
    onDetection: {quarantine: {duration: 1h}}
"""


def policies(text: str = POLICY) -> list[Any]:
    """The policies of ``text``, which must be valid."""
    loaded, violations = parse_documents(text, "test")
    assert not violations, violations
    return [lp.policy for lp in loaded]
