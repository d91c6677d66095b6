"""The extraction-risk estimate (controlplane/extraction/risk.py) and onRisk in the monitor.

Real digits model, its own data: natural clients draw from the training split, the estimate
scores on the test split (the held-out rows), as the control plane does.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from monitor_policy import POLICY, fixed_profile, policies

from controlplane.extraction.monitor import ExtractionMonitor
from controlplane.extraction.risk import HeldOut, RiskSample, fidelity
from controlplane.extraction.verdicts import ClientRef, InMemoryVerdictSink, VerdictStore
from controlplane.gen.modelguard.feed.v1 import feed_pb2
from controlplane.local.model import load_model
from controlplane.policies.extraction.compile import compile_one
from controlplane.policies.extraction.translate import filter_config


@pytest.fixture(scope="module")
def model() -> Any:
    return load_model(0)


@pytest.fixture(scope="module")
def held(model: Any) -> HeldOut:
    return HeldOut.of(model.test_X, model.predict(model.test_X))


def digits_held_out(profile: Any) -> HeldOut:
    """The monitor's ``held_out`` callable: the test split and the model's answers on it
    (the fixed profile carries no reference data of its own)."""
    model = load_model(0)
    return HeldOut.of(model.test_X, model.predict(model.test_X))


def natural(model: Any, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return model.train_X[rng.choice(len(model.train_X), n, replace=False)].astype(np.float32)


def what_if(model: Any, n: int, seed: int, bases: int = 3) -> np.ndarray:
    """An analyst (or LIME/SHAP): a few inputs, 1–4 features nudged per query."""
    rng = np.random.default_rng(seed)
    base = model.train_X[rng.choice(len(model.train_X), bases, replace=False)]
    out = []
    for _ in range(n):
        x = base[rng.integers(bases)].copy()
        features = rng.choice(64, int(rng.integers(1, 5)), replace=False)
        x[features] = np.clip(x[features] + rng.integers(-4, 5, len(features)), 0, 16)
        out.append(x)
    return np.asarray(out, dtype=np.float32)


def gaussian_around(model: Any, n: int, seed: int) -> np.ndarray:
    """LIME's tabular sampler: every feature perturbed around one instance."""
    rng = np.random.default_rng(seed)
    x = model.train_X[rng.integers(len(model.train_X))]
    return np.clip(x + rng.normal(0, 2.0, (n, 64)), 0, 16).astype(np.float32)


def estimate(model: Any, held: HeldOut, X: np.ndarray) -> float:
    return fidelity(held, X, model.predict(X))


def test_fidelity_rises_with_natural_in_distribution_queries(model: Any, held: HeldOut) -> None:
    f = {n: np.mean([estimate(model, held, natural(model, n, s)) for s in range(3)])
         for n in (20, 100, 300)}
    assert f[20] < 0.85
    assert f[100] > f[20] + 0.05
    # BENCHMARKS.md: 300 natural queries give a copy that is ~96% faithful.
    assert f[300] == pytest.approx(0.96, abs=0.03)


@pytest.mark.parametrize("stream", [what_if, gaussian_around])
def test_local_exploration_stays_low(model: Any, held: HeldOut, stream: Any) -> None:
    for seed in range(3):
        assert estimate(model, held, stream(model, 1000, seed)) < 0.45


def test_single_class_streams_stay_low(model: Any, held: HeldOut) -> None:
    labels = model.predict(model.train_X)
    for c in range(10):
        X = model.train_X[labels == c].astype(np.float32)
        # A constant copy agrees on that class's share of the held-out rows (~10%).
        assert estimate(model, held, X) < 0.2, c


def test_sample_counts_distinct_pairs_keeps_a_cadence_and_stays_bounded(
    model: Any, held: HeldOut
) -> None:
    sample = RiskSample(64)
    X = model.train_X.astype(np.float32)
    y = model.predict(X).astype(np.int16)
    sample.add(X[:10], y[:10])
    sample.add(X[:10], y[:10])  # repeats are no new knowledge
    assert sample.distinct == 10
    sample.add(X[10:20], np.full(10, -1, dtype=np.int16))  # no answer: nothing learned
    assert sample.distinct == 10 and not sample.due()
    sample.add(X[20:26], y[20:26])
    assert sample.distinct == 16 and sample.due()  # a first estimate early ...
    sample.update(held)
    sample.add(X[26:89], y[26:89])
    assert not sample.due()  # ... then every 64 new pairs
    sample.add(X[89:90], y[89:90])
    assert sample.due()
    sample.update(held)
    assert not sample.due() and sample.estimated_at == 80
    # Folded in pieces, the surrogate is the 1-NN over everything the client asked.
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 16, (3000, 64)).astype(np.float32)
    noise_y = model.predict(noise).astype(np.int16)
    for start in range(0, 3000, 40):
        sample.add(noise[start : start + 40], noise_y[start : start + 40])
        if sample.due():
            sample.update(held)
    got = sample.update(held)
    everything = np.concatenate([X[:10], X[20:90], noise])
    labels = np.concatenate([y[:10], y[20:90], noise_y])
    assert got == pytest.approx(fidelity(held, everything, labels), abs=0.005)
    assert sample.peak >= got
    # Memory follows the held-out set, not the client's history.
    assert sample.memory_bytes() < 64 * 1024


