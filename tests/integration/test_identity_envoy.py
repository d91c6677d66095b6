"""Identities an attacker cannot mint (issue 14), end to end: a real control plane with its
CA and registered keys, a real Envoy sidecar, a real demo model, the real Wasm query feed.

(a) the embedded default refuses made-up and missing keys before the model sees them;
(b) a uniform-noise attack split over the ten keys of one tenant is quarantined as one
    cohort, and another tenant keeps being answered;
(c) the keys of one tenant share one daily budget;
(d) the hardening tier comes from the verified key, not from a header the caller sends.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from controlplane.app import runner
from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.identity.apikeys import digest
from controlplane.identity.service import IdentityConfig
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import http_request
from tests.conftest import DIGITS_REFERENCE, demo_sidecar
from tests.integration.polling import eventually

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parents[2]
DIGIT = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12,
         0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0,
         0, 0, 0, 6, 13, 10, 0, 0, 0]


@dataclass
class System:
    plane: ControlPlane
    envoy: EnvoyProcess
    port: int
    model_port: int

    async def predict(
        self, headers: dict[str, str], row: list[float] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        body = json.dumps({"instances": [row if row is not None else DIGIT]}).encode()
        return await asyncio.to_thread(
            http_request,
            "POST",
            f"http://127.0.0.1:{self.port}/v1/predict",
            body,
            {"content-type": "application/json", **headers},
        )

    async def model_requests(self) -> int:
        _, _, body = await asyncio.to_thread(
            http_request, "GET", f"http://127.0.0.1:{self.model_port}/v1/stats"
        )
        return int(json.loads(body)["predict_requests"])

    async def quarantines(self) -> list[admin_pb2.QuarantineEntry]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.plane.admin_port}") as channel:
            listed = await admin_pb2_grpc.QuarantinesStub(channel).ListQuarantines(
                admin_pb2.ListQuarantinesRequest(include_throttles=True), timeout=5
            )
        return list(listed.entries)


def key_secret(path: Path, keys: dict[str, tuple[str, str, str]]) -> None:
    """A key Secret (digests only) of id → (key, tenant, tier)."""
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": "demo-keys",
                    "namespace": "demo",
                    "annotations": {
                        "modelguard.io/keys": yaml.safe_dump(
                            {i: {"tenant": t, "tier": tier} for i, (_, t, tier) in keys.items()}
                        )
                    },
                },
                "stringData": {i: f"sha256:{digest(k)}" for i, (k, _, _) in keys.items()},
            }
        )
    )


@asynccontextmanager
async def identity_system(
    tmp_path: Path, policies: Path, key_paths: tuple[str, ...], model_port: int
) -> AsyncIterator[System]:
    """The embedded default's wiring (controlplane/app/runner.py), on free ports."""
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(policies),),
            xds_port=0,
            admin_port=0,
            debounce_quiet=0.05,
            debounce_max=0.3,
            watch=False,
            verdicts_path=str(tmp_path / "state" / "verdicts.json"),  # profiles cached there
            identity=IdentityConfig(
                directory=str(tmp_path / "identity"), api_key_paths=key_paths
            ),
        )
    )
    await plane.start()
    envoy: EnvoyProcess | None = None
    try:
        assert plane.identity is not None
        envoy, listen = demo_sidecar(
            model_port,
            plane.xds_port,
            tmp_path / "envoy.log",
            identity_dir=plane.identity.config.directory,
        )
        envoy.start()
        await asyncio.to_thread(envoy.wait_ready, 30)
        system = System(plane, envoy, listen, model_port)
        yield system
    finally:
        if envoy is not None:
            envoy.stop()
        await plane.stop(grace=0)


@pytest.fixture
async def embedded(
    tmp_path: Path, start_model: Callable[[], tuple[str, int]]
) -> AsyncIterator[tuple[System, dict[str, str]]]:
    """The embedded default: policies/ as shipped, the demo keys as `make run` writes them."""
    _, model_port = await asyncio.to_thread(start_model)
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    folder, keys = runner.demo_keys(tmp_path / "run")
    assert (tmp_path / "run" / "demo-keys.txt").stat().st_mode & 0o777 == 0o600
    assert not any(k in (folder / "demo-keys.yaml").read_text() for k in keys.values())
    async with identity_system(tmp_path, policies, (str(folder),), model_port) as system:
        await eventually(
            lambda: system.predict({"x-api-key": keys["acme-standard"]}),
            timeout=20,
        )
        yield system, keys


async def _answered(system: System, key: str) -> bool:
    return (await system.predict({"x-api-key": key}))[0] == 200


