"""Table tests: each bad document → the WHOLE list of violations, rendered as users see them."""

from __future__ import annotations

import textwrap

import pytest

from controlplane.api import parse_documents

HEAD = "apiVersion: modelguard.io/v1alpha1\n"


def violations(text: str) -> list[str]:
    loaded, found = parse_documents(textwrap.dedent(text), "p.yaml")
    assert not (loaded and found and any(v.index == p.index for v in found for p in loaded))
    return [str(v) for v in found]


RATE = (
    HEAD
    + """\
kind: RatePolicy
metadata: {name: budget, namespace: ml}
spec:
  targetRef: {service: fraud-model}
  limits:
"""
)

ACCESS = (
    HEAD
    + """\
kind: AccessPolicy
metadata: {name: gate, namespace: ml}
spec:
  targetRef: {service: fraud-model}
"""
)

EGRESS = (
    HEAD
    + """\
kind: EgressPolicy
metadata: {name: out, namespace: ml}
spec:
  targetRef: {service: fraud-model}
"""
)

EXTRACTION = (
    HEAD
    + """\
kind: ExtractionPolicy
metadata: {name: guard, namespace: ml}
spec:
  targetRef: {service: fraud-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
"""
)

R = "p.yaml[0] RatePolicy ml/budget: "
A = "p.yaml[0] AccessPolicy ml/gate: "
E = "p.yaml[0] EgressPolicy ml/out: "
X = "p.yaml[0] ExtractionPolicy ml/guard: "

