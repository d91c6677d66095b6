"""Cluster mode: ``modelguard serve --kubernetes``.

Wires the Kubernetes source, the status writer, the trust bundle publisher and the
injection webhook around one control plane. Kept apart from ``sources/kubernetes/`` so
the source (the first box of the data flow) never imports the server it feeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane.app.cliutil import port_number
from controlplane.identity.kubernetes import KubernetesTokenAuthenticator, TrustBundle
from controlplane.sources.kubernetes import (
    Condition,
    KubernetesSource,
    LeaderElector,
    ProgramTracker,
    StatusWriter,
)

if TYPE_CHECKING:
    from controlplane.extraction.feed import ProfileBook

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster mode")
    group.add_argument(
        "--kubernetes",
        action="store_true",
        help="read policies and inventory from the cluster, write status",
    )
    group.add_argument("--kubeconfig", help="default: in-cluster config, else ~/.kube/config")
    group.add_argument("--watch-namespace", help="watch one namespace (default: all)")
    group.add_argument(
        "--lease-namespace",
        default="modelguard-system",
        help="namespace of the Lease that picks the replica writing policy status",
    )
    group.add_argument(
        "--pod-selector",
        default=None,
        help="label selector of the Pods read for the inventory (default: the label the "
        "injector sets, sidecar.modelguard.io/injected=true; '': every pod)",
    )
    group.add_argument(
        "--api-key-namespaces",
        help="comma-separated namespaces whose Secrets labelled modelguard.io/api-keys=true "
        "are read (RBAC: a Role there); default: every namespace (a ClusterRole)",
    )
    group.add_argument("--replica-id", help="this replica's name in the Lease (default: host)")
    group.add_argument(
        "--webhook-host", default="0.0.0.0", help="where the injection webhook listens"
    )
    group.add_argument("--webhook-port", type=port_number, default=9443, help="0: no webhook")
    group.add_argument("--webhook-cert-dir", help="tls.crt and tls.key of the webhook")
    group.add_argument(
        "--sidecar-xds",
        default="modelguard.modelguard-system.svc:18000",
        help="control plane address injected sidecars use",
    )
    group.add_argument(
        "--sidecar-outbound-port",
        type=port_number,
        default=15001,
        help="outbound (egress) port of sidecars injected into pods annotated "
        "modelguard.io/egress: enabled",
    )


class NoClusterConfig(RuntimeError):
    """Neither the pod's service account nor a kubeconfig gives an API server to talk to."""


def api_client_from_args(args: argparse.Namespace) -> Any:
    from kubernetes import client, config

    try:
        if args.kubeconfig:
            config.load_kube_config(args.kubeconfig)  # type: ignore[no-untyped-call]
        else:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as err:
        where = f"--kubeconfig {args.kubeconfig}" if args.kubeconfig else (
            "not in a pod (no service account), and no ~/.kube/config or $KUBECONFIG"
        )
        raise NoClusterConfig(f"no Kubernetes API server to talk to: {where}: {err}") from err
    return client.ApiClient()


def cluster_authenticator(api_client: Any, identity: Any) -> KubernetesTokenAuthenticator | None:
    """Sidecars prove who they are with their pod's projected service-account token
    (TokenReview). Bootstrap tokens are not accepted in a cluster: their key is per replica."""
    if identity is None:
        return None
    from kubernetes import client

    return KubernetesTokenAuthenticator(
        client.AuthenticationV1Api(api_client),
        trust_domain=identity.trust_domain,
        background=True,
    )


def kubernetes_configmaps(api_client: Any) -> Any:
    """Reads a ConfigMap key's bytes (``binaryData`` is base64, e.g. a .npy file)."""
    import base64

    from kubernetes import client

    core = client.CoreV1Api(api_client)

    def read(namespace: str, name: str, key: str) -> bytes:
        configmap = core.read_namespaced_config_map(name, namespace)
        if configmap.binary_data and key in configmap.binary_data:
            return base64.b64decode(configmap.binary_data[key])
        if configmap.data and key in configmap.data:
            return str(configmap.data[key]).encode()
        raise ValueError(f"ConfigMap {namespace}/{name} has no key {key!r}")

    return read


def calibrated_conditions(profiles: ProfileBook, key: tuple[str, str, str]) -> list[Condition]:
    """An ExtractionPolicy's Calibrated condition, as the monitor's profiles report it."""
    kind, namespace, name = key
    if kind != "ExtractionPolicy":
        return []
    found = profiles.conditions().get(f"{namespace}/{name}")
    if found is None:
        return []
    return [Condition("Calibrated", found.status, found.reason, found.message)]


