"""Identity in cluster mode, against kmock (TokenReview, ConfigMaps, Secrets) with the
official client, and a real Envoy started from the injector's own bootstrap:

* the sidecar sends its projected token over xDS-over-TLS; the control plane reviews it
  (off the loop) and only then gives it configuration and an SVID;
* a token the API server rejects, or one of another service account, gets nothing;
* the kubelet rotating the token file is seen by Envoy: the next stream carries the new one;
* the trust bundle ConfigMap is published where it is missing or stale;
* API keys of labelled Secrets reach compile's input beside the --api-keys files.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client

from controlplane.app.cluster import cluster_authenticator
from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.compile.inputs.inventory import Inventory
from controlplane.compile.inputs.store import PolicyStore
from controlplane.identity import kubernetes as k8s_identity
from controlplane.identity.service import IdentityConfig, IdentityService
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port
from controlplane.sidecar import inject
from controlplane.sources.kubernetes import KubernetesSource
from tests.integration.conftest import call, until

POD, NAMESPACE, ACCOUNT = "digits-model-0", "demo", "digits-model"
NODE_ID = f"{POD}.{NAMESPACE}"


@dataclass
class TokenReviews:
    """What the API server knows: token → (service account username, bound pod)."""

    emulator: kmock.KubernetesEmulator
    valid: dict[str, tuple[str, str]] = field(default_factory=dict)
    seen: list[str] = field(default_factory=list)

    def answer(self, request: kmock.Request) -> dict[str, Any]:
        # kmock keeps every created object; an API server keeps no TokenReview (they have
        # no name, so the next one would conflict).
        with contextlib.suppress(KeyError):
            del self.emulator.objects["authentication.k8s.io/v1/tokenreviews", None, None]
        spec = request.data["spec"]
        token = spec["token"]
        self.seen.append(token)
        status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
        if token in self.valid and spec.get("audiences") == ["modelguard"]:
            username, pod = self.valid[token]
            status = {
                "authenticated": True,
                "audiences": ["modelguard"],
                "user": {
                    "username": username,
                    "extra": {"authentication.kubernetes.io/pod-name": [pod]},
                },
            }
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": spec,
            "status": status,
        }


@pytest.fixture
def reviews(cluster: kmock.KubernetesEmulator) -> TokenReviews:
    state = TokenReviews(cluster)
    resource = kmock.resource("authentication.k8s.io", "v1", "tokenreviews")
    cluster["post", resource] << state.answer
    return state


class TokenDir:
    """A projected token volume as the kubelet writes it: ``token`` → ``..data/token``,
    replaced by renaming a new ``..data`` symlink into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()
        self.generation = 0

    def write(self, token: str) -> None:
        self.generation += 1
        version = self.path / f"..gen{self.generation}"
        version.mkdir()
        (version / "token").write_text(token)
        tmp = self.path / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.path / "..data")
        if not (self.path / "token").is_symlink():
            (self.path / "token").symlink_to("..data/token")


def injected_bootstrap(xds_port: int, bundle: Path, tokens: Path) -> tuple[dict[str, Any], int]:
    """The bootstrap `modelguard inject` gives the demo pod, as the kubelet expands it, with
    the pod's mount paths moved to ``bundle`` and ``tokens``."""
    admin = free_port()
    config = inject.InjectConfig(
        xds_address=f"127.0.0.1:{xds_port}", admin_port=admin, inbound_port=free_port()
    )
    bootstrap = inject.sidecar_bootstrap(config, "digits-model", free_port(), 15006, {})
    text = json.dumps(bootstrap)
    pod = {"POD_NAME": POD, "POD_NAMESPACE": NAMESPACE, "SERVICE_ACCOUNT": ACCOUNT}
    for var, value in pod.items():
        text = text.replace(f"$({var})", value)
    text = text.replace(k8s_identity.TRUST_BUNDLE_DIR, str(bundle))
    text = text.replace(k8s_identity.TOKEN_DIR, str(tokens))
    result: dict[str, Any] = json.loads(text)
    return result, admin


@dataclass
class Cluster:
    planes: list[ControlPlane]
    envoy: EnvoyProcess
    tokens: TokenDir
    reviews: TokenReviews
    restart: Callable[[], Any]

    @property
    def plane(self) -> ControlPlane:
        return self.planes[-1]