async def test_a_made_up_and_missing_keys_never_reach_the_model(
    embedded: tuple[System, dict[str, str]],
) -> None:
    system, keys = embedded
    await eventually(lambda: _answered(system, keys["acme-standard"]), timeout=20)
    before = await system.model_requests()
    assert before >= 1  # the counter counts: the registered key reached the model
    statuses = []
    for i in range(200):  # a fresh made-up key every 20 queries
        status, _, body = await system.predict({"x-api-key": f"made-up-{i // 20}"})
        statuses.append(status)
        if i == 0:
            assert json.loads(body)["reason"] == "rbac_access_denied_matched_policy[none]"
    for _ in range(20):  # no key at all, and forged internal headers
        status, _, _ = await system.predict(
            {"x-modelguard-key-id": "acme-standard", "x-modelguard-tenant": "acme"}
        )
        statuses.append(status)
    assert set(statuses) <= {401, 403} and len(statuses) == 220
    assert await system.model_requests() == before


def _digits(answer: bytes) -> int:
    probabilities = json.loads(answer)["predictions"][0]["probabilities"]
    return max(len(repr(p).split(".")[1]) if "." in repr(p) else 0 for p in probabilities)


async def test_d_the_tier_is_the_verified_keys_not_the_callers_header(
    embedded: tuple[System, dict[str, str]],
) -> None:
    system, keys = embedded
    await eventually(lambda: _answered(system, keys["acme-premium"]), timeout=20)
    row = [float(v) for v in DIGIT]
    standard = {"x-api-key": keys["acme-standard"]}
    premium = {"x-api-key": keys["acme-premium"]}
    # policies/extraction.yaml: standard {topK: 1, roundDigits: 2}, premium {topK: 3,
    # roundDigits: 3}: the premium key gets three non-zero scores at 3 digits.
    for headers, forged, top, digits in (
        (standard, None, 1, 2),
        (standard, "premium", 1, 2),  # a standard caller claiming premium: still standard
        (standard, "internal", 1, 2),  # an unknown tier: not the unhardened answer
        (premium, None, 3, 3),
        (premium, "standard", 3, 3),  # the verified tier wins over the caller's header
    ):
        sent = dict(headers)
        if forged is not None:
            sent["x-modelguard-tier"] = forged
        status, _, answer = await system.predict(sent, row)
        assert status == 200, answer
        scores = json.loads(answer)["predictions"][0]["probabilities"]
        assert sum(1 for p in scores if p > 0) <= top, (forged, scores)
        assert _digits(answer) <= digits, (forged, scores)
    # And the premium key really is less hardened (the test could fail): more digits.
    _, _, p_answer = await system.predict(premium, row)
    _, _, s_answer = await system.predict(standard, row)
    assert _digits(p_answer) == 3 and _digits(s_answer) <= 2


BUDGET = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  mtls: {mode: Permissive}
  defaultAction: Deny
  rules:
  - action: Allow
    from: {apiKeys: {secretRef: demo-keys}}
---
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  limits:
  - {name: daily, clientKey: {apiKey: {groupBy: tenant}}, requests: 5, per: day, scope: Global}
"""


async def test_c_the_keys_of_a_tenant_share_one_daily_budget(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(BUDGET)
    keys = {f"acme-{i}": (f"acme-key-{i}", "acme", "standard") for i in range(4)}
    keys["globex-0"] = ("globex-key-0", "globex", "standard")
    key_secret(tmp_path / "keys.yaml", keys)
    async with identity_system(
        tmp_path, policies, (str(tmp_path / "keys.yaml"),), demo_model[1]
    ) as system:
        # The first request of a new tenant passes before its assignment arrives.
        await eventually(lambda: _answered(system, "acme-key-0"), timeout=20)

        async def assigned() -> bool:
            return any(u.clients for u in await system.plane.rate_limits.budgets.usage())

        await eventually(assigned)
        codes = []
        for i in range(8):  # round robin over the tenant's other keys
            status, _, _ = await system.predict({"x-api-key": f"acme-key-{1 + i % 3}"})
            codes.append(status)
        # Five per day for the tenant: whichever key asks, the budget is the tenant's (one
        # more may pass while the first assignment is on its way, as for any new client).
        passed = codes.index(429) if 429 in codes else len(codes)
        assert passed in (4, 5) and set(codes[passed:]) == {429}, codes
        for i in range(4):
            assert (await system.predict({"x-api-key": f"acme-key-{i}"}))[0] == 429
        assert (await system.predict({"x-api-key": "globex-key-0"}))[0] == 200
        usage = await system.plane.rate_limits.budgets.usage()
        # The budget is counted for the tenant, never for a key (let alone the key itself).
        assert {c.client for u in usage for c in u.clients} == {"acme", "globex"}


COHORT = """\
apiVersion: modelguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  mtls: {mode: Permissive}
  defaultAction: Deny
  rules:
  - action: Allow
    from: {apiKeys: {secretRef: demo-keys}}
---
apiVersion: modelguard.io/v1alpha1
kind: ExtractionPolicy
metadata: {name: digits-model, namespace: demo}
spec:
  targetRef: {service: digits-model}
  clientKey: {apiKey: {groupBy: tenant}}
  request: {features: "$.instances[*]"}
  response: {scores: "$.predictions[*].probabilities"}
  detection:
    detectors: [prada, nearDuplicate, outOfDistribution, coverage]
    reference: {file: REFERENCE, labelColumn: label}
  actions:
    onDetection: {quarantine: {duration: 1h}}
