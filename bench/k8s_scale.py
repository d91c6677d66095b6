"""What the Kubernetes source costs the control plane at 5,000 pods (issue 15, "Scale"):
CPU per Pod event, per EndpointSlice event, per sidecar connect and per status pass.

A real control plane (not started: no ports, no debounced rebuilds) with the real
Kubernetes source, status writer and ProgramTracker. Watch events are handed to the
source's own event handler, as its watch threads do with what the API server streams; no
API server is involved, so the figures are the control plane's alone. Sidecars connect
through the server's connect hook (``ControlPlane._on_connect``), with the node metadata
``modelguard bootstrap`` writes. Every sidecar gets a compiled snapshot, which the sync
status records as ACKed, so a status pass has the real work to do.

Cluster: ``--pods`` pods over ``--services`` Services in 5 namespaces, one EndpointSlice of
up to 100 endpoints per 100 pods, ``--policies`` policies (Access and Rate, by Service;
every fifth by label selector). The pods of ``--connects`` sidecars are in the cluster
from the start; those sidecars connect during the measurement.

Measured (CPU seconds of this process, ``time.process_time``, per operation):
* a Pod event: a label of one running pod changes (MODIFIED);
* an EndpointSlice event: one endpoint leaves a slice, and comes back;
* a connect: a sidecar of a listed pod connects;
* a status pass: what the Lease holder computes every 0.5 s (``StatusWriter.changes``),
  after a Pod event and one sidecar's new ACK, and again with nothing changed.

    .venv/bin/python bench/k8s_scale.py [--pods 5000] [--replicas 2] [--json out.json]

``--replicas 2``: this replica holds every other pod's sidecar; the rest are another
replica's, reported (all ACKed) through a Redis started here, and "Programmed N of M" counts
both (``SharedStatus``). Its publishing step (a thread, every 0.5 s) is measured too.

To measure another checkout (e.g. main, before a change) with the same script:

    PYTHONPATH=/path/to/checkout .venv/bin/python bench/k8s_scale.py
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from envoy.config.core.v3 import base_pb2  # type: ignore[import-untyped]
from google.protobuf import json_format, struct_pb2
from kubernetes import client
from lib.load import start_redis, stop

import controlplane
from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.sources.kubernetes import KubernetesSource, ProgramTracker, StatusWriter
from controlplane.xds.status import StreamKind

NAMESPACES = 5
GOALS_MS = {"pod_event": 5.0, "connect": 5.0, "status_pass": 20.0}


def pod_name(service: str, i: int) -> str:
    return f"{service}-{i:05d}"


class Cluster:
    """The objects the API server would stream, as JSON."""

    def __init__(self, pods: int, services: int) -> None:
        self.services = [(f"ns-{s % NAMESPACES}", f"svc-{s:03d}") for s in range(services)]
        self.pods: list[tuple[str, str, str]] = []  # namespace, pod name, service
        for i in range(pods):
            namespace, service = self.services[i % services]
            self.pods.append((namespace, pod_name(service, i), service))
        self.by_service: dict[tuple[str, str], list[str]] = {}
        for namespace, pod, service in self.pods:
            self.by_service.setdefault((namespace, service), []).append(pod)

    @staticmethod
    def pod(namespace: str, name: str, service: str, version: int = 0) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {
                    "app": service,
                    "version": f"v{version}",
                    "sidecar.modelguard.io/injected": "true",
                },
            },
            "spec": {"serviceAccountName": service},
        }

    @staticmethod
    def endpoint_slice(namespace: str, service: str, index: int, pods: list[str]) -> dict[str, Any]:
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service}-{index}",
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": service},
            },
            "endpoints": [
                {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": pod}}
                for pod in pods
            ],
        }

    def slices(self) -> list[dict[str, Any]]:
        out = []
        for (namespace, service), pods in self.by_service.items():
            for index in range(0, len(pods), 100):
                out.append(
                    self.endpoint_slice(namespace, service, index // 100, pods[index : index + 100])
                )
        return out

    def policies(self, count: int) -> list[dict[str, Any]]:
        out = []
        for i in range(count):
            namespace, service = self.services[i % len(self.services)]
            kind = ("AccessPolicy", "RatePolicy")[i % 2]
            target: dict[str, Any] = (
                {"selector": {"matchLabels": {"app": service}}}
                if i % 5 == 4
                else {"service": service}
            )
            spec: dict[str, Any] = {"targetRef": target}
            if kind == "AccessPolicy":
                spec["rules"] = [{"name": "predict", "action": "Allow", "to": {"paths": ["/p"]}}]
            else:
                spec["limits"] = [
                    {
                        "name": "burst",
                        "clientKey": {"header": "x-api-key"},
                        "requests": 10 + i,
                        "per": "second",
                    }
                ]
            out.append(
                {
                    "apiVersion": "modelguard.io/v1alpha1",
                    "kind": kind,
                    "metadata": {"name": f"p-{i:03d}", "namespace": namespace, "generation": 1},
                    "spec": spec,
                }
            )
        return out


def node_of(namespace: str, pod: str, service: str) -> base_pb2.Node:
    sidecar = Sidecar(
        node_id=f"{pod}.{namespace}",
        service=service,
        namespace=namespace,
        identity=f"spiffe://cluster.local/ns/{namespace}/sa/{service}",
        app_port=8080,
        inbound_port=15006,
        labels=(("app", service), ("version", "v0")),
    )
    metadata = struct_pb2.Struct()
    json_format.ParseDict(sidecar.to_metadata(), metadata)
    return base_pb2.Node(id=sidecar.node_id, metadata=metadata)


def cpu_ms(fn: Callable[[], Any]) -> float:
    started = time.process_time()
    fn()
    return (time.process_time() - started) * 1e3


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "mean_ms": round(statistics.fmean(ordered), 3),
        "p50_ms": round(ordered[len(ordered) // 2], 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
        "max_ms": round(ordered[-1], 3),
        "n": len(ordered),
    }


def mark_synced(plane: ControlPlane, node_ids: list[str]) -> None:
    """Record, as the ADS server would, that each node was sent and ACKed its snapshot."""
    sync = plane.sync_status
    for node_id in node_ids:
        snapshot = plane.cache.get(node_id)
        if snapshot is None:
            continue
        node = sync.connect(node_id, StreamKind.SOTW, "bench")
        sync.set_target(node, snapshot.version)
        for type_url in snapshot.type_urls():
            version = snapshot.type_version(type_url)
            sync.set_type_target(node, type_url, version)
            sync.sent(node, type_url, version, "n", 0)
            sync.acked(node, type_url, version, "n")


def run(
    pods: int,
    services: int,
    policies: int,
    events: int,
    connects: int,
    passes: int,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """With ``redis_url``: two replicas, this one holding every other pod's sidecar and the
    other replica's report (the rest, all ACKed) in Redis, as ``SharedStatus`` shares them."""
    cluster = Cluster(pods, services)
    replicas = 2 if redis_url else 1
    local_pods = cluster.pods[::replicas]
    remote_pods = [p for i, p in enumerate(cluster.pods) if i % replicas]
    plane = ControlPlane(ControlPlaneConfig(policy_paths=(), xds_port=0, admin_port=0, watch=False))
    api_client = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))
    source = KubernetesSource(api_client, plane.store, plane.inventory)
    watched = {w.name: w for w in source._watched}

    def event(resource: str, kind: str, obj: dict[str, Any]) -> None:
        source._handle(watched[resource], {"type": kind, "object": obj})

    setup_started = time.perf_counter()
    # Setup (not measured): the cluster is listed first, then sidecars connect with the
    # source's inventory listeners set aside, and the inventory is corrected once; what is
    # measured afterwards takes the real paths.
    for namespace, service in cluster.services:
        event("services", "ADDED", {"metadata": {"namespace": namespace, "name": service}})
    for namespace, pod, service in cluster.pods:
        event("pods", "ADDED", cluster.pod(namespace, pod, service))
    for obj in cluster.slices():
        event("endpointslices", "ADDED", obj)
    for obj in cluster.policies(policies):
        plural = {"AccessPolicy": "accesspolicies", "RatePolicy": "ratepolicies"}[obj["kind"]]
        event(plural, "ADDED", obj)
    late = local_pods[:connects]  # their sidecars connect while measured
    listeners = list(plane.inventory._listeners)
    plane.inventory._listeners.clear()
    for namespace, pod, service in local_pods[connects:]:
        plane._on_connect(node_of(namespace, pod, service))
    # Before the indexes, the source corrected sidecars in one pass over all of them
    # (with its own listener set aside: each correction would start another pass).
    getattr(source, "_reconcile_inventory", lambda: None)()
    plane.inventory._listeners.extend(listeners)
    tracker = ProgramTracker(plane.store, plane.pipeline, plane.sync_status, plane.cache)
    sidecars: Callable[[], tuple[Sidecar, ...]] = plane.inventory.snapshot
    programmed: Callable[[Any], Any] = tracker.nodes
    shared = remote = None
    if redis_url:
        from controlplane import cluster_status

        versions = getattr(cluster_status, "VersionsOf", None)
        local_versions = (
            versions(plane.store.current)
            if versions is not None
            else lambda: cluster_status.versions_of(plane.store.current().policies)
        )
        compact: dict[str, Any] = {}
        if "serving" in inspect.signature(cluster_status.SharedStatus).parameters:
            compact = {"serving": tracker.serving, "compiled": tracker.compiled}
        shared = cluster_status.SharedStatus(
            redis_url, "here", plane.inventory.snapshot, tracker.nodes, local_versions, **compact
        )
        others = tuple(
            dataclasses.replace(
                Sidecar.from_metadata(
                    node.id, json_format.MessageToDict(node_of(namespace, pod, service).metadata)
                ),
                labels=tuple(
                    sorted(cluster.pod(namespace, pod, service)["metadata"]["labels"].items())
                ),
            )
            for namespace, pod, service in remote_pods
            for node in [node_of(namespace, pod, service)]
        )
        remote = cluster_status.SharedStatus(
            redis_url,
            "there",
            lambda: others,
            lambda key: {s.node_id: True for s in others},
            lambda: cluster_status.versions_of(plane.store.current().policies),
        )
        remote.step()
        shared.step()
        sidecars, programmed = shared.sidecars, shared.programmed
    writer = StatusWriter(api_client, source, lambda: True, programmed, sidecars)
    plane.pipeline.rebuild()
    mark_synced(plane, plane.cache.node_ids())
    assert len(plane.inventory.snapshot()) == len(local_pods) - connects
    setup_seconds = time.perf_counter() - setup_started
    gc.collect()
    gc.freeze()  # the setup's objects are not what the measured operations cost

    pod_events, slice_events, connect_costs = [], [], []
    step = max(1, (len(local_pods) - connects) // events)
    for k, (namespace, pod, service) in enumerate(local_pods[connects::step][:events]):
        obj = cluster.pod(namespace, pod, service, version=k + 1)
        pod_events.append(cpu_ms(lambda obj=obj: event("pods", "MODIFIED", obj)))
    slice_objs = cluster.slices()
    for k in range(events):
        obj = slice_objs[k % len(slice_objs)]
        fewer = {**obj, "endpoints": obj["endpoints"][1:]}
        slice_events.append(cpu_ms(lambda fewer=fewer: event("endpointslices", "MODIFIED", fewer)))
        slice_events.append(cpu_ms(lambda obj=obj: event("endpointslices", "MODIFIED", obj)))
    for namespace, pod, service in late:
        node = node_of(namespace, pod, service)
        connect_costs.append(cpu_ms(lambda node=node: plane._on_connect(node)))
    corrected = plane.inventory.get(f"{late[0][1]}.{late[0][0]}")
    assert (
        corrected is not None and ("sidecar.modelguard.io/injected", "true") in corrected.labels
    ), "a connecting sidecar was not corrected by its pod"

    busy_passes, idle_passes, publishes = [], [], []
    writer.changes()  # the first pass after start fills what later passes reuse
    nodes = [n for n in plane.cache.node_ids()]
    for k in range(passes):
        namespace, pod, service = local_pods[connects + k]
        event("pods", "MODIFIED", cluster.pod(namespace, pod, service, version=1000 + k))
        mark_synced(plane, [nodes[k % len(nodes)]])
        if shared is not None and remote is not None:
            remote.step()  # the other replica's process, not this one's CPU
            publishes.append(cpu_ms(shared.step))  # this replica's thread, every 0.5 s
        busy_passes.append(cpu_ms(writer.changes))
        idle_passes.append(cpu_ms(writer.changes))
    gc.unfreeze()
    changes = writer.changes()
    done = [status["programmedSidecars"] for _, status in changes]
    if shared is not None and remote is not None:
        shared.stop()
        remote.stop()
    return {
        "checkout": os.path.dirname(os.path.dirname(os.path.abspath(controlplane.__file__))),
        "pods": pods,
        "services": services,
        "policies": policies,
        "setup_seconds": round(setup_seconds, 1),
        "pod_event": summary(pod_events),
        "endpointslice_event": summary(slice_events),
        "connect": summary(connect_costs),
        "status_pass": summary(busy_passes),
        "status_pass_idle": summary(idle_passes),
        "programmed_sidecars_total": sum(done),
        "replicas": replicas,
        **({"status_publish": summary(publishes)} if publishes else {}),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=5000)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--policies", type=int, default=20)
    parser.add_argument("--events", type=int, default=50, help="Pod and EndpointSlice events")
    parser.add_argument("--connects", type=int, default=50)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument(
        "--replicas",
        type=int,
        choices=[1, 2],
        default=1,
        help="2: status over two replicas' sidecars, shared through a Redis started here",
    )
    parser.add_argument("--json", help="write the figures here as well")
    args = parser.parse_args()
    redis_process = None
    redis_url = None
    if args.replicas == 2:
        redis_process, redis_url = start_redis()
    try:
        figures = run(
            args.pods,
            args.services,
            args.policies,
            args.events,
            args.connects,
            args.passes,
            redis_url,
        )
    finally:
        if redis_process is not None:
            stop(redis_process)
    print(json.dumps(figures, indent=2))
    for name, goal in GOALS_MS.items():
        mean = figures[name]["mean_ms"]
        verdict = "ok" if mean <= goal else "OVER"
        print(f"{name}: {mean:.2f} ms CPU mean (goal <= {goal:g} ms): {verdict}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
