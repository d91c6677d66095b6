"""EgressPolicy → EgressIR: the outside destinations one sidecar's workload may reach.

Semantics (decided here, documented in the README):

* A sidecar with an outbound port and no EgressPolicy denies every outside destination:
  capturing a workload's outbound traffic is opting in to default deny.
* Enforce-mode policies allow the union of their rules; everything else is blocked.
* Audit-mode policies only count when no Enforce-mode policy targets the sidecar: then
  nothing is blocked, and what their rules would not allow is logged. Beside an enforced
  policy an audited one opens nothing (an audit must never widen what is enforced).

Mesh destinations (services with sidecars) are not handled here yet: once workload
identity (mTLS) lands, ``compile_egress`` gains them from the inventory and they go to
their services' clusters instead of the dynamic forward proxy.
"""

from __future__ import annotations

from collections.abc import Sequence

from controlplane.api.common import WINDOW_SECONDS
from controlplane.compile.feature import FeatureInputs
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.ir import PolicyRef
from controlplane.policies.egress.api import EgressPolicy
from controlplane.policies.egress.ir import KIND as KIND  # the key of compile_feature's result
from controlplane.policies.egress.ir import (
    EgressBudget,
    EgressDestination,
    EgressIR,
    EgressProtocol,
)

# The outbound listener only serves the workload beside it: an egress proxy open to the
# network would hand this workload's allowances to anyone who can reach the pod.
OUTBOUND_ADDRESS = "127.0.0.1"


def _ref(policy: EgressPolicy) -> PolicyRef:
    return PolicyRef(*policy.ref)


def _destinations(policy: EgressPolicy) -> list[EgressDestination]:
    out = []
    for i, rule in enumerate(policy.spec.allow):
        protocols = (
            (EgressProtocol(rule.protocol),)
            if rule.protocol is not None
            else (EgressProtocol.HTTP, EgressProtocol.TLS)
        )
        out.append(
            EgressDestination(
                name=f"{policy.metadata.namespace}.{policy.metadata.name}.allow-{i}",
                policy=_ref(policy),
                host=rule.host,
                ports=tuple(rule.ports),
                protocols=protocols,
                budget=EgressBudget(rule.budget.bytes, WINDOW_SECONDS[rule.budget.per])
                if rule.budget is not None
                else None,
            )
        )
    return out


def compile_egress(sidecar: Sidecar, policies: Sequence[EgressPolicy]) -> EgressIR | None:
    """The egress part of ``sidecar``'s IR; None when its outbound traffic is not captured."""
    if sidecar.outbound_port is None:
        return None
    ordered = sorted(policies, key=lambda p: (p.metadata.namespace, p.metadata.name))
    enforced = [p for p in ordered if p.spec.mode == "Enforce"]
    audited = [p for p in ordered if p.spec.mode == "Audit"]
    deciding = enforced or audited
    return EgressIR(
        listen_address=OUTBOUND_ADDRESS,
        port=sidecar.outbound_port,
        enforce=bool(enforced) or not audited,
        allowed=tuple(d for p in deciding for d in _destinations(p)),
        deciding=tuple(_ref(p) for p in deciding),
    )


def compile_feature(inputs: FeatureInputs) -> EgressIR | None:
    return compile_egress(inputs.sidecar, inputs.of_kind(EgressPolicy))