""".replace("REFERENCE", str(DIGITS_REFERENCE))


async def test_b_noise_split_over_a_tenants_keys_is_quarantined_as_one_cohort(
    tmp_path: Path, demo_model: tuple[str, int], profile_cache: Callable[[Path], Path]
) -> None:
    profile_cache(tmp_path / "state")  # the digits profile, calibrated once per session
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(COHORT)
    keys = {f"acme-{i}": (f"acme-key-{i}", "acme", "standard") for i in range(10)}
    keys["globex-0"] = ("globex-key-0", "globex", "standard")
    key_secret(tmp_path / "keys.yaml", keys)
    rng = np.random.default_rng(7)
    async with identity_system(
        tmp_path, policies, (str(tmp_path / "keys.yaml"),), demo_model[1]
    ) as system:
        await eventually(lambda: _answered(system, "globex-key-0"), timeout=20)

        def calibrated() -> bool:
            found = system.plane.extraction.profiles.conditions().get("demo/digits-model")
            return found is not None and found.status == "True"

        await eventually(calibrated, timeout=60)
        sent = 0
        quarantined: list[admin_pb2.QuarantineEntry] = []
        while sent < 1000 and not quarantined:
            for i in range(10):  # one query per key, round robin: 10 keys, one tenant
                row = [float(v) for v in rng.uniform(0, 16, 64)]
                await system.predict({"x-api-key": f"acme-key-{i}"}, row)
                sent += 1
            quarantined = [q for q in await system.quarantines() if q.kind == "quarantine"]
        assert quarantined, f"no quarantine after {sent} queries"
        assert sent <= 1000
        print(f"cohort quarantined after {sent} queries over 10 keys")
        # One cohort, named by its tenant: never a key, never ten separate clients.
        assert [(q.client_key, q.key_source) for q in quarantined] == [("acme", "header")]

        async def every_key_refused() -> bool:
            codes = [
                (await system.predict({"x-api-key": f"acme-key-{i}"}))[0] for i in range(10)
            ]
            return set(codes) == {403}

        await eventually(every_key_refused, timeout=15)
        for _ in range(5):
            assert (await system.predict({"x-api-key": "globex-key-0"}))[0] == 200


def _jwt_tools() -> tuple[str, Callable[[str], str]]:
    import base64
    import time

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    key = rsa.generate_private_key(65537, 2048)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    n = key.public_key().public_numbers()
    jwks = json.dumps({"keys": [{
        "kty": "RSA", "alg": "RS256", "use": "sig", "kid": "k1",
        "n": b64(n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")),
        "e": b64(n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")),
    }]})

    def token(sub: str) -> str:
        head = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
        body = b64(json.dumps(
            {"iss": "https://login.example.com", "sub": sub, "exp": int(time.time()) + 600}
        ).encode())
        signature = key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{head}.{body}.{b64(signature)}"

    return jwks, token


async def test_a_jwt_claim_keys_the_feed_and_the_quarantine_end_to_end(
    tmp_path: Path, demo_model: tuple[str, int]
) -> None:
    jwks, token = _jwt_tools()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        COHORT.replace(
            "    from: {apiKeys: {secretRef: demo-keys}}",
            "    from: {jwt: {issuer: 'https://login.example.com', jwks: "
            + json.dumps(jwks)
            + "}}",
        ).replace("clientKey: {apiKey: {groupBy: tenant}}", "clientKey: {jwtClaim: sub}")
    )
    key_secret(tmp_path / "keys.yaml", {"unused": ("unused-key", "t", "standard")})
    rng = np.random.default_rng(11)
    alice = {"authorization": f"Bearer {token('alice')}"}
    bob = {"authorization": f"Bearer {token('bob')}"}
    async with identity_system(
        tmp_path, policies, (str(tmp_path / "keys.yaml"),), demo_model[1]
    ) as system:
        await eventually(lambda: system.predict(bob), timeout=20)
        sent = 0
        quarantined: list[admin_pb2.QuarantineEntry] = []
        while sent < 1000 and not quarantined:
            for _ in range(10):
                await system.predict(alice, [float(v) for v in rng.uniform(0, 16, 64)])
                sent += 1
            quarantined = [q for q in await system.quarantines() if q.kind == "quarantine"]
        # The Wasm filter fed alice's queries under her verified subject, and the verdict
        # names it (the header the sidecar set from the token, never the token).
        assert [(q.client_key, q.key_source) for q in quarantined] == [("alice", "header")]

        async def alice_refused() -> bool:
            return (await system.predict(alice))[0] == 403

        await eventually(alice_refused, timeout=15)
        assert (await system.predict(bob))[0] == 200
        # A forged claim header does not make bob alice, nor alice bob.
        assert (await system.predict({**bob, "x-modelguard-jwt-sub": "alice"}))[0] == 200
        assert (await system.predict({**alice, "x-modelguard-jwt-sub": "bob"}))[0] == 403