CASES: list[tuple[str, str, list[str]]] = [
    # --- documents that are not policies --------------------------------------------------
    (
        "list document",
        "- a\n- b\n",
        ["p.yaml[0]: must be a mapping with apiVersion, kind, metadata and spec"],
    ),
    (
        "scalar document",
        "just text\n",
        ["p.yaml[0]: must be a mapping with apiVersion, kind, metadata and spec"],
    ),
    (
        "missing apiVersion and kind",
        "metadata: {name: a}\nspec: {}\n",
        [
            "p.yaml[0] default/a: apiVersion: must be modelguard.io/v1alpha1",
            "p.yaml[0] default/a: kind: must be one of AccessPolicy, EgressPolicy, RatePolicy, "
            "ExtractionPolicy",
        ],
    ),
    (
        "wrong apiVersion, otherwise valid",
        RATE.replace("modelguard.io/v1alpha1", "modelguard.io/v1")
        + "  - {name: a, clientKey: {header: x-api-key}, requests: 1, per: second}\n",
        [R + "apiVersion: must be modelguard.io/v1alpha1"],
    ),
    (
        "unknown kind: metadata and top-level fields are still checked",
        HEAD + "kind: Mesh\nmetadata: {name: Bad_Name}\nspec: 3\nextra: 1\nstatus: {}\n",
        [
            "p.yaml[0] Mesh default/Bad_Name: kind: must be one of AccessPolicy, EgressPolicy, "
            "RatePolicy, ExtractionPolicy",
            "p.yaml[0] Mesh default/Bad_Name: metadata.name: must be a DNS-1123 subdomain: "
            "lowercase letters, digits, '-' and '.', at most 253 characters",
            "p.yaml[0] Mesh default/Bad_Name: spec: must be a mapping",
            "p.yaml[0] Mesh default/Bad_Name: extra: unknown field",
        ],
    ),
    (
        "kind that is not a string",
        HEAD + "kind: [RatePolicy]\nmetadata: {name: a}\nspec: {}\n",
        [
            "p.yaml[0] default/a: kind: must be one of AccessPolicy, EgressPolicy, RatePolicy, "
            "ExtractionPolicy"
        ],
    ),
    (
        "missing metadata and spec",
        HEAD + "kind: RatePolicy\n",
        ["p.yaml[0] RatePolicy: metadata: required", "p.yaml[0] RatePolicy: spec: required"],
    ),
    (
        "bad metadata",
        HEAD
        + "kind: EgressPolicy\n"
        + "metadata: {name: -out, namespace: ML, generation: 0, labels: {a: 1}, nmae: x}\n"
        + "spec: {targetRef: {service: s}}\n",
        [
            "p.yaml[0] EgressPolicy ML/-out: metadata.name: must be a DNS-1123 subdomain: "
            "lowercase letters, digits, '-' and '.', at most 253 characters",
            "p.yaml[0] EgressPolicy ML/-out: metadata.namespace: must be a DNS-1123 label: "
            "lowercase letters, digits and '-', at most 63 characters",
            "p.yaml[0] EgressPolicy ML/-out: metadata.labels.a: must be a string",
            "p.yaml[0] EgressPolicy ML/-out: metadata.generation: must be at least 1",
            "p.yaml[0] EgressPolicy ML/-out: metadata.nmae: unknown field",
        ],
    ),
    (
        "metadata not a mapping, name too long",
        HEAD + "kind: EgressPolicy\nmetadata: x\nspec: {targetRef: {service: s}}\n"
        "---\n" + HEAD + f"kind: EgressPolicy\nmetadata: {{name: {'a' * 254}}}\n"
        "spec: {targetRef: {service: s}}\n",
        [
            "p.yaml[0] EgressPolicy: metadata: must be a mapping",
            f"p.yaml[1] EgressPolicy default/{'a' * 254}: metadata.name: must be a DNS-1123 "
            "subdomain: lowercase letters, digits, '-' and '.', at most 253 characters",
        ],
    ),
    # --- YAML itself --------------------------------------------------------------------
    (
        "syntax error after a bad document: both reported, with line and column",
        RATE + "  - {name: a}\n---\nkind: [RatePolicy\n",
        [
            R + "spec.limits[0].clientKey: required",
            R + "spec.limits[0].requests: required",
            R + "spec.limits[0].per: required",
            "p.yaml[1]: invalid YAML: expected ',' or ']', but got '<stream end>' "
            "(line 10, column 1)",
        ],
    ),
    (
        "mapping values in the wrong place",
        "kind: RatePolicy\nmetadata: name: a\n",
        ["p.yaml[0]: invalid YAML: mapping values are not allowed here (line 2, column 15)"],
    ),
    (
        "duplicate keys are reported, not silently merged",
        RATE + "  - {name: a, clientKey: {header: x-api-key}, requests: 1, per: second}\n"
        "  - {name: b, clientKey: {header: x-api-key}, requests: 1, per: second, per: day}\n",
        [R + 'duplicate key "per" (line 8, column 73)'],
    ),
    (
        "impossible date: the next document is still checked",
        "metadata: {creationTimestamp: 2024-13-45}\n---\n- x\n",
        [
            "p.yaml[0]: invalid YAML: month must be in 1..12",
            "p.yaml[1]: must be a mapping with apiVersion, kind, metadata and spec",
        ],
    ),
    (
        "document indexes count empty documents",
        "---\n---\n" + RATE + "  - 3\n",
        ["p.yaml[1] RatePolicy ml/budget: spec.limits[0]: must be a mapping"],
    ),
    # --- RatePolicy ---------------------------------------------------------------------
    (
        "rate: every limit problem at once",
        RATE
        + """\
  - {name: burst, clientKey: {header: x-api-key}, requests: "20", per: second, perr: 1}
  - {name: burst, clientKey: {}, requests: 0, per: weekly}
  - {name: Daily, clientKey: {header: x-api-key, sourceIP: true}, per: day, burst: 1.5}
  - {name: ok, clientKey: {header: "x api key"}, requests: 10, per: hour, burst: 5}
  - {name: g, clientKey: {jwtClaim: ""}, requests: 1, per: month, scope: global}
  - 7
  shadow: "yes"
  failureMode: Open
  mode: Audit
""",
        [
            R + "spec.limits[0].requests: must be an integer",
            R + "spec.limits[0].perr: unknown field",
            R + "spec.limits[1].clientKey: exactly one of apiKey, header, identity, jwtClaim, "
            "sourceIP "
            "must be set",
            R + "spec.limits[1].requests: must be greater than 0",
            R + "spec.limits[1].per: must be one of second, minute, hour, day, month",
            R + 'spec.limits[1].name: duplicate name "burst" (first used by limits[0])',
            R + "spec.limits[2].name: must be a DNS-1123 label: lowercase letters, digits and "
            "'-', at most 63 characters",
            R + "spec.limits[2].clientKey: exactly one of apiKey, header, identity, jwtClaim, "
            "sourceIP "
            "must be set",
            R + "spec.limits[2].requests: required",
            R + "spec.limits[2].burst: must be an integer",
            R + "spec.limits[3].clientKey.header: must be an HTTP header name",
            R + "spec.limits[4].clientKey.jwtClaim: must not be empty",
            R + "spec.limits[4].scope: must be one of Local, Global",
            R + "spec.limits[5]: must be a mapping",
            R + "spec.shadow: must be a boolean",
            R + "spec.failureMode: must be one of FailOpen, FailClosed",
            R + "spec.mode: unknown field",
        ],
    ),
    (
        "rate: burst below requests (checked once the limit is otherwise valid)",
        RATE + "  - {name: a, clientKey: {identity: true}, requests: 10, per: second, burst: 5}\n",
        [R + "spec.limits[0].burst: must be at least requests (10)"],
    ),
    (
        "rate: duplicate names alone",
        RATE
        + "  - {name: a, clientKey: {sourceIP: true}, requests: 1, per: second}\n"
        + "  - {name: b, clientKey: {sourceIP: true}, requests: 1, per: second}\n"
        + "  - {name: a, clientKey: {sourceIP: true}, requests: 1, per: day}\n",
        [R + 'spec.limits[2].name: duplicate name "a" (first used by limits[0])'],
    ),
    (
        "rate: identity false is not a client key",
        RATE + "  - {name: a, clientKey: {identity: false}, requests: 1, per: second}\n",
        [
            R + "spec.limits[0].clientKey: exactly one of apiKey, header, identity, jwtClaim, "
            "sourceIP "
            "must be set"
        ],
    ),
    (
        "rate: no limits",
        RATE + "    []\n",
        [R + "spec.limits: must not be empty"],
    ),
    (
        "rate: limits not a list, targetRef missing",
        RATE.replace("  targetRef: {service: fraud-model}\n", "") + "    name: a\n",
        [R + "spec.targetRef: required", R + "spec.limits: must be a list"],
    ),
    # --- AccessPolicy -------------------------------------------------------------------
    (
        "access: every rule problem at once",
        ACCESS
        + """\
  mode: enforce
  defaultAction: Reject
  rules:
  - action: Allow
    from:
      identities: ["spiffe://cluster.local/ns/web/sa/checkout", "http://x", "spiffe://td/../x"]
      namespaces: [Web]
      apiKeys: {}
    to: {methods: [post, GET], paths: ["/v1/*", "v1", "*/predict", "/a*b", "*", "**"]}
  - {name: r, action: allow, from: {}}
  - {name: r, action: Deny, to: {}, form: {namespaces: [a]}}
  - name: j
    action: Allow
    from: {jwt: {claims: {groups: admin}}}
""",
        [
            A + "spec.mode: must be one of Enforce, Audit",
            A + "spec.defaultAction: must be one of Allow, Deny",
            A + "spec.rules[0].from.identities[1]: must be a SPIFFE ID: "
            "spiffe://<trust-domain>/<path>",
            A + "spec.rules[0].from.identities[2]: must be a SPIFFE ID: "
            "spiffe://<trust-domain>/<path>",
            A + "spec.rules[0].from.namespaces[0]: must be a DNS-1123 label: lowercase letters, "
            "digits and '-', at most 63 characters",
            A + "spec.rules[0].from.apiKeys.secretRef: required",
            A + "spec.rules[0].to.methods[0]: must be one of GET, HEAD, POST, PUT, PATCH, DELETE, "
            "OPTIONS, CONNECT, TRACE",
            A + "spec.rules[0].to.paths[1]: must be a path starting with '/', optionally with one "
            "'*' at the start or end (/v1/predict, /v1/*, */predict, *)",
            A + "spec.rules[0].to.paths[3]: must be a path starting with '/', optionally with one "
            "'*' at the start or end (/v1/predict, /v1/*, */predict, *)",
            A + "spec.rules[0].to.paths[5]: must be a path starting with '/', optionally with one "
            "'*' at the start or end (/v1/predict, /v1/*, */predict, *)",
            A + "spec.rules[1].action: must be one of Allow, Deny",
            A + "spec.rules[1].from: must set at least one of identities, namespaces, apiKeys, jwt",
            A + "spec.rules[2].to: must set at least one of methods, paths",
            A + "spec.rules[2].form: unknown field",
            A + 'spec.rules[2].name: duplicate name "r" (first used by rules[1])',
            A + "spec.rules[3].from.jwt.issuer: required",
            A + "spec.rules[3].from.jwt.claims.groups: must be a list",
        ],
    ),
    (
        "access: target must be exactly one of service or selector",
        ACCESS.replace(
            "{service: fraud-model}", "{service: fraud-model, selector: {matchLabels: {a: b}}}"
        )
        + "---\n"
        + ACCESS.replace("{service: fraud-model}", "{}")
        + "---\n"
        + ACCESS.replace("{service: fraud-model}", "{selector: {matchLabels: [a]}}"),
        [
            A + "spec.targetRef: exactly one of service, selector must be set",
            "p.yaml[1] AccessPolicy ml/gate: spec.targetRef: exactly one of service, selector "
            "must be set",
            "p.yaml[2] AccessPolicy ml/gate: spec.targetRef.selector.matchLabels: "
            "must be a mapping",
        ],
    ),
    (
        "access: rules must be a list of mappings",
        ACCESS + "  rules: [Allow]\n",
        [A + "spec.rules[0]: must be a mapping"],
    ),
    # --- EgressPolicy -------------------------------------------------------------------
    (
        "egress: every allow-list problem at once",
        EGRESS
        + """\
  mode: Block
  allow:
  - {host: "*.S3.example.com", ports: [443, 443, 0, 70000, "80"]}
  - {host: "a.*.com", ports: [], protocol: UDP, budget: {bytes: 0, per: year}}
  - {host: "api.example.com"}
  - {host: "", ports: 443}
""",
        [
            E + "spec.mode: must be one of Enforce, Audit",
            E + "spec.allow[0].host: must be a lowercase host name, optionally starting with "
            "'*.' (api.example.com, *.s3.example.com)",
            E + "spec.allow[0].ports[2]: must be at least 1",
            E + "spec.allow[0].ports[3]: must be at most 65535",
            E + "spec.allow[0].ports[4]: must be an integer",
            E + "spec.allow[1].host: must be a lowercase host name, optionally starting with "
            "'*.' (api.example.com, *.s3.example.com)",
            E + "spec.allow[1].ports: must not be empty",
            E + "spec.allow[1].protocol: must be one of HTTP, TLS",
            E + "spec.allow[1].budget.bytes: must be greater than 0",
            E + "spec.allow[1].budget.per: must be one of second, minute, hour, day, month",
            E + "spec.allow[2].ports: required",
            E + "spec.allow[3].host: must be a lowercase host name, optionally starting with "
            "'*.' (api.example.com, *.s3.example.com)",
            E + "spec.allow[3].ports: must be a list",
        ],
    ),
    (
        "egress: duplicate port",
        EGRESS + "  allow: [{host: a.example.com, ports: [443, 80, 443]}]\n",
        [E + "spec.allow[0].ports[2]: duplicate port 443"],
    ),
    # --- ExtractionPolicy ---------------------------------------------------------------
    (
        "extraction: every field problem at once",
        EXTRACTION.replace('"$.instances[*]"', "instances").replace(
            '{scores: "$.predictions[*].probabilities"}', "{format: json}"
        )
        + """\
  output: {topK: 0, roundDigits: 11, noise: 0.7, labelOnly: "no", tiers: {Gold: {topK: 3}}}
  detection: {detectors: [prada, foo], sensitivity: extreme}
  actions:
    onSuspicion: {throttle: {requests: 0, per: week}}
    onDetection: {quarantine: {duration: 1w}}
    onAlert: {}
""",
        [
            X + "spec.request.features: must be a JSONPath starting with '$' (e.g. $.instances[*])",
            X + "spec.response: must set at least one of scores, label",
            X + "spec.output.topK: must be at least 1",
            X + "spec.output.roundDigits: must be at most 10",
            X + "spec.output.labelOnly: must be a boolean",
            X + "spec.output.noise: must be at most 0.5",
            X + "spec.output.tiers.Gold: key must be a DNS-1123 label: lowercase letters, digits "
            "and '-', at most 63 characters",
            X + "spec.detection.detectors[1]: must be one of prada, nearDuplicate, coverage, "
            "outOfDistribution",
            X + "spec.detection.sensitivity: must be one of low, medium, high",
            X + "spec.actions.onSuspicion.throttle.requests: must be greater than 0",
            X + "spec.actions.onSuspicion.throttle.per: must be one of second, minute, hour, day, "
            "month",
            X + "spec.actions.onDetection.quarantine.duration: must be a duration such as 30s, "
            "15m, 24h or 7d",
            X + "spec.actions.onAlert: unknown field",
        ],
    ),
    (
        "extraction: missing required parts",
        HEAD + "kind: ExtractionPolicy\nmetadata: {name: guard, namespace: ml}\nspec: {}\n",
        [
            X + "spec.targetRef: required",
            X + "spec.clientKey: required",
            X + "spec.request: required",
            X + "spec.response: required",
        ],
    ),
    (
        "extraction: labelOnly cannot be combined with score hardening",
        EXTRACTION + "  output: {labelOnly: true, topK: 1, noise: 0.1}\n",
        [
            X + "spec.output.labelOnly: returns no scores, so topK, noise cannot apply; remove "
            "them or set labelOnly: false"
        ],
    ),
    (
        "extraction: tiers and tierHeader go together; tiers are checked like the defaults",
        EXTRACTION
        + "  output: {topK: 1, tiers: {trial: {labelOnly: true, roundDigits: 2}}}\n"
        + "---\n"
        + EXTRACTION
        + "  output: {topK: 1, tierHeader: x-tier}\n",
        [
            X + "spec.output.tiers.trial.labelOnly: returns no scores, so roundDigits cannot "
            "apply; remove it or set labelOnly: false",
            "p.yaml[1] ExtractionPolicy ml/guard: spec.output.tiers: required when tierHeader "
            "is set",
        ],
    ),
    (
        "extraction: duplicate detector, empty detectors, zero duration, actions need detection",
        EXTRACTION
        + "  detection: {detectors: [prada, coverage, prada]}\n"
        + "---\n"
        + EXTRACTION
        + "  detection: {detectors: []}\n"
        + "  actions: {onDetection: {quarantine: {duration: 0s}}}\n"
        + "---\n"
        + EXTRACTION
        + "  actions: {onDetection: {quarantine: {duration: 7d}}}\n",
        [
            X + "spec.detection.detectors[2]: duplicate detector prada",
            "p.yaml[1] ExtractionPolicy ml/guard: spec.detection.detectors: must not be empty",
            "p.yaml[1] ExtractionPolicy ml/guard: spec.actions.onDetection.quarantine.duration: "
            "must be longer than 0s",
            "p.yaml[2] ExtractionPolicy ml/guard: spec.actions: requires detection: actions "
            "follow its verdicts",
        ],
    ),
    (
        "extraction: wrong types for whole sections",
        EXTRACTION + "  output: 3\n  detection: [prada]\n  actions: null\n",
        [X + "spec.output: must be a mapping", X + "spec.detection: must be a mapping"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_violations(text: str, expected: list[str]) -> None:
    assert violations(text) == expected


def test_messages_never_leak_pydantic_phrasing() -> None:
    for _, text, _ in CASES:
        for line in violations(text):
            assert "Input should" not in line
            assert "pydantic" not in line
            assert "Value error" not in line
