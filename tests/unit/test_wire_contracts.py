"""Each wire contract is written by one of ours and read back by another: these tests drive
the producer's real output through the real consumer, so the two cannot drift apart.

- rate limits: the descriptors and RLQS bucket ids ``translate.ratelimit`` builds are what
  ``ratelimit.rules`` parses (``controlplane.contracts.ratelimit`` names the keys);
- the sidecar's token SDS document: the file the bootstrap writer leaves beside a sidecar and
  the ConfigMap entry injected pods mount are one document (``sidecar.bootstrap``);
- a policy's (kind, namespace, name): the store's key, the status writer's key and the IR's
  ``PolicyRef`` are all ``PolicyBase.ref``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

import controlplane.ratelimit.rules as rules_module
from controlplane.contracts import ratelimit as contract
from controlplane.ir import ClientKeyIR, RateEnforcement, RateLimitIR
from controlplane.ratelimit.rules import Rule, units
from controlplane.translate import ratelimit as translate_rate

LIMIT = RateLimitIR(
    name="ml.fraud.daily",
    policy="ml/fraud",
    client_key=ClientKeyIR("header", "x-api-key"),
    requests=10_000,
    window_seconds=86_400,
    burst=10_000,
    enforcement=RateEnforcement.QUOTA,
    shadow=True,
    cost="instances",
)
WANT = Rule("ml.fraud.daily", "ml/fraud", 10_000, 86_400, True)


def _descriptor(actions: Any, headers: dict[str, str], peer: str) -> dict[str, str] | None:
    """The descriptor Envoy builds from one RateLimit's actions for a request, as the rate
    limit service receives it; None when an action does not apply (Envoy skips it)."""
    entries: dict[str, str] = {}
    for action in actions:
        kind = action.WhichOneof("action_specifier")
        if kind == "generic_key":
            entries[action.generic_key.descriptor_key] = action.generic_key.descriptor_value
        elif kind == "request_headers":
            value = headers.get(action.request_headers.header_name)
            if value is None:
                return None
            entries[action.request_headers.descriptor_key] = value
        elif kind == "header_value_match":
            match = action.header_value_match
            matched = all(h.name in headers for h in match.headers)  # present_match only
            if matched != match.expect_match.value:
                return None
            entries[match.descriptor_key] = match.descriptor_value
        elif kind == "remote_address":
            entries[contract.REMOTE_ADDRESS_KEY] = peer
        else:
            raise AssertionError(f"an action this test does not model: {kind}")
    return entries


@pytest.mark.parametrize(
    ("headers", "client"), [({"x-api-key": "k1"}, "k1"), ({}, contract.ANONYMOUS)]
)
def test_the_rate_limit_service_reads_the_descriptors_translate_writes(
    headers: dict[str, str], client: str
) -> None:
    built = [
        d
        for rl in translate_rate.rate_limits(LIMIT, with_rule=True)
        if (d := _descriptor(rl.actions, headers, "10.0.0.1")) is not None
    ]
    assert len(built) == 1  # exactly one alternative applies to a request
    assert Rule.parse(built[0]) == (WANT, client)


def test_a_client_keyed_by_address_is_read_back() -> None:
    by_ip = RateLimitIR(**{**LIMIT.__dict__, "client_key": ClientKeyIR("sourceIP")})
    [rl] = translate_rate.rate_limits(by_ip, with_rule=True)
    entries = _descriptor(rl.actions, {}, "10.0.0.7")
    assert entries is not None and Rule.parse(entries) == (WANT, "10.0.0.7")


def test_the_quota_service_reads_the_bucket_ids_translate_writes() -> None:
    on_match = translate_rate._bucket(LIMIT, None)
    settings = on_match.action.typed_config
    from envoy.extensions.filters.http.rate_limit_quota.v3 import rate_limit_quota_pb2

    bucket = rate_limit_quota_pb2.RateLimitQuotaBucketSettings()
    assert settings.Unpack(bucket)
    ids = bucket.bucket_id_builder.bucket_id_builder
    # What the sidecar sends: string values as written, custom inputs as read (the instance
    # count header, set by the sidecar's own Lua filter).
    sent = {
        key: value.string_value if value.HasField("string_value") else "3"
        for key, value in ids.items()
    }
    assert Rule.parse(sent) == (WANT, contract.ANONYMOUS)
    assert units(sent) == 3
    assert contract.UNITS_KEY in ids


@pytest.mark.parametrize("end", [translate_rate.__file__, rules_module.__file__])
def test_no_end_keeps_its_own_copy_of_the_keys(end: str) -> None:
    """Both ends import the names; neither assigns one (equal strings are often the same
    object in Python, so comparing values or identities could not tell a copy)."""
    names = {n for n in vars(contract) if n.isupper()}
    tree = ast.parse(Path(end).read_text())
    assigned = {
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    assert not names & assigned, f"{end} keeps its own {sorted(names & assigned)}"
