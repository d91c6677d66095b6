"""The Kubernetes source: policy CRDs, inventory and API keys from a cluster; policy status
written back.

* **Policies.** The four CRDs are listed and watched through the official ``kubernetes``
  client. Each object is one unit of the store, validated like a file document, so an
  invalid object is rejected whole and its last good version keeps serving.
* **Inventory.** Pods (labels, service account) and EndpointSlices (which Services a pod
  backs) correct what a sidecar said about itself at start-up: a label edited on a running
  pod, or a Service whose name differs from the pod's app label, is seen by policies.
  Services are watched to tell users when a policy targets a Service that does not exist.
* **API keys.** Secrets labelled ``modelguard.io/api-keys=true``; only SHA-256 hashes of
  their values are kept in memory.
* **Status.** ``Accepted`` (with every violation) and ``Programmed`` (N of M targeted
  sidecars ACKed a snapshot that includes the current generation), with
  ``observedGeneration``. Every replica watches and serves xDS; only the holder of a
  ``coordination.k8s.io`` Lease writes status.

Watches run in threads (the official client blocks); the store, inventory and debouncer are
thread-safe. Status is computed on the asyncio loop (the xDS sync status lives there) and
written from a thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from controlplane.api import API_VERSION, KINDS, Policy, validate_document
from controlplane.compile.inputs.inventory import Inventory, Sidecar, targets
from controlplane.compile.inputs.store import ACCEPTED, PolicyKey, PolicyStore, UnitContent
from controlplane.crdgen import NAMES
from controlplane.identity import apikeys

log = logging.getLogger(__name__)

GROUP, VERSION = API_VERSION.split("/")
API_KEYS_LABEL: Final = "modelguard.io/api-keys=true"
LEASE_NAME: Final = "modelguard-status-writer"
SOURCE: Final = "kubernetes"
# Metadata the API server changes without the user changing anything: ignoring it keeps a
# status write (new resourceVersion, managedFields) from looking like a policy change.
_VOLATILE_METADATA = ("resourceVersion", "managedFields", "selfLink")


def unit_of(key: PolicyKey) -> str:
    kind, namespace, name = key
    return f"{SOURCE}:{kind}/{namespace}/{name}"


@dataclass(frozen=True)
class ObservedPolicy:
    """What the source last saw of one policy object."""

    key: PolicyKey
    generation: int
    status: Mapping[str, Any]  # the status on the object, as the API server has it


@dataclass(frozen=True)
class PodInfo:
    labels: tuple[tuple[str, str], ...]
    service_account: str


@dataclass
class ClusterState:
    """Pods, Services and EndpointSlices as last seen; thread-safe."""

    pods: dict[tuple[str, str], PodInfo] = field(default_factory=dict)
    services: set[tuple[str, str]] = field(default_factory=set)
    # (namespace, slice name) → (service name, pod names it lists)
    slices: dict[tuple[str, str], tuple[str, frozenset[str]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def services_of(self, namespace: str, pod: str) -> list[str]:
        with self.lock:
            return sorted(
                {
                    svc
                    for (ns, _), (svc, pods) in self.slices.items()
                    if ns == namespace and pod in pods
                }
            )

    def has_service(self, namespace: str, name: str) -> bool:
        with self.lock:
            return (namespace, name) in self.services


@dataclass
class ApiKeys:
    """API keys of labelled Secrets as SHA-256 digests, by (namespace, secret name).

    Values are read as ``modelguard serve --api-keys`` files are: a key (hashed here and
    never kept) or ``sha256:<64 hex>``; surrounding whitespace (``echo | base64``) is
    dropped. A value that is neither is reported with its Secret and key, never its value.
    """

    _keys: dict[tuple[str, str], tuple[apikeys.ApiKey, ...]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        annotations: Mapping[str, Any] | None = None,
    ) -> None:
        values: list[tuple[str, str | None, str]] = []
        for client, value in sorted(data.items()):
            try:
                text: str | None = base64.b64decode(value, validate=True).decode().strip()
            except (ValueError, UnicodeDecodeError):
                text = None
            values.append((str(client), text, "data"))
        problems: list[str] = []
        # Tenants, tiers and principals come from annotations, as in --api-keys files.
        keys = apikeys.keys_of(values, annotations or {}, f"Secret {namespace}/{name}", problems)
        for problem in problems:
            log.error("%s", problem)
        with self._lock:
            self._keys[(namespace, name)] = keys

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            self._keys.pop((namespace, name), None)

    def hashes(self, namespace: str, name: str) -> frozenset[str]:
        with self._lock:
            return frozenset(key.digest for key in self._keys.get((namespace, name), ()))

    def digests(self) -> dict[tuple[str, str], tuple[apikeys.ApiKey, ...]]:
        """Every Secret's keys (id, digest, metadata): the identity box's API-key input."""
        with self._lock:
            return dict(self._keys)


@dataclass(frozen=True)
class _Watched:
    """One listed-and-watched resource: how to list it, and what to do with its objects."""

    name: str
    list_fn: Callable[..., Any]
    kwargs: Mapping[str, Any]
    upsert: Callable[[dict[str, Any]], None]
    delete: Callable[[dict[str, Any]], None]
    key: Callable[[dict[str, Any]], tuple[str, str]]


def _meta_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


class KubernetesSource:
    """Lists and watches the cluster; feeds the store, the inventory and the API keys.

    ``api_client`` is a ``kubernetes.client.ApiClient``; ``namespace`` limits every watch
    to one namespace (None: the whole cluster).
    """

    def __init__(
        self,
        api_client: Any,
        store: PolicyStore,
        inventory: Inventory | None = None,
        namespace: str | None = None,
        watch_timeout: int = 300,
        retry_interval: float = 1.0,
        secret_namespaces: Sequence[str] | None = None,
    ) -> None:
        # ``secret_namespaces``: read API-key Secrets only there (one watch each), so RBAC
        # can grant Secrets with namespaced Roles instead of cluster-wide.
        from kubernetes import client

        self.store = store
        self.inventory = inventory
        self.namespace = namespace
        self.watch_timeout = watch_timeout
        self.retry_interval = retry_interval
        self.cluster = ClusterState()
        self.api_keys = ApiKeys()
        self._observed: dict[PolicyKey, ObservedPolicy] = {}
        self._digests: dict[PolicyKey, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[Any] = set()
        self._synced: set[str] = set()
        self._listeners: list[Callable[[], None]] = []
        custom = client.CustomObjectsApi(api_client)
        core = client.CoreV1Api(api_client)
        discovery = client.DiscoveryV1Api(api_client)
        ns = namespace
        self._watched: list[_Watched] = []
        for kind in sorted(KINDS):
            plural = NAMES[kind].plural
            list_fn, kwargs = (
                (
                    custom.list_namespaced_custom_object,
                    {"group": GROUP, "version": VERSION, "namespace": ns, "plural": plural},
                )
                if ns
                else (
                    custom.list_cluster_custom_object,
                    {"group": GROUP, "version": VERSION, "plural": plural},
                )
            )
            self._watched.append(self._policy_watch(kind, list_fn, kwargs))

        def pick(
            namespaced: Callable[..., Any], everywhere: Callable[..., Any]
        ) -> tuple[Callable[..., Any], dict[str, Any]]:
            return (namespaced, {"namespace": ns}) if ns else (everywhere, {})

        for name, (fn, kwargs), upsert, delete in (
            (
                "pods",
                pick(
                    core.list_namespaced_pod,
                    core.list_pod_for_all_namespaces,
                ),
                self._pod_upsert,
                self._pod_delete,
            ),
            (
                "services",
                pick(
                    core.list_namespaced_service,
                    core.list_service_for_all_namespaces,
                ),
                self._service_upsert,
                self._service_delete,
            ),
            (
                "endpointslices",
                pick(
                    discovery.list_namespaced_endpoint_slice,
                    discovery.list_endpoint_slice_for_all_namespaces,
                ),
                self._slice_upsert,
                self._slice_delete,
            ),
            (
                "secrets",
                pick(
                    core.list_namespaced_secret,
                    core.list_secret_for_all_namespaces,
                ),
                self._secret_upsert,
                self._secret_delete,
            ),
        ):
            if name == "secrets":
                kwargs = {**kwargs, "label_selector": API_KEYS_LABEL}
                if secret_namespaces is not None:
                    for secret_ns in secret_namespaces:
                        self._watched.append(
                            _Watched(
                                f"secrets:{secret_ns}",
                                core.list_namespaced_secret,
                                {"namespace": secret_ns, "label_selector": API_KEYS_LABEL},
                                upsert,
                                delete,
                                _meta_key,
                            )
                        )
                    continue
            self._watched.append(_Watched(name, fn, kwargs, upsert, delete, _meta_key))
        if inventory is not None:
            inventory.subscribe(self._reconcile_inventory)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        for watched in self._watched:
            thread = threading.Thread(
                target=self._run, args=(watched,), name=f"k8s-{watched.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            responses = list(self._open)
        for response in responses:
            with contextlib.suppress(Exception):
                response.shutdown()  # unblocks the reading thread at once
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def synced(self) -> bool:
        """Whether every watched resource has been listed once (readiness)."""
        with self._lock:
            return len(self._synced) == len(self._watched)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Called (from a watch thread) whenever a policy object or the cluster changed."""
        self._listeners.append(listener)

    def observed(self) -> dict[PolicyKey, ObservedPolicy]:
        with self._lock:
            return dict(self._observed)

    # ---- list + watch ------------------------------------------------------------------

    def _run(self, watched: _Watched) -> None:
        while not self._stop.is_set():
            try:
                version = self._list(watched)
                with self._lock:
                    self._synced.add(watched.name)
                self._notify()
                for event in self._stream(watched, version):
                    self._handle(watched, event)
            except Exception as err:  # a watch must never die: relist after a pause
                if self._stop.is_set():
                    return
                log.warning("watch of %s failed (%s); listing again", watched.name, err)
            self._stop.wait(self.retry_interval)

    def _list(self, watched: _Watched) -> str | None:
        response = watched.list_fn(
            **watched.kwargs, _preload_content=False, _request_timeout=(10, 60)
        )
        listing = json.loads(response.data)
        items = listing.get("items") or []
        seen = {watched.key(item) for item in items}
        for item in items:
            watched.upsert(item)
        # A relist also tells what was deleted while no watch was open.
        for key in self._known(watched):
            if key not in seen:
                watched.delete({"metadata": {"namespace": key[0], "name": key[1]}})
        version = (listing.get("metadata") or {}).get("resourceVersion")
        return str(version) if version else None

    def _stream(self, watched: _Watched, version: str | None) -> Iterator[dict[str, Any]]:
        from kubernetes.watch.watch import iter_resp_lines

        response = watched.list_fn(
            **watched.kwargs,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=version,
            timeout_seconds=self.watch_timeout,
            _preload_content=False,
            _request_timeout=(10, self.watch_timeout + 30),
        )
        with self._lock:
            self._open.add(response)
            # stop() shuts down the responses it finds open; one opened after that sees
            # the flag here (both under the lock), so no watch outlives stop().
            stopping = self._stop.is_set()
        try:
            if stopping:
                return
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                if self._stop.is_set():
                    return
                yield json.loads(line)
        finally:
            with self._lock:
                self._open.discard(response)
            # Closed, not returned to the pool: the server must see the watch end.
            response.close()

    def _handle(self, watched: _Watched, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind in ("ADDED", "MODIFIED"):
            watched.upsert(obj)
        elif kind == "DELETED":
            watched.delete(obj)
        elif kind == "ERROR":
            # 410 Gone: our resourceVersion is too old; the caller lists again.
            raise RuntimeError(f"watch error: {obj.get('message') or obj}")
        else:
            return  # BOOKMARK
        self._notify()

    def _known(self, watched: _Watched) -> list[tuple[str, str]]:
        if watched.name in NAMES_BY_PLURAL:
            kind = NAMES_BY_PLURAL[watched.name]
            with self._lock:
                return [(ns, name) for (k, ns, name) in self._observed if k == kind]
        with self.cluster.lock:
            if watched.name == "pods":
                return list(self.cluster.pods)
            if watched.name == "services":
                return list(self.cluster.services)
            if watched.name == "endpointslices":
                return list(self.cluster.slices)
        namespace = watched.kwargs.get("namespace")
        with self.api_keys._lock:
            # A relist of one namespace's Secrets must not drop the others' keys.
            return [k for k in self.api_keys._keys if namespace is None or k[0] == namespace]

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    # ---- policies ----------------------------------------------------------------------

    def _policy_watch(
        self, kind: str, list_fn: Callable[..., Any], kwargs: Mapping[str, Any]
    ) -> _Watched:
        return _Watched(
            NAMES[kind].plural,
            list_fn,
            kwargs,
            lambda obj: self._policy_upsert(kind, obj),
            lambda obj: self._policy_delete(kind, obj),
            _meta_key,
        )

    def _policy_upsert(self, kind: str, obj: dict[str, Any]) -> None:
        namespace, name = _meta_key(obj)
        key = (kind, namespace, name)
        meta = obj.get("metadata") or {}
        generation = int(meta.get("generation") or 1)
        with self._lock:
            self._observed[key] = ObservedPolicy(
                key, generation, copy.deepcopy(obj.get("status") or {})
            )
        doc = {k: v for k, v in obj.items() if k != "status"}
        doc["metadata"] = {k: v for k, v in meta.items() if k not in _VOLATILE_METADATA}
        doc.setdefault("kind", kind)
        doc.setdefault("apiVersion", API_VERSION)
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        with self._lock:
            if self._digests.get(key) == digest:
                return  # only status or server-side bookkeeping changed
            self._digests[key] = digest
        loaded, violations = validate_document(doc, SOURCE, 0)
        found = tuple(dataclasses.replace(v, index=None) for v in violations)
        for violation in found:
            log.error("policy rejected: %s", violation)
        content = UnitContent((loaded,) if loaded is not None else (), found)
        self.store.apply({unit_of(key): content})

    def _policy_delete(self, kind: str, obj: dict[str, Any]) -> None:
        key = (kind, *_meta_key(obj))
        with self._lock:
            self._observed.pop(key, None)
            self._digests.pop(key, None)
        self.store.apply({}, removed=[unit_of(key)])

    # ---- inventory ---------------------------------------------------------------------

    def _pod_upsert(self, obj: dict[str, Any]) -> None:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        info = PodInfo(
            labels=tuple(sorted((meta.get("labels") or {}).items())),
            service_account=str(spec.get("serviceAccountName") or "default"),
        )
        with self.cluster.lock:
            self.cluster.pods[_meta_key(obj)] = info
        self._reconcile_inventory()

    def _pod_delete(self, obj: dict[str, Any]) -> None:
        with self.cluster.lock:
            self.cluster.pods.pop(_meta_key(obj), None)

    def _service_upsert(self, obj: dict[str, Any]) -> None:
        with self.cluster.lock:
            self.cluster.services.add(_meta_key(obj))

    def _service_delete(self, obj: dict[str, Any]) -> None:
        with self.cluster.lock:
            self.cluster.services.discard(_meta_key(obj))

    def _slice_upsert(self, obj: dict[str, Any]) -> None:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        service = labels.get("kubernetes.io/service-name")
        if not service:
            return
        pods = frozenset(
            str(ref.get("name"))
            for endpoint in obj.get("endpoints") or []
            for ref in [endpoint.get("targetRef") or {}]
            if ref.get("kind") == "Pod"
        )
        with self.cluster.lock:
            self.cluster.slices[_meta_key(obj)] = (str(service), pods)
        self._reconcile_inventory()

    def _slice_delete(self, obj: dict[str, Any]) -> None:
        with self.cluster.lock:
            self.cluster.slices.pop(_meta_key(obj), None)
        self._reconcile_inventory()

    def _secret_upsert(self, obj: dict[str, Any]) -> None:
        namespace, name = _meta_key(obj)
        meta = obj.get("metadata") or {}
        self.api_keys.set(namespace, name, obj.get("data") or {}, meta.get("annotations") or {})

    def _secret_delete(self, obj: dict[str, Any]) -> None:
        self.api_keys.remove(*_meta_key(obj))

    def _reconcile_inventory(self) -> None:
        """Correct connected sidecars by what the cluster says about their pods."""
        if self.inventory is None:
            return
        for sidecar in self.inventory.snapshot():
            corrected = self.correct(sidecar)
            if corrected != sidecar:
                self.inventory.observe(corrected)

    def correct(self, sidecar: Sidecar) -> Sidecar:
        """The sidecar with its pod's live labels and, when the pod backs Services but none
        by the name it announced, the first of those Services' names."""
        pod_name, _, namespace = sidecar.node_id.rpartition(".")
        if not pod_name or namespace != sidecar.namespace:
            return sidecar
        with self.cluster.lock:
            pod = self.cluster.pods.get((namespace, pod_name))
        if pod is None:
            return sidecar
        services = self.cluster.services_of(namespace, pod_name)
        service = sidecar.service
        if services and service not in services:
            service = services[0]
        return dataclasses.replace(sidecar, labels=pod.labels, service=service)


NAMES_BY_PLURAL: Final = {names.plural: kind for kind, names in NAMES.items()}


# ---- leader election -----------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    """Holds a ``coordination.k8s.io/v1`` Lease while this replica is alive.

    Like client-go's leaderelection: a lease is expired when its record has not changed for
    ``lease_duration`` by *our* clock (clocks of replicas may disagree), and a leader that
    cannot renew for ``renew_deadline`` steps down before anyone can take over.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        identity: str,
        name: str = LEASE_NAME,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_duration, self.renew_deadline = lease_duration, renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and (
            self.clock() - self._renewed_at < self.renew_deadline
        )

    def _spec(self, acquire: dt.datetime | None, transitions: int) -> dict[str, Any]:
        now = _now()
        return {
            "holder_identity": self.identity,
            "lease_duration_seconds": int(self.lease_duration),
            "acquire_time": acquire or now,
            "renew_time": now,
            "lease_transitions": transitions,
        }

    def step(self) -> bool:
        """One attempt to acquire or renew; returns whether this replica leads now."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            try:
                lease = self.api.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=(5, 10)
                )
            except ApiException as err:
                if err.status != 404:
                    raise
                body = client.V1Lease(
                    metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                    spec=client.V1LeaseSpec(**self._spec(None, 0)),
                )
                self.api.create_namespaced_lease(self.namespace, body, _request_timeout=(5, 10))
                self._renewed_at = self.clock()
                log.info("status writer: %s acquired lease %s", self.identity, self.name)
                return True
            spec = lease.spec or client.V1LeaseSpec()
            record = (spec.holder_identity, spec.renew_time)
            now = self.clock()
            if record != self._observed:
                self._observed, self._observed_at = record, now
            holder = spec.holder_identity
            duration = float(spec.lease_duration_seconds or self.lease_duration)
            expired = now - self._observed_at > duration
            if holder not in (self.identity, None, "") and not expired:
                self._renewed_at = None
                return False
            mine = holder == self.identity
            transitions = int(spec.lease_transitions or 0) + (0 if mine else 1)
            fields = self._spec(spec.acquire_time if mine else None, transitions)
            serialize = self.api.api_client.sanitize_for_serialization
            patch: dict[str, Any] = {"spec": serialize(client.V1LeaseSpec(**fields))}
            version = lease.metadata.resource_version if lease.metadata else None
            if version:
                # With resourceVersion, a concurrent taker makes this a 409, not a tie.
                patch["metadata"] = {"resourceVersion": version}
            self.api.patch_namespaced_lease(
                self.name,
                self.namespace,
                patch,
                _content_type="application/merge-patch+json",
                _request_timeout=(5, 10),
            )
            if not mine:
                log.info(
                    "status writer: %s took over lease %s from %s", self.identity, self.name, holder
                )
            self._renewed_at = self.clock()
            return True
        except ApiException as err:
            log.debug("lease %s: %s", self.name, err.reason)
        except Exception as err:
            log.warning("lease %s: %s", self.name, err)
        return self.is_leader

    def start(self) -> None:
        def run() -> None:
            while not self._stop.is_set():
                self.step()
                self._stop.wait(self.retry_period)

        self._thread = threading.Thread(target=run, name="k8s-lease", daemon=True)
        self._thread.start()

    def stop(self, release: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release:
            self.release()

    def release(self) -> None:
        """Give the Lease up (as client-go's ReleaseOnCancel): an empty holder, so another
        replica takes it at its next try instead of after ``lease_duration``."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=(5, 10)
            )
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            patch: dict[str, Any] = {"spec": {"holderIdentity": None, "leaseDurationSeconds": 1}}
            if lease.metadata is not None and lease.metadata.resource_version:
                patch["metadata"] = {"resourceVersion": lease.metadata.resource_version}
            self.api.patch_namespaced_lease(
                self.name,
                self.namespace,
                patch,
                _content_type="application/merge-patch+json",
                _request_timeout=(5, 10),
            )
            log.info("status writer: %s released lease %s", self.identity, self.name)
        except Exception as err:
            log.warning("lease %s: not released: %s", self.name, err)


# ---- status --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False"
    reason: str
    message: str


def _strip_subject(error: str, key: PolicyKey) -> str:
    kind, namespace, name = key
    head = f"{SOURCE} {kind} {namespace}/{name}: "
    return error[len(head) :] if error.startswith(head) else error


class StatusWriter:
    """Computes each policy's conditions and, while leader, writes the ones that changed."""

    def __init__(
        self,
        api_client: Any,
        source: KubernetesSource,
        is_leader: Callable[[], bool],
        programmed: Callable[[PolicyKey], Mapping[str, bool]],
        sidecars: Callable[[], tuple[Sidecar, ...]],
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.source = source
        self.is_leader = is_leader
        # policy → (node id → serves a snapshot with the policy's current version)
        self.programmed = programmed
        self.sidecars = sidecars
        self.clock = clock
        self._written: dict[PolicyKey, dict[str, Any]] = {}
        self.writes = 0
        # More conditions of a policy from other boxes (e.g. an ExtractionPolicy's
        # Calibrated, from the extraction monitor), after Accepted and Programmed.
        self.extra_conditions: Callable[[PolicyKey], list[Condition]] = lambda key: []

    def desired(self) -> dict[PolicyKey, dict[str, Any]]:
        """The status every observed policy should have (lastTransitionTime kept when a
        condition's status did not change)."""
        store = self.source.store
        statuses = {s.key: s for s in store.statuses()}
        serving: dict[PolicyKey, Policy] = {
            p.ref: p for p in store.current().policies
        }
        sidecars = self.sidecars()
        out = {}
        for key, seen in self.source.observed().items():
            status = statuses.get(key)
            if status is None:
                # Observed, not yet through the store: saying Accepted now could be a lie.
                continue
            conditions = []
            if status.state == ACCEPTED:
                conditions.append(Condition("Accepted", "True", "Accepted", "valid"))
            else:
                errors = "; ".join(_strip_subject(e, key) for e in status.errors)
                if status.serving:
                    errors += " (the last accepted version keeps serving)"
                conditions.append(Condition("Accepted", "False", "Invalid", errors))
            policy = serving.get(key)
            targeted = [s for s in sidecars if policy is not None and targets(policy, s)]
            programmed = self.programmed(key) if targeted else {}
            done = sum(1 for s in targeted if programmed.get(s.node_id, False))
            accepted = conditions[0].status == "True"
            if not accepted:
                programmed_condition = Condition(
                    "Programmed", "False", "Invalid", "the current generation is not valid"
                )
            elif not targeted:
                message = "no sidecar targeted"
                ref = policy.spec.target_ref if policy is not None else None
                if (
                    ref is not None
                    and ref.service
                    and not self.source.cluster.has_service(key[1], ref.service)
                ):
                    message += f"; Service {key[1]}/{ref.service} not found"
                programmed_condition = Condition("Programmed", "False", "NoSidecars", message)
            else:
                programmed_condition = Condition(
                    "Programmed",
                    "True" if done == len(targeted) else "False",
                    "Programmed" if done == len(targeted) else "Pending",
                    f"{done} of {len(targeted)} targeted sidecars ACKed",
                )
            conditions.append(programmed_condition)
            if accepted:
                conditions += self.extra_conditions(key)
            out[key] = self._status(seen, conditions, done, len(targeted))
        return out

    def _status(
        self, seen: ObservedPolicy, conditions: list[Condition], done: int, targeted: int
    ) -> dict[str, Any]:
        before = {c.get("type"): c for c in seen.status.get("conditions") or []}
        now = self.clock().replace(microsecond=0).isoformat().replace("+00:00", "Z")
        rendered = []
        for c in conditions:
            old = before.get(c.type) or {}
            since = old.get("lastTransitionTime") if old.get("status") == c.status else None
            rendered.append(
                {
                    "type": c.type,
                    "status": c.status,
                    "observedGeneration": seen.generation,
                    "lastTransitionTime": since or now,
                    "reason": c.reason,
                    "message": c.message[:32768],
                }
            )
        return {
            "observedGeneration": seen.generation,
            "targetedSidecars": targeted,
            "programmedSidecars": done,
            "conditions": rendered,
        }

    def changes(self) -> list[tuple[PolicyKey, dict[str, Any]]]:
        """Statuses that differ from what the object has and from what was last written."""
        observed = self.source.observed()
        out = []
        for key, status in self.desired().items():
            if status == dict(observed[key].status) or status == self._written.get(key):
                continue
            out.append((key, status))
        return out

    def write(self, changes: list[tuple[PolicyKey, dict[str, Any]]]) -> None:
        from kubernetes.client.exceptions import ApiException

        for key, status in changes:
            if not self.is_leader():
                return
            kind, namespace, name = key
            try:
                self.api.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    NAMES[kind].plural,
                    name,
                    {"status": status},
                    _content_type="application/merge-patch+json",
                    _request_timeout=(5, 10),
                )
            except ApiException as err:
                if err.status != 404:  # deleted meanwhile: nothing to report on
                    log.warning("status of %s %s/%s: %s", kind, namespace, name, err.reason)
                continue
            self._written[key] = status
            self.writes += 1

    async def run(self, stop: asyncio.Event, interval: float = 0.5) -> None:
        """Recompute on the loop (where sync status lives), write from a thread."""
        while not stop.is_set():
            try:
                if self.is_leader():
                    changes = self.changes()
                    if changes:
                        await asyncio.to_thread(self.write, changes)
                else:
                    self._written.clear()  # a new leader must not trust another's writes
            except Exception:
                log.exception("status write failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


class ProgramTracker:
    """Which sidecars serve (ACKed) a snapshot that includes a policy's current version.

    Recompiling to compare IRs would need every input of the pipeline (telemetry, mesh,
    verdicts); revisions need none. The store revision a policy version entered with is
    recorded from the store; the pipeline records the revision each rebuild compiled.

    It is handed what it reads: the store, the inventory, the revision the pipeline last
    compiled, and whether a node serves (has ACKed) the snapshot compiled for it.
    """

    def __init__(
        self,
        store: PolicyStore,
        inventory: Inventory,
        compiled_revision: Callable[[], int],
        serves_compiled: Callable[[str], bool],
    ) -> None:
        self.inventory = inventory
        self.compiled_revision = compiled_revision
        self.serves_compiled = serves_compiled
        self._applied: dict[PolicyKey, tuple[int, str]] = {}
        self._lock = threading.Lock()
        store.subscribe(self._on_policies)
        self._on_policies(store.current())

    def _on_policies(self, policy_set: Any) -> None:
        with self._lock:
            for policy in policy_set.policies:
                key = policy.ref
                fingerprint = policy.spec.model_dump_json(by_alias=True)
                if self._applied.get(key, (0, ""))[1] != fingerprint:
                    self._applied[key] = (policy_set.revision, fingerprint)

    def nodes(self, key: PolicyKey) -> dict[str, bool]:
        """Node id → whether it has ACKed a snapshot compiled with ``key``'s current version."""
        with self._lock:
            needed = self._applied.get(key, (None, ""))[0]
        compiled = needed is not None and self.compiled_revision() >= needed
        return {
            sidecar.node_id: compiled and self.serves_compiled(sidecar.node_id)
            for sidecar in self.inventory.snapshot()
        }


# ---- cluster mode: `modelguard serve --kubernetes` -----------------------------------------
