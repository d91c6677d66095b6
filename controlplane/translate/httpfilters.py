"""The ordered registry of translation modules: HTTP filter order is data, visible here
(``Phase`` in ``module.py``).

Each module turns its part of the IR into HTTP filters of the inbound connection manager,
may patch the inbound resources (the listener's filter chain, the connection manager, the
route configuration, the workload's cluster), and may add resources of its own (secrets,
extension configs, outbound listeners, clusters). Every policy kind lists its modules with
their phases in its ``translate.MODULES`` (collected in ``policies/translators.py``,
generated from the registry); the shared ones are below.
"""

from __future__ import annotations

from controlplane.policies import translators
from controlplane.translate import caller, router, telemetry
from controlplane.translate.module import Inbound, Module, Phase

__all__ = ["REGISTRY", "Inbound", "Module"]

_SHARED: tuple[tuple[int, Module], ...] = (
    # Who the caller is: caller-sent x-modelguard-* headers dropped, the verified key id,
    # tenant and tier (or source address) set, before anything reads them (issue 14).
    (Phase.CALLER, caller.MODULE),
    (Phase.TELEMETRY, telemetry.MODULE),
    (Phase.ROUTER, router.MODULE),
)

# By phase; modules of one phase in the order their kind lists them (a stable sort).
REGISTRY: tuple[Module, ...] = tuple(
    module
    for _, module in sorted(_SHARED + translators.MODULES, key=lambda entry: entry[0])
)
