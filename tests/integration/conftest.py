"""Set-up shared by the integration tests: a control plane and one demo sidecar (a real
Envoy) in front of a model, as most end-to-end tests start them; and the kmock-backed
Kubernetes API server (``cluster``) with the official client (``api_client``).

Test modules import ``Deployment`` as ``tests.integration.conftest`` (as the resilience
tests import theirs) and subclass it to add their own clients; a fixture reads

    async with await System.start(tmp_path, app_port, {"policy.yaml": POLICY}) as system:
        yield system
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import kmock
import pytest
from kubernetes import client

from controlplane.app.adminauth import is_loopback
from controlplane.app.server import ControlPlane, ControlPlaneConfig, SidecarService
from controlplane.crdgen import NAMES
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port
from tests.conftest import demo_sidecar


@dataclass
class Deployment:
    """A control plane serving the policy files of ``policies`` and one sidecar
    (``digits-model-0`` by default) in front of the workload on ``app_port``."""

    plane: ControlPlane
    envoy: EnvoyProcess
    listen_port: int  # the sidecar's inbound listener
    policies: Path
    config: ControlPlaneConfig
    services: Sequence[SidecarService] = field(default_factory=tuple)

    @property
    def xds_port(self) -> int:
        return self.config.xds_port

    @property
    def admin_port(self) -> int:
        return self.config.admin_port

    @classmethod
    async def start(
        cls,
        tmp_path: Path,
        app_port: int,
        policies: Mapping[str, str],
        *,
        ready_timeout: float = 30.0,
        delta: bool = False,
        services: Sequence[SidecarService] = (),
        outbound_port: int | None = None,
        envoy_args: tuple[str, ...] = (),
        **config: Any,
    ) -> Self:
        """Writes ``policies`` (file name → text) to ``tmp_path/policies``, starts the control
        plane (on free ports unless ``config`` names them; ``services`` are added to its
        sidecar services) and the sidecar, and returns once the sidecar is LIVE (it has its
        first configuration). ``config`` overrides ControlPlaneConfig's fields."""
        folder = tmp_path / "policies"
        folder.mkdir()
        for name, text in policies.items():
            (folder / name).write_text(text)
        settings = dataclasses.replace(
            ControlPlaneConfig(
                policy_paths=(str(folder),),
                xds_port=free_port(),
                admin_port=free_port(),
                debounce_quiet=0.05,
                debounce_max=0.5,
            ),
            **config,
        )
        plane = await _start_plane(settings, services)
        # The ports it bound (config may have asked for any free one): a restart reuses them.
        settings = dataclasses.replace(
            settings, xds_port=plane.xds_port, admin_port=plane.admin_port
        )
        envoy, listen_port = demo_sidecar(
            app_port,
            plane.xds_port,
            tmp_path / "envoy.log",
            delta=delta,
            outbound_port=outbound_port,
            extra_args=envoy_args,
        )
        try:
            envoy.start()
            await asyncio.to_thread(envoy.wait_ready, ready_timeout)
        except BaseException:
            envoy.stop()
            await plane.stop(grace=0)
            raise
        return cls(plane, envoy, listen_port, folder, settings, services)

    async def start_plane(self) -> None:
        """A new control plane on the same ports and files, after ``plane`` stopped."""
        self.plane = await _start_plane(self.config, self.services)

    async def restart_plane(self, down_for: float = 0.0) -> None:
        await self.plane.stop(grace=0)
        await asyncio.sleep(down_for)
        await self.start_plane()

    async def stop(self) -> None:
        self.envoy.stop()
        await self.plane.stop(grace=0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def _start_plane(
    config: ControlPlaneConfig, services: Sequence[SidecarService]
) -> ControlPlane:
    plane = ControlPlane(config)
    plane.sidecar_services.extend(services)
    await plane.start()
    return plane


# --- Kubernetes: kmock with our CRDs and the resources the source reads ----------------------


@pytest.fixture
def cluster(kmock: kmock.KubernetesEmulator) -> kmock.KubernetesEmulator:
    """The emulator of ``@pytest.mark.kmock`` (its ``cls`` if given), serving our policy
    kinds (with a status subresource) and the core resources the source and Lease use."""
    for kind, names in NAMES.items():
        kmock.resources[f"{GROUP}/{VERSION}/{names.plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, subresources={"status"}
        )
    for resource in (
        "v1/pods",
        "v1/services",
        "v1/secrets",
        "discovery.k8s.io/v1/endpointslices",
        "coordination.k8s.io/v1/leases",
    ):
        kmock.resources[resource] = kmock.ResourceInfo(namespaced=True)
    return kmock


@pytest.fixture
def api_client(cluster: kmock.KubernetesEmulator) -> client.ApiClient:
    return client.ApiClient(client.Configuration(host=str(cluster.url).rstrip("/")))


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll without blocking the loop (kmock serves from this same loop)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking client call in a thread (kmock serves from the test's own loop)."""
    return asyncio.to_thread(fn, *args, **kwargs)


GROUP, VERSION = "modelguard.io", "v1alpha1"


def policy(kind: str, name: str, spec: dict[str, Any], generation: int = 1) -> dict[str, Any]:
    """A policy object in the demo namespace. kmock does not maintain
    ``metadata.generation``: the tests set it as the API server would."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": name, "namespace": "demo", "generation": generation},
        "spec": spec,
    }


async def create_policy(
    api_client: client.ApiClient,
    kind: str,
    name: str,
    spec: dict[str, Any],
    generation: int = 1,
) -> None:
    await call(
        client.CustomObjectsApi(api_client).create_namespaced_custom_object,
        GROUP,
        VERSION,
        "demo",
        NAMES[kind].plural,
        policy(kind, name, spec, generation),
    )


async def read_policy(api_client: client.ApiClient, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = await call(
        client.CustomObjectsApi(api_client).get_namespaced_custom_object,
        GROUP,
        VERSION,
        "demo",
        NAMES[kind].plural,
        name,
    )
    return obj


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """An object's status conditions by type."""
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


# --- a control plane whose admin API is bound beyond loopback, behind a token ----------


def own_address() -> str:
    """An address of this machine that is not loopback (what other pods would dial)."""
    candidates = {
        info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    }
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: it only picks a route
            candidates.add(probe.getsockname()[0])
    except OSError:
        pass
    for address in sorted(candidates):
        if not is_loopback(address):
            return address
    pytest.fail(f"this machine has no non-loopback IPv4 address ({candidates})")


@pytest.fixture
async def token_plane(tmp_path: Path) -> AsyncIterator[tuple[ControlPlane, str, Path]]:
    """A control plane (no policies) whose admin API listens on this machine's own
    non-loopback address and requires the admin token: (plane, admin address, token file)."""
    token = tmp_path / "admin-token"
    token.write_text("s3cret-admin-token\n")
    host = own_address()
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(),
            xds_port=free_port(),
            admin_host=host,
            admin_port=0,
            watch=False,
            admin_token_file=str(token),
        )
    )
    await plane.start()
    try:
        yield plane, f"{host}:{plane.admin_port}", token
    finally:
        await plane.stop(grace=0)
