"""Leader election over a ``coordination.k8s.io`` Lease: only its holder writes status."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger(__name__)

LEASE_NAME: Final = "modelguard-status-writer"


def utc_now() -> dt.datetime:
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
        now = utc_now()
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