@pytest.fixture
async def sidecar(
    api_client: client.ApiClient, reviews: TokenReviews, tmp_path: Path
) -> AsyncIterator[Cluster]:
    xds_port, admin_port = free_port(), free_port()
    identity = IdentityConfig(directory=str(tmp_path / "identity"))

    def make_plane() -> ControlPlane:
        return ControlPlane(
            ControlPlaneConfig(
                policy_paths=(),
                xds_port=xds_port,
                admin_port=admin_port,
                watch=False,
                identity=identity,
                debounce_quiet=0.02,
                debounce_max=0.2,
            ),
            authenticator=cluster_authenticator(api_client, identity),
        )

    planes = [make_plane()]
    await planes[0].start()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    tokens = TokenDir(tmp_path / "token")
    for name, text in k8s_identity.trust_bundle_data(
        planes[0].identity.ca.root_pem if planes[0].identity else "", str(tokens.path / "token")
    ).items():
        (bundle / name).write_text(text)
    bootstrap, envoy_admin = injected_bootstrap(xds_port, bundle, tokens.path)
    envoy = EnvoyProcess(bootstrap, admin_port=envoy_admin, log_path=tmp_path / "envoy.log")

    async def restart() -> None:
        await planes[-1].stop(grace=0)
        planes.append(make_plane())
        await planes[-1].start()

    state = Cluster(planes, envoy, tokens, reviews, restart)
    try:
        yield state
    finally:
        envoy.stop()
        await planes[-1].stop(grace=0)


def _has_svid(plane: ControlPlane) -> bool:
    return plane.identity is not None and plane.identity.certificate(NODE_ID) is not None


