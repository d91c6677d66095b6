"""Valid policies: defaults applied, YAML and Python names, what other packages rely on."""

from __future__ import annotations

import textwrap
from datetime import datetime

import pydantic
import pytest

from controlplane.api import (
    API_VERSION,
    KINDS,
    WINDOW_SECONDS,
    AccessPolicy,
    AccessPolicySpec,
    AccessRule,
    ClientKey,
    EgressPolicy,
    ExtractionPolicy,
    From,
    Limit,
    Metadata,
    Policy,
    RatePolicy,
    RatePolicySpec,
    TargetRef,
    To,
    Violation,
    parse_documents,
    parse_duration,
)


def load_one(text: str) -> Policy:
    loaded, violations = parse_documents(textwrap.dedent(text), "t.yaml")
    assert [str(v) for v in violations] == []
    assert len(loaded) == 1
    return loaded[0].policy


def test_rate_defaults() -> None:
    policy = load_one(
        """\
        apiVersion: modelguard.io/v1alpha1
        kind: RatePolicy
        metadata: {name: budget}
        spec:
          targetRef: {service: fraud-model}
          limits:
          - {name: per-key, clientKey: {header: X-API-Key}, requests: 20, per: second}
        """
    )
    assert isinstance(policy, RatePolicy)
    assert policy.api_version == API_VERSION
    assert policy.kind == "RatePolicy"
    assert policy.ref == ("RatePolicy", "default", "budget")
    assert policy.metadata.namespace == "default"
    assert policy.metadata.labels == {}
    assert policy.metadata.generation == 1
    assert policy.spec.shadow is False
    assert policy.spec.failure_mode == "FailOpen"
    assert policy.spec.target_ref == TargetRef(service="fraud-model")
    (limit,) = policy.spec.limits
    assert limit.scope == "Local"
    assert limit.burst is None
    assert limit.client_key.header == "x-api-key"  # header names are matched lowercased
    assert limit.client_key.source == "header"


def test_access_defaults_and_from_alias() -> None:
    policy = load_one(
        """\
        apiVersion: modelguard.io/v1alpha1
        kind: AccessPolicy
        metadata: {name: gate, namespace: ml}
        spec:
          targetRef: {selector: {matchLabels: {app: fraud-model}}}
          rules:
          - action: Allow
            from:
              identities: ["spiffe://cluster.local/ns/web/sa/checkout"]
              apiKeys: {secretRef: partner-keys}
              jwt: {issuer: "https://login.example.com", claims: {groups: [ml]}}
            to: {methods: [POST], paths: ["/v1/*", "*/predict", "*"]}
        """
    )
    assert isinstance(policy, AccessPolicy)
    assert policy.spec.mode == "Enforce"
    assert policy.spec.default_action == "Deny"
    assert policy.spec.target_ref.selector is not None
    assert policy.spec.target_ref.selector.match_labels == {"app": "fraud-model"}
    rule = policy.spec.rules[0]
    assert rule.name is None
    assert rule.from_ is not None and rule.to is not None
    assert rule.from_.identities == ["spiffe://cluster.local/ns/web/sa/checkout"]
    assert rule.from_.namespaces == []
    assert rule.from_.api_keys is not None and rule.from_.api_keys.secret_ref == "partner-keys"
    assert rule.from_.jwt is not None and rule.from_.jwt.jwks_file is None
    assert rule.from_.jwt.claims == {"groups": ["ml"]}
    assert rule.to.paths == ["/v1/*", "*/predict", "*"]


def test_access_without_rules_denies_everything() -> None:
    policy = load_one(
        """\
        apiVersion: modelguard.io/v1alpha1
        kind: AccessPolicy
        metadata: {name: lockdown}
        spec: {targetRef: {service: fraud-model}}
        """
    )
    assert isinstance(policy, AccessPolicy)
    assert policy.spec.rules == []
    assert policy.spec.default_action == "Deny"


def test_egress_defaults() -> None:
    policy = load_one(
        """\
        apiVersion: modelguard.io/v1alpha1
        kind: EgressPolicy
        metadata: {name: out}
        spec:
          targetRef: {service: fraud-model}
          allow: [{host: "*.s3.example.com", ports: [443]}, {host: 10.0.0.7, ports: [80]}]
        """
    )
    assert isinstance(policy, EgressPolicy)
    assert policy.spec.mode == "Enforce"
    assert policy.spec.allow[0].protocol is None
    assert policy.spec.allow[0].budget is None
    assert policy.spec.allow[1].host == "10.0.0.7"


def test_extraction_defaults() -> None:
    policy = load_one(
        """\
        apiVersion: modelguard.io/v1alpha1
        kind: ExtractionPolicy
        metadata: {name: guard}
        spec:
          targetRef: {service: fraud-model}
          clientKey: {identity: true}
          request: {features: "$.instances[*]"}
          response: {scores: "$.predictions[*].probabilities"}
          output: {labelOnly: true, tierHeader: X-Tier, tiers: {partner: {topK: 3}}}
          detection: {}
          actions: {onDetection: {quarantine: {duration: 1h30m}}}
        """
    )
    assert isinstance(policy, ExtractionPolicy)
    spec = policy.spec
    assert spec.client_key.source == "identity"
    assert spec.response.label is None
    assert spec.output is not None
    assert (spec.output.top_k, spec.output.round_digits, spec.output.noise) == (None, None, None)
    assert spec.output.tier_header == "x-tier"
    assert spec.output.tiers["partner"].top_k == 3
    assert spec.output.tiers["partner"].label_only is False
    assert spec.detection is not None
    assert spec.detection.detectors is None  # without reference data: the two that need none
    assert spec.detection.enabled == ("prada", "nearDuplicate")
    assert spec.detection.sensitivity == "medium"
    assert spec.actions is not None and spec.actions.on_suspicion is None
    assert spec.actions.on_detection is not None
    assert spec.actions.on_detection.quarantine.seconds == 5400


