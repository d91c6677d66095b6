"""The registry of policy kinds: adding a kind is one module and one line here."""

from __future__ import annotations

from controlplane.api.access import AccessPolicy
from controlplane.api.egress import EgressPolicy
from controlplane.api.extraction import ExtractionPolicy
from controlplane.api.rate import RatePolicy

Policy = AccessPolicy | EgressPolicy | RatePolicy | ExtractionPolicy

KINDS: dict[str, type[Policy]] = {
    cls.KIND: cls for cls in (AccessPolicy, EgressPolicy, RatePolicy, ExtractionPolicy)
}
