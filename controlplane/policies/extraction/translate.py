"""ExtractionIR → the output-hardening / query-feed Wasm filter, delivered over ECDS.

The inbound chain carries one HTTP filter per ExtractionPolicy that names its config by
``config_discovery`` (ADS); the config itself is a ``TypedExtensionConfig`` resource with
the ``envoy.extensions.filters.http.wasm.v3.Wasm`` filter: the module's bytes inline (the
sidecar needs nothing on disk; its sha256 names the VM, so a config dump shows which build
runs) and the filter's JSON configuration. A policy edit changes only that resource:
Envoy swaps the filter config in place, without draining or re-creating the listener.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as wasm_filter_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.wasm.v3 import wasm_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from controlplane.ir import SidecarIR
from controlplane.policies.extraction import verdicts_translate as verdicts
from controlplane.policies.extraction.ir import ExtractionIR, HardeningIR, policies_of
from controlplane.policies.rate.ir import RateEnforcement
from controlplane.policies.rate.ir import of as rate_of
from controlplane.translate import names
from controlplane.translate.module import Module, Phase
from controlplane.translate.protos import ads_source, pack
from controlplane.xds import resources as rt

WASM_ENV = "MODELGUARD_WASM"
# Package data (pyproject.toml), so a non-editable install (the image) finds it. In the
# source tree the file is a symlink to wasm/modelguard_filter.wasm, the one `make wasm` builds.
MODULE_PATH = Path(__file__).resolve().parent / "data" / "modelguard_filter.wasm"
WASM_FILTER_TYPE = "type.googleapis.com/" + wasm_filter_pb2.Wasm.DESCRIPTOR.full_name
V8 = "envoy.wasm.runtime.v8"
RISK_DIGEST_HEX = 32  # 128 bits of a header key's SHA-256, as the verdict filters use


@functools.cache
def module_bytes() -> tuple[bytes, str]:
    """The filter module and its sha256 (``$MODELGUARD_WASM`` overrides the checked-in one)."""
    path = Path(os.environ.get(WASM_ENV) or MODULE_PATH)
    code = path.read_bytes()
    return code, hashlib.sha256(code).hexdigest()


def config_name(extraction: ExtractionIR) -> str:
    """The ECDS resource (and HTTP filter) name of one policy's filter."""
    ref = extraction.policy
    return f"modelguard.extraction.{ref.namespace}.{ref.name}"


def _hardening(h: HardeningIR | None) -> dict[str, Any]:
    if h is None:
        return {}
    out: dict[str, Any] = {}
    if h.top_k is not None:
        out["topK"] = h.top_k
    if h.round_digits is not None:
        out["roundDigits"] = h.round_digits
    if h.label_only:
        out["labelOnly"] = True
    if h.noise:
        out["noise"] = h.noise
    return out


def _request(extraction: ExtractionIR, instances_header: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "maxBytes": extraction.max_request_bytes,
        "maxDepth": extraction.max_depth,
    }
    if instances_header:
        out["instancesHeader"] = instances_header
    if extraction.max_instances is not None:
        out["maxInstances"] = extraction.max_instances
    if extraction.instances is not None:
        out["instances"] = list(extraction.instances)
    if extraction.request_format != "json":
        out["format"] = extraction.request_format
    return out


