"""The Kubernetes source at scale (issue 15): Pods read by the injector's label and in
pages, and an event re-corrects only the sidecars it concerns.

Against kmock extended with label selectors and paginated lists (``kmock_paging.py``),
through the official ``kubernetes`` client; the pipeline is the real one (compile,
translate, snapshots), not started as a server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kmock_paging import PagingKubernetesEmulator, selector_matches
from kubernetes import client

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.sidecar.inject import INJECTED_LABEL, INJECTED_SELECTOR
from controlplane.sources.kubernetes import KubernetesSource
from tests.integration.conftest import call, create_policy, until

pytestmark = pytest.mark.kmock(cls=PagingKubernetesEmulator)

POD_LIST = "/api/v1/pods"


@pytest.fixture
async def plane() -> ControlPlane:
    return ControlPlane(ControlPlaneConfig(policy_paths=(), xds_port=0, admin_port=0))


@pytest.fixture
async def source(api_client: client.ApiClient, plane: ControlPlane) -> AsyncIterator[Any]:
    src = KubernetesSource(
        api_client,
        plane.store,
        plane.inventory,
        retry_interval=0.1,
        pod_selector=INJECTED_SELECTOR,
        page_size=5,
    )
    yield src
    await asyncio.to_thread(src.stop)


def pod(name: str, labels: dict[str, str], injected: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "labels": {**labels, **({INJECTED_LABEL: "true"} if injected else {})},
        },
        "spec": {"containers": [{"name": "model", "image": "m"}], "serviceAccountName": "d"},
    }


def endpoint_slice(name: str, service: str, pods: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "name": name,
            "namespace": "demo",
            "labels": {"kubernetes.io/service-name": service},
        },
        "endpoints": [
            {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": p}} for p in pods
        ],
    }


def sidecar(pod_name: str, service: str = "digits-model") -> Sidecar:
    return Sidecar(
        f"{pod_name}.demo",
        service,
        "demo",
        "spiffe://cluster.local/ns/demo/sa/d",
        8080,
        15006,
        labels=(("app", service),),
    )


def test_the_fakes_selector_is_the_api_servers() -> None:
    labels = {"app": "a", INJECTED_LABEL: "true"}
    assert selector_matches(INJECTED_SELECTOR, labels)
    assert selector_matches("app=a,app!=b", labels)
    assert selector_matches("!tier", labels)
    assert not selector_matches(INJECTED_SELECTOR, {"app": "a"})
    assert not selector_matches("tier", labels)


async def test_pods_are_listed_by_the_injectors_label_in_pages_to_the_end(
    cluster: PagingKubernetesEmulator, api_client: client.ApiClient, source: KubernetesSource
) -> None:
    core = client.CoreV1Api(api_client)
    for i in range(23):
        await call(core.create_namespaced_pod, "demo", pod(f"model-{i:02d}", {"app": "m"}))
    for i in range(4):  # a workload without a sidecar
        await call(
            core.create_namespaced_pod, "demo", pod(f"other-{i}", {"app": "o"}, injected=False)
        )
    source.start()
    await until(lambda: source.synced)

    assert sorted(name for _, name in source.cluster.pods) == [f"model-{i:02d}" for i in range(23)]
    pod_lists = [entry for entry in cluster.lists if entry["path"] == POD_LIST]
    # 23 pods in pages of 5: five requests, each with the selector, each after the first
    # continuing where the one before stopped.
    assert len(pod_lists) == 5
    assert all(e["labelSelector"] == INJECTED_SELECTOR and e["limit"] == "5" for e in pod_lists)
    assert pod_lists[0]["continue"] is None
    assert all(e["continue"] for e in pod_lists[1:])
    assert len({e["continue"] for e in pod_lists[1:]}) == 4

    # The watch has the selector too: a pod without the label never arrives, and a pod
    # whose label is removed leaves.
    await call(core.create_namespaced_pod, "demo", pod("late", {"app": "m"}))
    await call(core.create_namespaced_pod, "demo", pod("late-other", {"app": "o"}, False))
    await until(lambda: ("demo", "late") in source.cluster.pods)
    await call(
        core.patch_namespaced_pod,
        "model-00",
        "demo",
        {"metadata": {"labels": {INJECTED_LABEL: "false"}}},
    )
    await until(lambda: ("demo", "model-00") not in source.cluster.pods)
    assert ("demo", "late-other") not in source.cluster.pods


async def test_a_relist_in_pages_forgets_what_was_deleted_meanwhile(
    api_client: client.ApiClient, source: KubernetesSource
) -> None:
    core = client.CoreV1Api(api_client)
    for i in range(12):
        await call(core.create_namespaced_pod, "demo", pod(f"model-{i:02d}", {"app": "m"}))
    source.start()
    await until(lambda: source.synced)
    watched = next(w for w in source._watched if w.name == "pods")
    await call(core.delete_namespaced_pod, "model-07", "demo")
    await until(lambda: ("demo", "model-07") not in source.cluster.pods)
    source.cluster.set_pod(("demo", "ghost"), source.cluster.pods[("demo", "model-01")])
    await call(source._list, watched)  # three pages; "ghost" is on none of them
    assert ("demo", "ghost") not in source.cluster.pods
    assert len(source.cluster.pods) == 11


async def test_a_pod_event_reaches_only_its_own_sidecar(
    api_client: client.ApiClient, source: KubernetesSource, plane: ControlPlane
) -> None:
    core, discovery = client.CoreV1Api(api_client), client.DiscoveryV1Api(api_client)
    names = [f"model-{i}" for i in range(4)]
    for name in names:
        await call(core.create_namespaced_pod, "demo", pod(name, {"app": "digits-model"}))
        plane.inventory.observe(sidecar(name))
    await call(
        discovery.create_namespaced_endpoint_slice,
        "demo",
        endpoint_slice("digits-model-1", "digits-model", names),
    )
    # A policy for the gold tier only: a sidecar's IR changes when its pod becomes gold.
    await create_policy(
        api_client,
        "RatePolicy",
        "gold",
        {
            "targetRef": {"selector": {"matchLabels": {"tier": "gold"}}},
            "limits": [
                {
                    "name": "burst",
                    "clientKey": {"header": "x-api-key"},
                    "requests": 5,
                    "per": "second",
                }
            ],
        },
    )
    source.start()
    await until(lambda: source.synced and plane.store.current().policies)
    inventory = plane.inventory
    await until(lambda: all(dict(s.labels).get(INJECTED_LABEL) for s in inventory.snapshot()))
    plane.pipeline.rebuild()
    before = {s.node_id: s for s in inventory.snapshot()}
    versions = {n: plane.cache.get(n).version for n in before}  # type: ignore[union-attr]
    rebuilds: list[Any] = []
    plane.pipeline.observers.append(rebuilds.append)
    corrected: list[str] = []  # node ids the source's corrector ran for

    def counting(announced: Sidecar) -> Sidecar:
        corrected.append(announced.node_id)
        return source.correct(announced)

    inventory.correct_with(counting)
    corrected.clear()

    await call(
        core.patch_namespaced_pod, "model-2", "demo", {"metadata": {"labels": {"tier": "gold"}}}
    )
    await until(lambda: dict(inventory.get("model-2.demo").labels).get("tier") == "gold")  # type: ignore[union-attr]
    after = {s.node_id: s for s in inventory.snapshot()}
    # The other sidecars were not looked at, let alone changed.
    assert corrected == ["model-2.demo"]
    assert [n for n in after if after[n] is not before[n]] == ["model-2.demo"]
    plane.pipeline.rebuild()
    assert rebuilds[-1].changed == ("model-2.demo",)
    assert [n for n in versions if plane.cache.get(n).version != versions[n]] == [  # type: ignore[union-attr]
        "model-2.demo"
    ]

    # An EndpointSlice event: model-3 now backs Service "digits" (and no longer
    # digits-model): its sidecar is named by it; the others stay as they were.
    corrected.clear()
    await call(
        discovery.patch_namespaced_endpoint_slice,
        "digits-model-1",
        "demo",
        endpoint_slice("digits-model-1", "digits-model", names[:3]),
    )
    await call(
        discovery.create_namespaced_endpoint_slice,
        "demo",
        endpoint_slice("digits-1", "digits", ["model-3"]),
    )
    await until(lambda: inventory.get("model-3.demo").service == "digits")  # type: ignore[union-attr]
    assert sorted(set(corrected)) == ["model-3.demo"]
    moved = {s.node_id: s for s in inventory.snapshot()}
    assert [n for n in moved if moved[n] is not after[n]] == ["model-3.demo"]
    assert source.cluster.services_of("demo", "model-3") == ["digits"]
    assert source.cluster.services_of("demo", "model-0") == ["digits-model"]

    # A sidecar connecting later is corrected at once, from its pod, without any event.
    await call(core.create_namespaced_pod, "demo", pod("model-9", {"app": "digits-model"}))
    await until(lambda: ("demo", "model-9") in source.cluster.pods)
    plane.inventory.observe(sidecar("model-9"))
    assert dict(inventory.get("model-9.demo").labels).get(INJECTED_LABEL) == "true"  # type: ignore[union-attr]
