"""The registry of kinds and the folders it names agree: every kind's feature is keyed by
its own kind name, and the generated tables list exactly the registered kinds."""

from __future__ import annotations

import importlib

from controlplane.api import KINDS
from controlplane.policies import compilers, translators
from controlplane.policies.registry import REGISTRY
from controlplane.translate.httpfilters import REGISTRY as FILTERS
from controlplane.translate.module import Phase


def test_every_kind_keys_its_feature_by_its_own_name() -> None:
    assert list(KINDS) == [kind.name for kind in REGISTRY]
    for kind in REGISTRY:
        package = f"controlplane.policies.{kind.folder}"
        assert kind.name == importlib.import_module(f"{package}.ir").KIND, package
        assert kind.name == importlib.import_module(f"{package}.compile").KIND, package
    assert [m.KIND for m in compilers.MODULES] == [kind.name for kind in REGISTRY]


def test_the_filter_chain_is_ordered_by_phase() -> None:
    kinds = [m for _, m in translators.MODULES]
    assert all(m in FILTERS for m in kinds)
    phases = {id(m): p for p, m in translators.MODULES}
    ordered = [phases[id(m)] for m in FILTERS if id(m) in phases]
    assert ordered == sorted(ordered)
    names = [m.name for m in FILTERS]
    # What the chain must keep: who the caller is first, access before the rate limits,
    # hardening after both, the router last of the HTTP filters.
    assert names[0] == "modelguard.caller"
    assert names.index("modelguard.extraction.verdicts") < names.index(
        "envoy.filters.http.rbac"
    ) < names.index("envoy.filters.http.local_ratelimit")
    # The Wasm filter sets a budget's instance class: after the local buckets, before the
    # quota assignments and the per-request service.
    wasm = names.index("envoy.filters.http.wasm")
    assert names.index("envoy.filters.http.local_ratelimit") < wasm
    assert wasm < names.index("envoy.filters.http.rate_limit_quota")
    assert wasm < names.index("envoy.filters.http.ratelimit")
    assert [p for p, m in translators.MODULES if m.name == "envoy.filters.http.wasm"] == [
        Phase.HARDENING
    ]
