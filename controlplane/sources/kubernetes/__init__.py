"""The Kubernetes source, by concern: ``watch`` (policy CRDs and inventory listed and
watched), ``apikeys`` (API-key Secrets), ``lease`` (which replica writes status) and
``status`` (policy conditions). The names below are the package's public surface.
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
