"""The extraction-risk estimate end to end: real Envoy, real demo model, real gRPC feed.

A client that extracts the model with natural, in-distribution queries (which no detector
sees) crosses its onRisk step and gets the stricter tier's hardening (label-only answers)
from the sidecar's Wasm filter; a client exploring around a few inputs keeps the default
hardening; the same learner under the premium tier, whose own list allows more, keeps its
tier's answers. The estimates are visible through the admin API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_extraction_envoy import System, calibrated, start_system, until

from controlplane.extraction.verdicts import ClientRef
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.local.model import load_model
from controlplane.netutil import http_request
from tests.conftest import DIGITS_REFERENCE

pytestmark = pytest.mark.envoy

POLICY = """\
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {header: x-api-key}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  output:
    roundDigits: 2
    tierHeader: x-tier
    tiers: {strict: {labelOnly: true}, premium: {roundDigits: 3}}
  detection:
    reference: {file: REFERENCE, labelColumn: label}
  actions:
    onRisk:
      steps: [{fidelity: 0.8, harden: strict}]
      tiers: {premium: [{fidelity: 0.99, harden: strict}]}
""".replace("REFERENCE", str(DIGITS_REFERENCE))


@pytest.fixture
async def system(tmp_path: Path, demo_model: tuple[str, int]) -> AsyncIterator[System]:
    async with await start_system(tmp_path, demo_model[1], POLICY) as system:
        await calibrated(system.plane)  # the held-out rows come with the policy's profile
        yield system


async def scores(system: System, key: str, row: list[float], tier: str | None = None) -> Any:
    headers = {"content-type": "application/json", "x-api-key": key}
    if tier is not None:
        headers["x-tier"] = tier
    status, _, answer = await asyncio.to_thread(
        http_request,
        "POST",
        f"http://127.0.0.1:{system.listen_port}/v1/predict",
        json.dumps({"instances": [row]}).encode(),
        headers,
    )
    assert status == 200, answer
    return json.loads(answer)["predictions"][0]["probabilities"]


def label_only(probabilities: list[float]) -> bool:
    return sorted(probabilities) == [0.0] * (len(probabilities) - 1) + [1.0]


def what_if(model: Any, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = model.train_X[rng.choice(len(model.train_X), 2, replace=False)]
    out = []
    for _ in range(n):
        x = base[rng.integers(2)].copy()
        features = rng.choice(64, int(rng.integers(1, 4)), replace=False)
        x[features] = np.clip(x[features] + rng.integers(-3, 4, len(features)), 0, 16)
        out.append(x)
    return np.asarray(out)


async def test_a_client_past_its_fidelity_step_gets_the_stricter_tier_others_keep_theirs(
    system: System,
) -> None:
    model = load_model(0)
    # An uncertain digit: its answer has several non-zero scores under every hardening
    # but label-only.
    probe = [float(v) for v in model.test_X[np.argmin(model.predict_proba(model.test_X).max(1))]]
    assert not label_only(await scores(system, "learner", probe))
    rng = np.random.default_rng(0)
    natural = model.train_X[rng.choice(len(model.train_X), 320, replace=False)]
    for start in range(0, len(natural), 32):
        assert set(await system.query("learner", natural[start : start + 32])) == {200}
    assert set(await system.query("explorer", what_if(model, 240, seed=1))) == {200}

    # The learner's answers become label-only; the explorer keeps the default rounding.
    await until(lambda: _label_only(system, "learner", probe))
    explorer = await scores(system, "explorer", probe)
    assert not label_only(explorer) and all(round(p, 2) == p for p in explorer)
    # Under the premium tier the learner is below its tier's step: premium's answers.
    premium = await scores(system, "learner", probe, tier="premium")
    assert not label_only(premium) and any(round(p, 2) != p for p in premium)
    assert not label_only(await scores(system, "explorer", probe, tier="premium"))

    # Named as every admin answer names a raw API key: by fingerprint.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{system.admin_port}") as channel:
        listed = await admin_pb2_grpc.QuarantinesStub(channel).ListQuarantines(
            admin_pb2.ListQuarantinesRequest(include_throttles=True, include_estimates=True),
            timeout=5,
        )
    entries = {e.client_key: e for e in listed.entries}
    learner = entries[ClientRef.of("demo/digits-model", "learner").shown]
    explorer_entry = entries[ClientRef.of("demo/digits-model", "explorer").shown]
    assert learner.kind == "harden" and learner.reason == "risk"
    assert learner.HasField("fidelity") and learner.fidelity >= 0.8
    assert learner.distinct_queries >= 300
    assert explorer_entry.kind == "estimate" and explorer_entry.fidelity < 0.5

    # Released with its other verdicts: default hardening again.
    assert [e.kind for e in await system.release("learner")] == []
    await until(lambda: _not_label_only(system, "learner", probe))


async def _label_only(system: System, key: str, row: list[float]) -> bool:
    return label_only(await scores(system, key, row))


async def _not_label_only(system: System, key: str, row: list[float]) -> bool:
    return not label_only(await scores(system, key, row))