def serve_cluster(args: argparse.Namespace, plane_config: Any) -> int:
    """Run the control plane in a cluster until interrupted; returns the exit code."""
    import socket

    from controlplane.app.server import ControlPlane
    from controlplane.sidecar.inject import INJECTED_SELECTOR, InjectConfig
    from controlplane.sidecar.webhook import InjectionWebhook

    api_client = api_client_from_args(args)
    replica_id = args.replica_id or socket.gethostname()
    config = dataclasses.replace(plane_config, policy_paths=(), watch=False, replica_id=replica_id)

    async def main() -> None:
        authenticator = cluster_authenticator(api_client, config.identity)
        plane = ControlPlane(config, authenticator=authenticator)
        tracker = ProgramTracker(plane.store, plane.pipeline, plane.sync_status, plane.cache)
        secret_namespaces = (
            [ns.strip() for ns in args.api_key_namespaces.split(",") if ns.strip()]
            if args.api_key_namespaces
            else None
        )
        source = KubernetesSource(
            api_client,
            plane.store,
            plane.inventory,
            args.watch_namespace,
            secret_namespaces=secret_namespaces,
            pod_selector=(
                INJECTED_SELECTOR
                if getattr(args, "pod_selector", None) is None
                else args.pod_selector
            ),
        )
        elector = LeaderElector(api_client, args.lease_namespace, replica_id)
        bundle = None
        if plane.identity is not None:
            # One input of API-key digests: --api-keys files and the labelled Secrets.
            plane.identity.api_key_sources.append(source.api_keys.digests)
            bundle = TrustBundle(
                api_client,
                plane.identity.ca.root_pem,
                namespaces=[args.watch_namespace] if args.watch_namespace else None,
                is_leader=lambda: elector.is_leader,
            )
        sidecars: Any = plane.inventory.snapshot
        programmed: Any = tracker.nodes
        shared_status = None
        if config.rate_limit_backend.startswith(("redis://", "rediss://", "unix://")):
            # "Programmed N of M" over every replica's sidecars, not only the leader's.
            from controlplane.cluster_status import SharedStatus, VersionsOf

            shared_status = SharedStatus(
                config.rate_limit_backend,
                replica_id,
                plane.inventory.snapshot,
                tracker.nodes,
                VersionsOf(plane.store.current),
                serving=tracker.serving,
                compiled=tracker.compiled,
            )
            sidecars, programmed = shared_status.sidecars, shared_status.programmed
        writer = StatusWriter(
            api_client,
            source,
            lambda: elector.is_leader,
            programmed,
            sidecars,
        )
        # ExtractionPolicies: reference data from ConfigMaps, Calibrated in their status.
        plane.extraction.profiles.configmaps = kubernetes_configmaps(api_client)
        writer.extra_conditions = lambda key: calibrated_conditions(plane.extraction.profiles, key)
        webhook = None
        if args.webhook_port:
            cert_dir = Path(args.webhook_cert_dir) if args.webhook_cert_dir else None
            webhook = InjectionWebhook(
                InjectConfig(
                    xds_address=args.sidecar_xds,
                    identity=config.identity is not None,
                    trust_domain=getattr(config.identity, "trust_domain", "cluster.local"),
                    outbound_port=args.sidecar_outbound_port,
                ),
                args.webhook_host,
                args.webhook_port,
                str(cert_dir / "tls.crt") if cert_dir else None,
                str(cert_dir / "tls.key") if cert_dir else None,
                ready=lambda: source.synced,
            )
            webhook.start()
        source.start()
        await plane.start()
        plane.install_signal_handlers()
        if shared_status is not None:
            shared_status.start()
        elector.start()
        if bundle is not None:
            bundle.start()
        stop = asyncio.Event()
        status_task = asyncio.create_task(writer.run(stop))
        print(
            f"modelguard control plane (cluster mode): xDS on {config.xds_host}:"
            f"{plane.xds_port}, admin on {config.admin_host}:{plane.admin_port}",
            flush=True,
        )
        try:
            await plane.wait_closed()
        finally:
            # Sidecars first (no new calls, GOAWAY, streams end: they reconnect to another
            # replica), then the Lease is released so another replica writes status at once.
            stop.set()
            await status_task
            if shared_status is not None:
                shared_status.stop()
            await plane.stop(config.shutdown_grace)
            elector.stop(release=True)
            if bundle is not None:
                bundle.stop()
            if authenticator is not None:
                authenticator.close()
            source.stop()
            if webhook is not None:
                webhook.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
