"""The Kubernetes source: policy CRDs, inventory and API keys from a cluster; policy status
written back. By concern:

* ``watch``: the CRDs, Pods, Services and EndpointSlices, listed (in pages) and watched;
  each object one store unit; the inventory corrected by the pods it concerns.
* ``apikeys``: Secrets labelled ``modelguard.io/api-keys=true``; only SHA-256 hashes of
  their values are kept in memory.
* ``lease``: every replica watches and serves xDS; only the holder of a
  ``coordination.k8s.io`` Lease writes status.
* ``status``: ``Accepted`` (with every violation) and ``Programmed`` (N of M targeted
  sidecars ACKed a snapshot that includes the current generation), with
  ``observedGeneration``; computed incrementally on the asyncio loop (the xDS sync status
  lives there), written from a thread.

The names below are the package's public surface.
"""

from controlplane.sources.kubernetes.apikeys import API_KEYS_LABEL, ApiKeys
from controlplane.sources.kubernetes.lease import LEASE_NAME, LeaderElector
from controlplane.sources.kubernetes.status import Condition, ProgramTracker, StatusWriter
from controlplane.sources.kubernetes.watch import (
    GROUP,
    SOURCE,
    VERSION,
    ClusterState,
    KubernetesSource,
    ObservedPolicy,
    PodInfo,
    unit_of,
)

__all__ = [
    "API_KEYS_LABEL",
    "GROUP",
    "LEASE_NAME",
    "SOURCE",
    "VERSION",
    "ApiKeys",
    "ClusterState",
    "Condition",
    "KubernetesSource",
    "LeaderElector",
    "ObservedPolicy",
    "PodInfo",
    "ProgramTracker",
    "StatusWriter",
    "unit_of",
]