# --- onRisk in the monitor --------------------------------------------------------------------

RISK_POLICY = POLICY.replace(
    "  detection:",
    "  output: {roundDigits: 2, tierHeader: x-tier,"
    " tiers: {strict: {labelOnly: true}, premium: {}}}\n  detection:",
).replace(
    "    onDetection: {quarantine: {duration: 1h}}\n",
    "    onDetection: {quarantine: {duration: 1h}}\n"
    "    onRisk:\n"
    "      steps:\n"
    "      - {fidelity: 0.8, harden: strict}\n"
    "      - {fidelity: 0.9, throttle: {requests: 30, per: minute}}\n"
    "      tiers: {premium: [{fidelity: 0.99, harden: strict}]}\n"
    "      duration: 2h\n",
)


def feed(model: Any, key: str, X: np.ndarray) -> feed_pb2.FeedBatch:
    out = feed_pb2.FeedBatch(node_id="n", policy="demo/digits-model")
    for row in X:
        proba = model.predict_proba(row[None])[0]
        out.queries.add(
            client_key=key,
            status=200,
            request_body=json.dumps({"instances": [row.tolist()]}).encode(),
            response_body=json.dumps({"predictions": [{"probabilities": proba.tolist()}]}).encode(),
        )
    return out


class Clock:
    now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_that_learned_a_lot_is_hardened_then_throttled_never_quarantined(
    model: Any,
) -> None:
    clock = Clock()
    sink = InMemoryVerdictSink()
    current = policies(RISK_POLICY)
    mon = ExtractionMonitor(
        lambda: current,
        VerdictStore(clock=clock),
        sink,
        profile=fixed_profile,
        held_out=digits_held_out,
        clock=clock,
    )
    learner = natural(model, 400, seed=7)
    explorer = what_if(model, 400, seed=8)
    for start in range(0, 400, 16):
        mon.report(feed(model, "learner", learner[start : start + 16]))
        mon.report(feed(model, "explorer", explorer[start : start + 16]))
        clock.now += 1
    # API keys are secrets: the listing names clients as admin answers do (fingerprints).
    learner_ref = ClientRef.of("demo/digits-model", "learner", "header", "x-api-key")
    explorer_ref = ClientRef.of("demo/digits-model", "explorer", "header", "x-api-key")
    risks = {key: (f, n) for _, key, f, n in mon.risks()}
    assert "learner" not in risks
    assert risks[learner_ref.shown][0] > 0.9 and risks[learner_ref.shown][1] == 400
    assert risks[explorer_ref.shown][0] < 0.45
    (hardened,) = mon.hardened.active()
    assert hardened.client.named_by("learner") and hardened.client.key == learner_ref.key
    # Clients of the premium tier may learn more (its own list); every other tier: strict.
    assert dict(hardened.tiers) == {"": "strict", "premium": ""}
    assert hardened.until == pytest.approx(clock.now + 7200, abs=400)
    throttle = mon.verdicts.of("throttle", "demo/digits-model", learner_ref.key)
    assert throttle is not None and throttle.reason == "risk" and throttle.requests == 30
    assert mon.verdicts.of("quarantine", "demo/digits-model", learner_ref.key) is None
    risk_verdicts = [v for v in sink.verdicts if v.stage == "risk"]
    assert [v.action for v in risk_verdicts] == ["harden", "throttle"]
    assert all(v.client.named_by("learner") for v in risk_verdicts)
    attrs = risk_verdicts[0].attributes()
    # The estimate when the step was reached: past it, and not past the latest.
    assert 0.8 <= attrs["modelguard.risk.fidelity"] <= risks[learner_ref.shown][0]
    assert attrs["modelguard.detector"] == "risk"
    # The sidecar's filter gets the override for the learner only.
    (policy,) = current
    config = filter_config(compile_one(policy, mon.hardened.active()), "n")
    # ... by the first 32 hex digits of its key's SHA-256, never the key (the filter hashes).
    assert config["riskOverrides"] == {learner_ref.key[:32]: {"": "strict", "premium": ""}}
    assert config["riskKeyDigest"] == 32
    assert "learner" not in json.dumps(config)
    # Released with its other verdicts.
    mon.release("learner")
    assert mon.hardened.active() == ()
    clock.now += 7201
    assert mon.verdicts.of("throttle", "demo/digits-model", learner_ref.key) is None


def test_harden_records_expire(model: Any) -> None:
    clock = Clock()
    current = policies(RISK_POLICY)
    mon = ExtractionMonitor(
        lambda: current,
        VerdictStore(clock=clock),
        InMemoryVerdictSink(),
        profile=fixed_profile,
        held_out=digits_held_out,
        clock=clock,
        idle_ttl=10**9,
    )
    mon.report(feed(model, "learner", natural(model, 200, seed=3)))
    assert len(mon.hardened.active()) == 1
    clock.now += 7201
    assert mon.hardened.active() == ()
    assert [h.client.named_by("learner") for h in mon.hardened.expire()] == [True]


