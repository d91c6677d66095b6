"""The Kubernetes source's watches: policy CRDs and the inventory, listed and watched.

* **Policies.** The four CRDs are listed and watched through the official ``kubernetes``
  client. Each object is one unit of the store, validated like a file document, so an
  invalid object is rejected whole and its last good version keeps serving.
* **Inventory.** Pods (labels, service account) and EndpointSlices (which Services a pod
  backs) correct what a sidecar said about itself at start-up: a label edited on a running
  pod, or a Service whose name differs from the pod's app label, is seen by policies.
  Services are watched to tell users when a policy targets a Service that does not exist.
  Only pods with the injector's label are read (``pod_selector``), every list in pages.
  A sidecar is corrected as it connects, and an event re-corrects only the sidecars of the
  pods it concerns (EndpointSlices are indexed by pod): at 5,000 pods a rescan of every
  sidecar per event cost ~100 ms (BENCHMARKS.md, "Kubernetes source at 5,000 pods").
* **API keys** (``apikeys``) come from labelled Secrets, watched here too.

Watches run in threads (the official client blocks); the store, inventory and debouncer are
thread-safe.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from controlplane.api import API_VERSION, KINDS, validate_document
from controlplane.api.kinds import NAMES
from controlplane.compile.inputs.inventory import Inventory, Sidecar
from controlplane.compile.inputs.store import PolicyKey, PolicyStore, UnitContent
from controlplane.sources.kubernetes.apikeys import API_KEYS_LABEL, ApiKeys

log = logging.getLogger(__name__)

GROUP, VERSION = API_VERSION.split("/")
SOURCE: Final = "kubernetes"
# Metadata the API server changes without the user changing anything: ignoring it keeps a
# status write (new resourceVersion, managedFields) from looking like a policy change.
_VOLATILE_METADATA = ("resourceVersion", "managedFields", "selfLink")
PAGE_SIZE: Final = 500  # kubectl's and client-go's informers' default chunk size


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
    """Pods, Services and EndpointSlices as last seen; thread-safe.

    EndpointSlices are also indexed by the pods they list, so that what a pod backs is a
    lookup, and a slice event names the few pods whose Services changed.
    """

    pods: dict[tuple[str, str], PodInfo] = field(default_factory=dict)
    services: set[tuple[str, str]] = field(default_factory=set)
    # (namespace, slice name) → (service name, pod names it lists)
    slices: dict[tuple[str, str], tuple[str, frozenset[str]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (namespace, pod name) → {slice name: its service} of the slices listing that pod
    _slices_of_pod: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def services_of(self, namespace: str, pod: str) -> list[str]:
        with self.lock:
            return self._services_of(namespace, pod)

    def _services_of(self, namespace: str, pod: str) -> list[str]:
        return sorted(set(self._slices_of_pod.get((namespace, pod), {}).values()))

    def pod_view(self, namespace: str, pod: str) -> tuple[PodInfo | None, list[str]]:
        """A pod and the Services it backs, read together."""
        with self.lock:
            return self.pods.get((namespace, pod)), self._services_of(namespace, pod)

    def has_service(self, namespace: str, name: str) -> bool:
        with self.lock:
            return (namespace, name) in self.services

    def set_pod(self, key: tuple[str, str], info: PodInfo) -> bool:
        """Whether the pod is new or changed (its status alone changing is no change)."""
        with self.lock:
            if self.pods.get(key) == info:
                return False
            self.pods[key] = info
            return True

    def remove_pod(self, key: tuple[str, str]) -> bool:
        with self.lock:
            return self.pods.pop(key, None) is not None

    def set_slice(
        self, key: tuple[str, str], service: str, pods: frozenset[str]
    ) -> frozenset[str]:
        """Keep a slice; returns the pods whose Services may have changed."""
        with self.lock:
            before = self.slices.get(key)
            self.slices[key] = (service, pods)
            self._unindex(key, before)
            namespace, name = key
            for pod in pods:
                self._slices_of_pod.setdefault((namespace, pod), {})[name] = service
        if before is None:
            return pods
        old_service, old_pods = before
        return pods ^ old_pods if old_service == service else pods | old_pods

    def remove_slice(self, key: tuple[str, str]) -> frozenset[str]:
        with self.lock:
            before = self.slices.pop(key, None)
            self._unindex(key, before)
        return before[1] if before is not None else frozenset()

    def _unindex(
        self, key: tuple[str, str], before: tuple[str, frozenset[str]] | None
    ) -> None:
        if before is None:
            return
        namespace, name = key
        for pod in before[1]:
            of_pod = self._slices_of_pod.get((namespace, pod))
            if of_pod is not None:
                of_pod.pop(name, None)
                if not of_pod:
                    del self._slices_of_pod[(namespace, pod)]


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
        pod_selector: str | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        # ``secret_namespaces``: read API-key Secrets only there (one watch each), so RBAC
        # can grant Secrets with namespaced Roles instead of cluster-wide.
        # ``pod_selector``: a label selector for the Pods watched (cluster mode: the label
        # the injector sets), so the control plane holds its sidecars' pods, not the
        # cluster's. ``page_size``: lists are read in pages of this many (0: one page).
        from kubernetes import client

        self.store = store
        self.inventory = inventory
        self.namespace = namespace
        self.watch_timeout = watch_timeout
        self.retry_interval = retry_interval
        self.page_size = page_size
        self.cluster = ClusterState()
        self.api_keys = ApiKeys()
        self._observed: dict[PolicyKey, ObservedPolicy] = {}
        self._digests: dict[PolicyKey, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: set[Any] = set()
        self._synced: set[str] = set()
        self.pages = 0  # list pages read, of every resource
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
            if name == "pods" and pod_selector:
                kwargs = {**kwargs, "label_selector": pod_selector}
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
            # Corrected as they connect, and again (only those touched) on Pod and
            # EndpointSlice events: never a rescan of every sidecar.
            inventory.correct_with(self.correct)

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
        """List in pages (``limit`` + ``continue``, as client-go's pager), so that neither the
        API server nor this process holds thousands of objects in one response. The pages
        are one consistent snapshot; an expired continue token fails the list, which is
        then retried from the start (``_run``)."""
        seen: set[tuple[str, str]] = set()
        token: str | None = None
        version: str | None = None
        while True:
            paging: dict[str, Any] = {"limit": self.page_size} if self.page_size else {}
            if token:
                paging["_continue"] = token
            response = watched.list_fn(
                **watched.kwargs, **paging, _preload_content=False, _request_timeout=(10, 60)
            )
            listing = json.loads(response.data)
            items = listing.get("items") or []
            for item in items:
                seen.add(watched.key(item))
                watched.upsert(item)
            meta = listing.get("metadata") or {}
            version = str(meta.get("resourceVersion") or "") or version
            token = meta.get("continue") or None
            self.pages += 1
            if not token:
                break
        # A relist also tells what was deleted while no watch was open.
        for key in self._known(watched):
            if key not in seen:
                watched.delete({"metadata": {"namespace": key[0], "name": key[1]}})
        return version

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
        # A relist of one namespace's Secrets must not drop the others' keys.
        return self.api_keys.secrets(namespace)

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
        key = _meta_key(obj)
        if self.cluster.set_pod(key, info):
            self._recorrect(key[0], (key[1],))

    def _pod_delete(self, obj: dict[str, Any]) -> None:
        key = _meta_key(obj)
        if self.cluster.remove_pod(key):
            self._recorrect(key[0], (key[1],))

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
            self._slice_delete(obj)  # a slice of no Service backs nothing
            return
        pods = frozenset(
            str(ref.get("name"))
            for endpoint in obj.get("endpoints") or []
            for ref in [endpoint.get("targetRef") or {}]
            if ref.get("kind") == "Pod"
        )
        key = _meta_key(obj)
        self._recorrect(key[0], self.cluster.set_slice(key, str(service), pods))

    def _slice_delete(self, obj: dict[str, Any]) -> None:
        key = _meta_key(obj)
        self._recorrect(key[0], self.cluster.remove_slice(key))

    def _secret_upsert(self, obj: dict[str, Any]) -> None:
        namespace, name = _meta_key(obj)
        meta = obj.get("metadata") or {}
        self.api_keys.set(namespace, name, obj.get("data") or {}, meta.get("annotations") or {})

    def _secret_delete(self, obj: dict[str, Any]) -> None:
        self.api_keys.remove(*_meta_key(obj))

    def _recorrect(self, namespace: str, pods: Iterable[str]) -> None:
        """Correct again the sidecars of these pods, and only those."""
        if self.inventory is not None and pods:
            self.inventory.recorrect([f"{pod}.{namespace}" for pod in pods])

    def correct(self, sidecar: Sidecar) -> Sidecar:
        """The sidecar (as it announced itself) with its pod's live labels and, when the pod
        backs Services but none by the name it announced, the first of those Services'
        names. A sidecar's node id is ``<pod>.<namespace>`` (the injector sets it so)."""
        pod_name, _, namespace = sidecar.node_id.rpartition(".")
        if not pod_name or namespace != sidecar.namespace:
            return sidecar
        pod, services = self.cluster.pod_view(namespace, pod_name)
        if pod is None:
            return sidecar
        service = sidecar.service
        if services and service not in services:
            service = services[0]
        return dataclasses.replace(sidecar, labels=pod.labels, service=service)


NAMES_BY_PLURAL: Final = {names.plural: kind for kind, names in NAMES.items()}
