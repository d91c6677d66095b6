"""ExtractionPolicy → ExtractionIR → the Wasm filter's ECDS config."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from envoy.extensions.filters.http.wasm.v3 import wasm_pb2 as wasm_filter_pb2
from google.protobuf import wrappers_pb2

from controlplane.api import ExtractionPolicy, parse_documents
from controlplane.ir import ClientKeyIR, PolicyRef
from controlplane.policies.extraction.compile import compile_extraction, parse_json_path
from controlplane.policies.extraction.ir import HardeningIR, QueryFeedIR
from controlplane.policies.extraction.translate import (
    WASM_FILTER_TYPE,
    extension_config,
    filter_config,
    module_bytes,
)


def _policy(spec: dict[str, Any]) -> ExtractionPolicy:
    doc = {
        "apiVersion": "modelguard.io/v1alpha1",
        "kind": "ExtractionPolicy",
        "metadata": {"name": "digits", "namespace": "demo"},
        "spec": {
            "targetRef": {"service": "digits"},
            "clientKey": {"header": "X-Api-Key"},
            "request": {"features": "$.instances[*]"},
            "response": {"scores": "$.predictions[*].probabilities"},
            **spec,
        },
    }
    loaded, violations = parse_documents(yaml.safe_dump(doc), "test")
    assert not violations, [str(v) for v in violations]
    policy = loaded[0].policy
    assert isinstance(policy, ExtractionPolicy)
    return policy


def test_compile_hardening_tiers_and_feed() -> None:
    (ir,) = compile_extraction(
        [
            _policy(
                {
                    "output": {
                        "topK": 2,
                        "roundDigits": 3,
                        "tierHeader": "x-tier",
                        "tiers": {"trial": {"labelOnly": True}, "internal": {}},
                    },
                    "detection": {"detectors": ["prada"]},
                }
            )
        ]
    )
    assert ir.policy == PolicyRef("ExtractionPolicy", "demo", "digits")
    assert ir.client_key == ClientKeyIR("header", "x-api-key")
    assert ir.scores == ("predictions", None, "probabilities")
    assert ir.output == HardeningIR(top_k=2, round_digits=3)
    # A tier that hardens nothing still replaces the default for its clients.
    assert ir.tiers == (("internal", HardeningIR()), ("trial", HardeningIR(label_only=True)))
    assert ir.feed == QueryFeedIR()


def test_no_detection_no_feed_and_no_output_no_hardening() -> None:
    (ir,) = compile_extraction([_policy({"output": {"noise": 0.1}})])
    assert ir.feed is None and ir.output == HardeningIR(noise=0.1)
    (ir,) = compile_extraction([_policy({"detection": {}})])
    assert ir.output is None and ir.feed is not None


def test_a_scores_path_the_sidecar_cannot_follow_hardens_nothing() -> None:
    policy = _policy({"response": {"scores": "$.predictions[-1]"}, "output": {"topK": 1}})
    (ir,) = compile_extraction([policy])
    assert ir.scores is None
    assert "output" not in filter_config(ir, "node-0")


def test_filter_config_is_what_the_filter_reads() -> None:
    (ir,) = compile_extraction(
        [
            _policy(
                {
                    "clientKey": {"sourceIP": True},
                    "output": {"roundDigits": 2, "tierHeader": "x-tier", "tiers": {"t": {}}},
                    "detection": {},
                }
            )
        ]
    )
    config = filter_config(ir, "node-0")
    assert config == {
        "policy": "demo/digits",
        "clientKey": {"sourceIP": True},
        "scores": ["predictions", None, "probabilities"],
        "maxBodyBytes": 512 * 1024,
        "output": {"roundDigits": 2},
        "tierHeader": "x-tier",
        "tiers": {"t": {}},
        "onUnhardenable": "Deny",
        "request": {"maxBytes": 65536, "maxDepth": 64, "instances": ["instances", None]},
        "feed": {
            "cluster": "modelguard-xds",
            "nodeId": "node-0",
            "maxBodyBytes": 65536,
            "batchQueries": 128,
            "batchBytes": 1048576,
            "flushMs": 250,
            "maxInFlight": 4,
            "timeoutMs": 5000,
        },
    }


def test_extension_config_carries_the_module_inline_with_its_sha256() -> None:
    (ir,) = compile_extraction([_policy({"output": {"topK": 1}})])
    resource = extension_config(ir, "node-0")
    assert resource.name == "modelguard.extraction.demo.digits"
    assert resource.typed_config.type_url == WASM_FILTER_TYPE
    wasm = wasm_filter_pb2.Wasm()
    assert resource.typed_config.Unpack(wasm)
    code, sha256 = module_bytes()
    assert wasm.config.vm_config.code.local.inline_bytes == code
    assert wasm.config.vm_config.vm_id == f"modelguard-{sha256[:16]}"
    assert wasm.config.vm_config.runtime == "envoy.wasm.runtime.v8"
    value = wrappers_pb2.StringValue()
    assert wasm.config.configuration.Unpack(value)
    assert json.loads(value.value)["output"] == {"topK": 1}


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("$.predictions[*].probabilities", ("predictions", None, "probabilities")),
        ("$['scores'][0]", ("scores", 0)),
        ('$["a b"].*', ("a b", None)),
        ("$", ()),
    ],
)
def test_json_path_steps(path: str, steps: tuple[object, ...]) -> None:
    assert parse_json_path(path) == steps


def test_json_path_rejects_what_the_sidecar_cannot_follow() -> None:
    with pytest.raises(ValueError, match="position 1"):
        parse_json_path("$..probabilities")