# --- the API ------------------------------------------------------------------------------------

ON_RISK_BASE = POLICY.replace(
    "  detection:",
    "  output: {topK: 1, tierHeader: x-tier, tiers: {strict: {labelOnly: true}, premium: {}}}"
    "\n  detection:",
).replace("    onDetection: {quarantine: {duration: 1h}}\n", "    onRisk:\n")
P = "test[0] ExtractionPolicy demo/digits-model: spec.actions.onRisk."


@pytest.mark.parametrize(
    ("on_risk", "expected"),
    [
        (
            "      steps: [{fidelity: 0.6, harden: strict}, {fidelity: 0.5, harden: strict}]\n",
            [P + "steps[1].fidelity: must be above the previous step's 0.6: steps are listed "
             "from the lowest fidelity up"],
        ),
        (
            "      steps: [{fidelity: 0, harden: strict}, {fidelity: 1.5, harden: strict}]\n",
            [P + "steps[0].fidelity: must be greater than 0: every client starts at fidelity 0",
             P + "steps[1].fidelity: must be at most 1.0"],
        ),
        (
            "      steps: [{fidelity: 0.6}]\n",
            [P + "steps[0]: needs exactly one of harden or throttle"],
        ),
        (
            "      steps: [{fidelity: 0.6, harden: gold}]\n",
            [P + "steps[0].harden: no output tier 'gold' (spec.output.tiers has premium, strict)"],
        ),
        (
            "      steps: [{fidelity: 0.6, harden: strict}]\n"
            "      tiers: {gold: [{fidelity: 0.7, harden: strict}]}\n",
            [P + "tiers.gold: no output tier 'gold' (spec.output.tiers has premium, strict)"],
        ),
        (
            "      steps: [{fidelity: 0.6, harden: strict}]\n"
            "      tiers: {premium: [{fidelity: 0.7, throttle: {requests: 5, per: minute}}]}\n",
            [P + "tiers.premium[0].throttle: tier lists take harden steps only (the sidecar "
             "knows a client's tier, the control plane does not); put throttle steps in steps"],
        ),
        ("      steps: []\n", [P + "steps: must not be empty"]),
    ],
)
def test_on_risk_violations_name_their_field(on_risk: str, expected: list[str]) -> None:
    from controlplane.api import parse_documents

    _, found = parse_documents(ON_RISK_BASE + on_risk, "test")
    assert [str(v) for v in found] == expected


def test_harden_needs_output_tiers() -> None:
    from controlplane.api import parse_documents

    text = POLICY.replace(
        "    onDetection: {quarantine: {duration: 1h}}\n",
        "    onRisk: {steps: [{fidelity: 0.6, harden: strict}]}\n",
    )
    _, found = parse_documents(text, "test")
    assert [str(v) for v in found] == [
        P + "steps[0].harden: no output tier 'strict' (no spec.output.tiers)"
    ]


def test_quarantine_list_shows_each_clients_fidelity() -> None:
    from google.protobuf import timestamp_pb2

    from controlplane.app.quarantine_cli import render
    from controlplane.gen.modelguard.admin.v1 import admin_pb2

    until = timestamp_pb2.Timestamp(seconds=2_000_000_000)
    text = render(
        [
            admin_pb2.QuarantineEntry(
                kind="harden", policy="demo/d", client_key="k1", until=until, reason="risk",
                tier="strict", fidelity=0.934, distinct_queries=412,
            ),
            admin_pb2.QuarantineEntry(
                kind="estimate", policy="demo/d", client_key="k2", fidelity=0.21,
                distinct_queries=1200,
            ),
            admin_pb2.QuarantineEntry(kind="quarantine", policy="demo/d", client_key="k3",
                                      until=until, reason="prada"),
        ]
    )
    header, harden, estimate, quarantine = text.splitlines()
    assert header.split() == ["KIND", "POLICY", "CLIENT", "REMAINING", "REASON", "FIDELITY"]
    assert harden.startswith("harden strict") and harden.endswith("0.93 (412 q)")
    assert estimate.startswith("estimate") and estimate.endswith("0.21 (1,200 q)")
    assert quarantine.split()[-2:] == ["prada", "-"]


def test_on_risk_needs_reference_data() -> None:
    from controlplane.api import parse_documents

    text = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: guard, namespace: ml}
spec:
  targetRef: {service: fraud-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  output: {topK: 1, tierHeader: x-tier, tiers: {strict: {labelOnly: true}}}
  detection: {detectors: [prada]}
  actions:
    onRisk: {steps: [{fidelity: 0.6, harden: strict}]}
"""
    _, found = parse_documents(text, "test")
    assert [str(v) for v in found] == [
        "test[0] ExtractionPolicy ml/guard: spec.actions.onRisk: the extraction-risk estimate "
        "scores what a client learned on the model's own data: set spec.detection.reference "
        "(file or configMap, with labelColumn)"
    ]
