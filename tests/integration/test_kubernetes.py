"""The Kubernetes source, status writer and Lease against kmock (a Kubernetes API emulator
serving real HTTP), through the official ``kubernetes`` client.

kmock keeps objects as plain JSON and does not maintain ``metadata.generation``; the tests
set it as the API server would (bumped on every spec change).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes import client

from controlplane.compile.inputs.inventory import Inventory, Sidecar
from controlplane.compile.inputs.store import PolicyStore
from controlplane.crdgen import NAMES
from controlplane.sources.kubernetes import (
    KubernetesSource,
    LeaderElector,
    StatusWriter,
)
from tests.integration.conftest import (
    GROUP,
    VERSION,
    call,
    conditions,
    create_policy,
    read_policy,
    until,
)

SPECS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # kind → (a valid spec, a changed valid spec)
    "AccessPolicy": (
        {
            "targetRef": {"service": "digits-model"},
            "rules": [{"name": "predict", "action": "Allow", "to": {"paths": ["/v1/predict"]}}],
        },
        {"targetRef": {"service": "digits-model"}, "mode": "Audit"},
    ),
    "RatePolicy": (
        {
            "targetRef": {"service": "digits-model"},
            "limits": [
                {
                    "name": "burst",
                    "clientKey": {"header": "x-api-key"},
                    "requests": 5,
                    "per": "second",
                }
            ],
        },
        {
            "targetRef": {"service": "digits-model"},
            "shadow": True,
            "limits": [
                {
                    "name": "burst",
                    "clientKey": {"header": "x-api-key"},
                    "requests": 9,
                    "per": "minute",
                }
            ],
        },
    ),
    "ExtractionPolicy": (
        {
            "targetRef": {"service": "digits-model"},
            "clientKey": {"header": "x-api-key"},
            "request": {"features": "$.instances[*]"},
            "response": {"scores": "$.predictions[*].probabilities"},
        },
        {
            "targetRef": {"service": "digits-model"},
            "clientKey": {"header": "x-api-key"},
            "request": {"features": "$.instances[*]"},
            "response": {"scores": "$.predictions[*].probabilities"},
            "output": {"topK": 1},
        },
    ),
    "EgressPolicy": (
        {
            "targetRef": {"service": "digits-model"},
            "allow": [{"host": "a.example.com", "ports": [443]}],
        },
        {"targetRef": {"service": "digits-model"}, "mode": "Audit"},
    ),
}


@pytest.fixture
async def source(api_client: client.ApiClient) -> AsyncIterator[KubernetesSource]:
    src = KubernetesSource(api_client, PolicyStore(), Inventory(), retry_interval=0.1)
    src.start()
    try:
        await until(lambda: src.synced)
        yield src
    finally:
        await asyncio.to_thread(src.stop)


def custom(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def stored(src: KubernetesSource, kind: str) -> dict[str, Any]:
    return {
        p.metadata.name: p.spec.model_dump(by_alias=True, exclude_defaults=True)
        for p in src.store.current().of_kind(kind)
    }


@pytest.mark.parametrize("kind", sorted(SPECS))
async def test_create_update_delete_reaches_the_store(
    kind: str, source: KubernetesSource, api_client: client.ApiClient
) -> None:
    api, plural = custom(api_client), NAMES[kind].plural
    first, second = SPECS[kind]
    await create_policy(api_client, kind, "p1", first)
    await until(lambda: "p1" in stored(source, kind))
    assert stored(source, kind)["p1"] == first

    await call(
        api.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        "demo",
        plural,
        "p1",
        {"metadata": {"generation": 2}, "spec": second},
        _content_type="application/merge-patch+json",
    )
    merged = {**first, **second}
    await until(lambda: stored(source, kind).get("p1") == merged)
    assert source.observed()[(kind, "demo", "p1")].generation == 2

    await call(api.delete_namespaced_custom_object, GROUP, VERSION, "demo", plural, "p1")
    await until(lambda: "p1" not in stored(source, kind))
    assert (kind, "demo", "p1") not in source.observed()


async def test_objects_present_before_start_are_listed(api_client: client.ApiClient) -> None:
    await create_policy(api_client, "RatePolicy", "early", SPECS["RatePolicy"][0])
    src = KubernetesSource(api_client, PolicyStore(), retry_interval=0.1)
    src.start()
    try:
        await until(lambda: src.synced)
        assert "early" in stored(src, "RatePolicy")
    finally:
        await asyncio.to_thread(src.stop)


def writer(
    src: KubernetesSource,
    api_client: client.ApiClient,
    programmed: dict[str, bool] | None = None,
    sidecars: tuple[Sidecar, ...] = (),
) -> StatusWriter:
    return StatusWriter(
        api_client, src, lambda: True, lambda _key: programmed or {}, lambda: sidecars
    )


async def test_an_invalid_object_gets_accepted_false_with_every_violation(
    source: KubernetesSource, api_client: client.ApiClient
) -> None:
    bad = {
        "targetRef": {"service": "digits-model"},
        "limits": [{"name": "a", "clientKey": {"header": "x"}, "requests": 0, "per": "week"}],
    }
    await create_policy(api_client, "RatePolicy", "bad", bad, generation=3)
    await until(lambda: ("RatePolicy", "demo", "bad") in source.observed())
    status_writer = writer(source, api_client)
    await call(status_writer.write, await until(status_writer.changes))
    obj = await read_policy(api_client, "RatePolicy", "bad")
    accepted = conditions(obj)["Accepted"]
    assert accepted["status"] == "False" and accepted["reason"] == "Invalid"
    assert accepted["message"] == (
        "spec.limits[0].requests: must be greater than 0; "
        "spec.limits[0].per: must be one of second, minute, hour, day, month"
    )
    assert accepted["observedGeneration"] == 3 and obj["status"]["observedGeneration"] == 3
    assert conditions(obj)["Programmed"]["status"] == "False"
    assert stored(source, "RatePolicy") == {}  # nothing of it is enforced


async def test_status_follows_generation_and_counts_acked_sidecars(
    source: KubernetesSource, api_client: client.ApiClient
) -> None:
    api = custom(api_client)
    await create_policy(api_client, "AccessPolicy", "ap", SPECS["AccessPolicy"][0])
    await until(lambda: "ap" in stored(source, "AccessPolicy"))
    sidecars = (
        *tuple(
            Sidecar(
                f"digits-model-{i}.demo",
                "digits-model",
                "demo",
                "spiffe://cluster.local/ns/demo/sa/digits-model",
                8080,
                15006,
            )
            for i in range(3)
        ),
        Sidecar("other-0.demo", "other", "demo", "spiffe://x/y", 8080, 15006),
    )
    acked = {"digits-model-0.demo": True, "digits-model-1.demo": True, "other-0.demo": True}
    status_writer = writer(source, api_client, acked, sidecars)
    await call(status_writer.write, status_writer.changes())
    obj = await read_policy(api_client, "AccessPolicy", "ap")
    programmed = conditions(obj)["Programmed"]
    assert (programmed["status"], programmed["reason"]) == ("False", "Pending")
    assert programmed["message"] == "2 of 3 targeted sidecars ACKed"
    assert conditions(obj)["Accepted"]["status"] == "True"
    assert obj["status"]["observedGeneration"] == 1
    assert (obj["status"]["targetedSidecars"], obj["status"]["programmedSidecars"]) == (3, 2)

    # Nothing changed: nothing is written again (the watch brought our own write back).
    await until(lambda: source.observed()[("AccessPolicy", "demo", "ap")].status)
    writes = status_writer.writes
    await call(status_writer.write, status_writer.changes())
    assert status_writer.writes == writes

    await call(
        api.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        "demo",
        "accesspolicies",
        "ap",
        {"metadata": {"generation": 2}, "spec": {"mode": "Audit"}},
        _content_type="application/merge-patch+json",
    )
    await until(lambda: source.observed()[("AccessPolicy", "demo", "ap")].generation == 2)
    acked["digits-model-2.demo"] = True
    await call(status_writer.write, status_writer.changes())
    obj = await read_policy(api_client, "AccessPolicy", "ap")
    assert obj["status"]["observedGeneration"] == 2
    assert conditions(obj)["Programmed"] | {"lastTransitionTime": None} == {
        "type": "Programmed",
        "status": "True",
        "reason": "Programmed",
        "message": "3 of 3 targeted sidecars ACKed",
        "observedGeneration": 2,
        "lastTransitionTime": None,
    }
    assert conditions(obj)["Accepted"]["observedGeneration"] == 2


async def test_a_policy_for_a_missing_service_says_so(
    source: KubernetesSource, api_client: client.ApiClient
) -> None:
    await create_policy(api_client, "EgressPolicy", "eg", SPECS["EgressPolicy"][0])
    await until(lambda: "eg" in stored(source, "EgressPolicy"))
    status_writer = writer(source, api_client)
    await call(status_writer.write, status_writer.changes())
    programmed = conditions(await read_policy(api_client, "EgressPolicy", "eg"))["Programmed"]
    assert programmed["reason"] == "NoSidecars"
    assert programmed["message"] == "no sidecar targeted; Service demo/digits-model not found"


async def test_pods_and_endpointslices_correct_the_inventory(
    source: KubernetesSource, api_client: client.ApiClient
) -> None:
    assert source.inventory is not None
    # The sidecar announced itself with its app label; the pod backs Service "digits".
    source.inventory.observe(
        Sidecar(
            "digits-model-abc.demo",
            "digits-model",
            "demo",
            "spiffe://cluster.local/ns/demo/sa/d",
            8080,
            15006,
            labels=(("app", "digits-model"),),
        )
    )
    core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
    await call(
        core.create_namespaced_pod,
        "demo",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "digits-model-abc",
                "namespace": "demo",
                "labels": {"app": "digits-model", "tier": "gold"},
            },
            "spec": {"containers": [{"name": "model", "image": "m"}]},
        },
    )
    await call(
        discovery.create_namespaced_endpoint_slice,
        "demo",
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "addressType": "IPv4",
            "metadata": {
                "name": "digits-x1",
                "namespace": "demo",
                "labels": {"kubernetes.io/service-name": "digits"},
            },
            "endpoints": [
                {
                    "addresses": ["10.0.0.1"],
                    "targetRef": {"kind": "Pod", "name": "digits-model-abc"},
                }
            ],
        },
    )
    sidecar = await until(
        lambda: (s := source.inventory.get("digits-model-abc.demo")) and s.service == "digits" and s
    )
    assert sidecar.label_map == {"app": "digits-model", "tier": "gold"}

    await call(
        core.create_namespaced_service,
        "demo",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "digits", "namespace": "demo"},
            "spec": {"ports": [{"port": 80}]},
        },
    )
    await until(lambda: source.cluster.has_service("demo", "digits"))


async def test_api_keys_are_kept_as_hashes(
    source: KubernetesSource, api_client: client.ApiClient
) -> None:
    await call(
        client.CoreV1Api(api_client).create_namespaced_secret,
        "demo",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": "partner-keys",
                "namespace": "demo",
                "labels": {"modelguard.io/api-keys": "true"},
            },
            "data": {"acme": base64.b64encode(b"k-123").decode()},
        },
    )
    hashes = await until(lambda: source.api_keys.hashes("demo", "partner-keys"))
    assert hashes == {hashlib.sha256(b"k-123").hexdigest()}
    await call(client.CoreV1Api(api_client).delete_namespaced_secret, "partner-keys", "demo")
    await until(lambda: not source.api_keys.hashes("demo", "partner-keys"))


async def test_only_the_lease_holder_leads_and_a_dead_leader_is_replaced(
    api_client: client.ApiClient,
) -> None:
    now = [1000.0]
    a, b = (
        LeaderElector(
            api_client,
            "modelguard-system",
            name,
            lease_duration=15,
            renew_deadline=10,
            clock=lambda: now[0],
        )
        for name in ("replica-a", "replica-b")
    )
    assert await asyncio.to_thread(a.step) and a.is_leader
    assert not await asyncio.to_thread(b.step) and not b.is_leader
    now[0] += 5
    assert await asyncio.to_thread(a.step)  # renews
    assert not await asyncio.to_thread(b.step)
    # a stops renewing: it steps down after renew_deadline, b takes over after the lease.
    now[0] += 11
    assert not a.is_leader
    assert not await asyncio.to_thread(b.step)  # b saw the renewal 11 s ago: not expired yet
    now[0] += 5
    assert await asyncio.to_thread(b.step) and b.is_leader
    lease = await call(
        client.CoordinationV1Api(api_client).read_namespaced_lease,
        "modelguard-status-writer",
        "modelguard-system",
    )
    assert lease.spec.holder_identity == "replica-b" and lease.spec.lease_transitions == 1
    assert not await asyncio.to_thread(a.step)  # a, back, finds b's fresh lease


async def test_a_follower_writes_no_status(
    source: KubernetesSource, api_client: client.ApiClient
) -> None:
    await create_policy(api_client, "RatePolicy", "r", SPECS["RatePolicy"][0])
    await until(lambda: "r" in stored(source, "RatePolicy"))
    follower = StatusWriter(api_client, source, lambda: False, lambda _key: {}, tuple)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop, interval=0.01))
    await asyncio.sleep(0.2)
    stop.set()
    await task
    assert follower.writes == 0
    assert "status" not in await read_policy(api_client, "RatePolicy", "r")


async def test_api_key_secrets_are_read_only_in_the_namespaces_granted(
    api_client: client.ApiClient,
) -> None:
    """--api-key-namespaces: one namespaced watch each (RBAC: a Role per namespace), no
    cluster-wide Secret access; a relist of one namespace keeps the other's keys."""
    core = client.CoreV1Api(api_client)

    def secret(namespace: str, name: str, key: bytes) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"modelguard.io/api-keys": "true"},
            },
            "data": {"k": base64.b64encode(key).decode()},
        }

    for namespace, key in (("demo", b"d-1"), ("partners", b"p-1"), ("elsewhere", b"e-1")):
        await call(core.create_namespaced_secret, namespace, secret(namespace, "keys", key))
    src = KubernetesSource(
        api_client, PolicyStore(), Inventory(), retry_interval=0.1,
        secret_namespaces=["demo", "partners"],
    )  # fmt: skip
    src.start()
    try:
        await until(lambda: src.synced)
        await until(lambda: src.api_keys.hashes("demo", "keys"))
        await until(lambda: src.api_keys.hashes("partners", "keys"))
        assert not src.api_keys.hashes("elsewhere", "keys")
        assert {w.kwargs.get("namespace") for w in src._watched if "secrets" in w.name} == {
            "demo",
            "partners",
        }
    finally:
        await asyncio.to_thread(src.stop)