def test_kubernetes_object_validates_unchanged() -> None:
    """What the API server returns: server-set metadata and a status, both accepted."""
    policy = load_one(
        """\
        apiVersion: modelguard.io/v1alpha1
        kind: RatePolicy
        metadata:
          name: budget
          namespace: ml
          uid: 6f1c0c8e-0000-4000-8000-000000000000
          resourceVersion: "12345"
          generation: 3
          creationTimestamp: 2024-05-01T12:00:00Z
          labels: {app.kubernetes.io/part-of: fraud}
          annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
          finalizers: [modelguard.io/cleanup]
          managedFields: [{manager: kubectl, operation: Apply}]
        spec:
          targetRef: {service: fraud-model}
          limits: [{name: daily, clientKey: {jwtClaim: sub}, requests: 1, per: day}]
        status:
          conditions: [{type: Accepted, status: "True", observedGeneration: 3}]
        """
    )
    assert policy.metadata.generation == 3
    assert policy.metadata.resource_version == "12345"
    assert policy.metadata.creation_timestamp == "2024-05-01T12:00:00Z"
    assert policy.metadata.labels == {"app.kubernetes.io/part-of": "fraud"}


def test_python_construction_uses_snake_case() -> None:
    policy = RatePolicy(
        metadata=Metadata(name="budget", namespace="ml"),
        spec=RatePolicySpec(
            target_ref=TargetRef(service="fraud-model"),
            limits=[
                Limit(name="a", client_key=ClientKey(source_ip=True), requests=5, per="minute"),
            ],
        ),
    )
    assert policy.ref == ("RatePolicy", "ml", "budget")
    dumped = policy.model_dump(by_alias=True, exclude_defaults=True)
    assert dumped["spec"]["limits"][0]["clientKey"] == {"sourceIP": True}
    access = AccessPolicy(
        metadata=Metadata(name="gate"),
        spec=AccessPolicySpec(
            target_ref=TargetRef(service="fraud-model"),
            rules=[AccessRule(action="Allow", from_=From(namespaces=["web"]), to=To(paths=["/"]))],
        ),
    )
    assert access.model_dump(by_alias=True)["spec"]["rules"][0]["from"]["namespaces"] == ["web"]


def test_python_construction_checks_duplicates() -> None:
    limit = Limit(name="a", client_key=ClientKey(identity=True), requests=5, per="minute")
    with pytest.raises(pydantic.ValidationError, match="duplicate name"):
        RatePolicySpec(target_ref=TargetRef(service="s"), limits=[limit, limit])


def test_models_are_frozen() -> None:
    metadata = Metadata(name="a")
    with pytest.raises(pydantic.ValidationError):
        metadata.name = "b"  # type: ignore[misc]


def test_kinds_registry() -> None:
    assert list(KINDS) == ["AccessPolicy", "EgressPolicy", "RatePolicy", "ExtractionPolicy"]
    for kind, model in KINDS.items():
        assert kind == model.KIND
        assert model.model_fields["kind"].default == kind


@pytest.mark.parametrize("model", list(KINDS.values()), ids=list(KINDS))
def test_json_schema_uses_yaml_names(model: type[Policy]) -> None:
    """The CRDs are generated from this schema: camelCase names, enums, no extra fields."""
    schema = model.model_json_schema(by_alias=True)
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec"}
    spec = schema["$defs"][f"{model.KIND}Spec"]
    assert "targetRef" in spec["properties"]
    assert spec["additionalProperties"] is False
    assert "target_ref" not in str(schema)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1h30m", 5400)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "10", "h", "-5m", "1.5h", "0s", " 5m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_window_seconds() -> None:
    assert WINDOW_SECONDS == {
        "second": 1,
        "minute": 60,
        "hour": 3600,
        "day": 86400,
        "month": 2592000,
    }


def test_violation_rendering() -> None:
    violation = Violation(
        "policies/rate.yaml",
        1,
        "RatePolicy",
        "ml/budget",
        "spec.limits[1].per",
        "must be one of second, minute, hour, day, month",
    )
    assert str(violation) == (
        "policies/rate.yaml[1] RatePolicy ml/budget: spec.limits[1].per: "
        "must be one of second, minute, hour, day, month"
    )
    assert str(Violation("policies/x.yaml", None, None, None, "", "no such file or directory")) == (
        "policies/x.yaml: no such file or directory"
    )


def test_timestamp_from_yaml_is_kept_as_text() -> None:
    metadata = Metadata.model_validate({"name": "a", "creationTimestamp": datetime(2024, 5, 1)})
    assert metadata.creation_timestamp == "2024-05-01T00:00:00"
