"""The registry of policy kinds: adding a kind is one module and one line here."""

from __future__ import annotations

from controlplane.policies.access.api import AccessPolicy
from controlplane.policies.egress.api import EgressPolicy
from controlplane.policies.extraction.api import ExtractionPolicy
from controlplane.policies.rate.api import RatePolicy

Policy = AccessPolicy | EgressPolicy | RatePolicy | ExtractionPolicy

KINDS: dict[str, type[Policy]] = {
    cls.KIND: cls for cls in (AccessPolicy, EgressPolicy, RatePolicy, ExtractionPolicy)
}