def filter_config(
    extraction: ExtractionIR, node_id: str, instances_header: str | None = None
) -> dict[str, Any]:
    """The JSON the filter reads in ``proxy_on_configure`` (wasm/src/filter.c);
    ``instances_header``: set a budget's instance class in that request header."""
    key = extraction.client_key
    client_key: dict[str, Any]
    if key.source == "header":
        client_key = {"header": key.name}
    elif key.source == "sourceIP":
        client_key = {"sourceIP": True}
    elif key.source == "identity":
        client_key = {"identity": True}
    else:
        # Compile reads a jwtClaim key as the header the caller filter copies the verified
        # claim into (compile.rate.client_key), so policies never get here; an IR built by
        # hand with a claim is fed as the anonymous client "".
        client_key = {"jwtClaim": key.name}
    config: dict[str, Any] = {
        "policy": f"{extraction.policy.namespace}/{extraction.policy.name}",
        "clientKey": client_key,
        "scores": list(extraction.scores) if extraction.scores is not None else [],
        "maxBodyBytes": extraction.max_body_bytes,
        "request": _request(extraction, instances_header),
    }
    if extraction.response_format != "json":
        config["responseFormat"] = extraction.response_format
    if extraction.deny_unhardenable:
        config["onUnhardenable"] = "Deny"
    if extraction.scores is not None and extraction.output is not None:
        config["output"] = _hardening(extraction.output)
    if extraction.scores is not None and extraction.tier_header and extraction.tiers:
        config["tierHeader"] = extraction.tier_header
        config["tiers"] = {name: _hardening(h) for name, h in extraction.tiers}
        if extraction.risk_overrides:
            # Per-client tier overrides from the extraction-risk estimate (onRisk harden).
            # Header keys are secrets: verdicts hold their SHA-256, and so does this map (its
            # first RISK_DIGEST_HEX hex digits); the filter hashes the caller's key to look.
            digested = extraction.client_key.source == "header"
            config["riskOverrides"] = {
                (key[:RISK_DIGEST_HEX] if digested else key): dict(t)
                for key, t in extraction.risk_overrides
            }
            if digested:
                config["riskKeyDigest"] = RISK_DIGEST_HEX
    feed = extraction.feed
    if feed is not None:
        config["feed"] = {
            "cluster": names.CONTROL_PLANE_CLUSTER,
            "nodeId": node_id,
            "maxBodyBytes": feed.max_body_bytes,
            "batchQueries": feed.batch_queries,
            "batchBytes": feed.batch_bytes,
            "flushMs": feed.flush_ms,
            "maxInFlight": feed.max_in_flight,
            "timeoutMs": feed.timeout_ms,
        }
    return config


def extension_config(
    extraction: ExtractionIR, node_id: str, instances_header: str | None = None
) -> extension_pb2.TypedExtensionConfig:
    code, sha256 = module_bytes()
    config = json.dumps(
        filter_config(extraction, node_id, instances_header), sort_keys=True, separators=(",", ":")
    )
    plugin = wasm_pb2.PluginConfig(
        name=config_name(extraction),
        vm_config=wasm_pb2.VmConfig(
            # One VM per worker for every policy running this build of the module.
            vm_id=f"modelguard-{sha256[:16]}",
            runtime=V8,
            code=base_pb2.AsyncDataSource(local=base_pb2.DataSource(inline_bytes=code)),
        ),
        configuration=pack(wrappers_pb2.StringValue(value=config)),
        # A crashed VM is replaced for the next request; no response leaves unhardened.
        failure_policy=wasm_pb2.FAIL_RELOAD,
        # Hold response headers while the body is rewritten, so content-length stays true.
        allow_on_headers_stop_iteration=wrappers_pb2.BoolValue(value=True),
    )
    return extension_pb2.TypedExtensionConfig(
        name=config_name(extraction),
        typed_config=pack(wasm_filter_pb2.Wasm(config=plugin)),
    )


def _active(extraction: ExtractionIR) -> bool:
    hardens = extraction.scores is not None and (
        extraction.output is not None or any(h != HardeningIR() for _, h in extraction.tiers)
    )
    # Request limits (size, depth, instances) apply to every policy's traffic.
    limits = extraction.max_request_bytes > 0
    return hardens or extraction.feed is not None or limits


def counts_instances(ir: SidecarIR) -> bool:
    """Whether a Wasm filter sets the instance class of a budget of instances on this
    sidecar (the first active one does): it reads every request's whole body anyway, so the
    rate limit module then needs no counter of its own."""
    rate = rate_of(ir)
    quota = rate.by(RateEnforcement.QUOTA) if rate else ()
    return any(limit.cost == "instances" for limit in quota) and any(
        _active(e) for e in policies_of(ir)
    )


class WasmExtraction(Module):
    name = "envoy.filters.http.wasm"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        return [
            hcm_pb2.HttpFilter(
                name=config_name(e),
                config_discovery=config_source_pb2.ExtensionConfigSource(
                    config_source=ads_source(),
                    type_urls=[WASM_FILTER_TYPE],
                ),
            )
            for e in policies_of(ir)
            if _active(e)
        ]

    def extra_resources(self, ir: SidecarIR) -> dict[str, list[Message]]:
        active = [e for e in policies_of(ir) if _active(e)]
        header = names.INSTANCES_HEADER if counts_instances(ir) else None
        configs: list[Message] = [
            extension_config(e, ir.node_id, header if i == 0 else None)
            for i, e in enumerate(active)
        ]
        return {rt.EXTENSION_CONFIG: configs} if configs else {}


MODULE = WasmExtraction()
MODULES: tuple[tuple[int, Module], ...] = (
    (Phase.VERDICTS, verdicts.MODULE),
    (Phase.HARDENING, MODULE),
)