@pytest.mark.envoy
async def test_a_sidecar_with_its_service_account_token_is_served(sidecar: Cluster) -> None:
    sidecar.reviews.valid["token-1"] = (f"system:serviceaccount:{NAMESPACE}:{ACCOUNT}", POD)
    sidecar.tokens.write("token-1")
    sidecar.envoy.start()
    await asyncio.to_thread(sidecar.envoy.wait_ready, 20)
    assert _has_svid(sidecar.plane)
    dump = await asyncio.to_thread(sidecar.envoy.config_dump, "dynamic_active_secrets")
    secrets = json.dumps(dump)
    assert "modelguard.svid" in secrets
    # The token went to the API server (TLS to us, then TokenReview), never elsewhere.
    assert sidecar.reviews.seen and set(sidecar.reviews.seen) == {"token-1"}

    # The kubelet rotates the token; the old one stops being valid. The next stream (the
    # control plane restarts) carries the new one, read from disk by Envoy.
    sidecar.reviews.valid["token-2"] = sidecar.reviews.valid.pop("token-1")
    sidecar.tokens.write("token-2")
    await asyncio.sleep(0.3)  # Envoy's directory watch fires on the rename
    before = len(sidecar.reviews.seen)
    await sidecar.restart()
    await until(lambda: _has_svid(sidecar.plane), timeout=15)
    assert set(sidecar.reviews.seen[before:]) == {"token-2"}


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("valid", "why"),
    [
        # The API server does not know the token.
        ({}, "service-account token rejected: invalid bearer token"),
        # A genuine token of another service account cannot claim this one's identity.
        (
            {"token-1": (f"system:serviceaccount:{NAMESPACE}:intruder", POD)},
            f"but its token is service account {NAMESPACE}/intruder",
        ),
    ],
)
async def test_a_sidecar_without_a_valid_token_gets_nothing(
    sidecar: Cluster,
    valid: dict[str, tuple[str, str]],
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sidecar.reviews.valid.update(valid)
    sidecar.tokens.write("token-1")
    sidecar.envoy.start()
    await until(lambda: len(sidecar.reviews.seen) >= 1, timeout=15)
    # Several reconnects later: still nothing, and failures are cached (no review storm).
    await asyncio.sleep(1.5)
    assert not _has_svid(sidecar.plane)
    assert sidecar.plane.inventory.snapshot() == ()
    dump = await asyncio.to_thread(sidecar.envoy.config_dump)
    assert "dynamic_active_clusters" not in json.dumps(dump)
    assert len(sidecar.reviews.seen) <= 2
    assert why in caplog.text  # the refusal is logged with its reason


# ---- the trust bundle ConfigMap --------------------------------------------------------


async def test_the_trust_bundle_is_published_where_missing_or_stale(
    cluster: kmock.KubernetesEmulator, api_client: client.ApiClient, tmp_path: Path
) -> None:
    # kmock cannot serve /api/v1/namespaces itself: the namespaces are given here, as
    # with --watch-namespace; the cluster-wide listing is one list_namespace call.
    cluster.resources["v1/configmaps"] = kmock.ResourceInfo(namespaced=True)
    core = client.CoreV1Api(api_client)
    await call(
        core.create_namespaced_config_map,
        "ml",
        {"metadata": {"name": "modelguard-ca-root", "namespace": "ml"}, "data": {"x": "old"}},
    )
    service = IdentityService(IdentityConfig(directory=str(tmp_path)))
    leader = [False]
    bundle = k8s_identity.TrustBundle(
        api_client, service.ca.root_pem, namespaces=["demo", "ml"], is_leader=lambda: leader[0]
    )
    assert await call(bundle.sync) == 0  # a follower writes nothing
    leader[0] = True
    assert await call(bundle.sync) == 2
    for name in ("demo", "ml"):
        cm = await call(core.read_namespaced_config_map, "modelguard-ca-root", name)
        assert cm.data[k8s_identity.ROOT_CERT_KEY] == service.ca.root_pem
        assert "modelguard-sa-token" in cm.data[k8s_identity.TOKEN_SDS_KEY]
    assert await call(bundle.sync) == 0  # nothing changed, nothing written


# ---- API keys: files and Secrets, one input --------------------------------------------


async def test_api_keys_from_secrets_and_files_reach_compile_as_one_input(
    api_client: client.ApiClient, tmp_path: Path
) -> None:
    files = tmp_path / "keys.yaml"
    files.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: file-keys, namespace: demo}\n"
        "stringData: {ops: ops-key}\n"
    )
    service = IdentityService(
        IdentityConfig(directory=str(tmp_path / "identity"), api_key_paths=(str(files),))
    )
    source = KubernetesSource(api_client, PolicyStore(), Inventory(), retry_interval=0.1)
    service.api_key_sources.append(source.api_keys.digests)
    source.start()
    try:
        await until(lambda: source.synced)
        digest_b = hashlib.sha256(b"b-key").hexdigest()
        await call(
            client.CoreV1Api(api_client).create_namespaced_secret,
            "demo",
            {
                "metadata": {
                    "name": "partner-keys",
                    "namespace": "demo",
                    "labels": {"modelguard.io/api-keys": "true"},
                    # Issue 14: tenant and tier of each key, as in --api-keys files.
                    "annotations": {
                        "modelguard.io/tenant": "partner",
                        "modelguard.io/keys": "partner-b: {tier: premium}\n",
                    },
                },
                "data": {
                    # A trailing newline, as `echo key | base64` leaves it, is not the key.
                    "partner-a": base64.b64encode(b"a-key\n").decode(),
                    "partner-b": base64.b64encode(f"sha256:{digest_b}".encode()).decode(),
                    "broken": base64.b64encode(b"sha256:nothex").decode(),
                },
            },
        )
        await until(lambda: source.api_keys.hashes("demo", "partner-keys"))
        assert service.reload_api_keys()
        keys = service.mesh_inputs(()).api_keys
        assert {
            ref: tuple((k.id, k.digest, k.tenant, k.tier) for k in found)
            for ref, found in keys.items()
        } == {
            ("demo", "file-keys"): (("ops", hashlib.sha256(b"ops-key").hexdigest(), "ops", ""),),
            ("demo", "partner-keys"): (
                ("partner-a", hashlib.sha256(b"a-key").hexdigest(), "partner", ""),
                ("partner-b", digest_b, "partner", "premium"),
            ),
        }
        await call(client.CoreV1Api(api_client).delete_namespaced_secret, "partner-keys", "demo")
        await until(lambda: not source.api_keys.hashes("demo", "partner-keys"))
        assert service.reload_api_keys()
        assert set(service.mesh_inputs(()).api_keys) == {("demo", "file-keys")}
    finally:
        await asyncio.to_thread(source.stop)
