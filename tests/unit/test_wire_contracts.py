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
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import controlplane.ratelimit.rules as rules_module
from controlplane.contracts import ratelimit as contract
from controlplane.contracts import trust_bundle as contract_tb
from controlplane.ir import ClientKeyIR
from controlplane.policies.rate import translate as translate_rate
from controlplane.policies.rate.ir import RateEnforcement, RateLimitIR
from controlplane.ratelimit.rules import Rule, units

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


@pytest.mark.parametrize(("counted", "cost"), [(True, 3), (False, 1)])
def test_the_quota_service_reads_the_bucket_ids_translate_writes(counted: bool, cost: int) -> None:
    """A request with an instance class (above 1 row) takes the bucket that reads it; one
    without takes the bucket whose class is the constant 1."""
    on_match = translate_rate._bucket(LIMIT, None, counted=counted)
    settings = on_match.action.typed_config
    from envoy.extensions.filters.http.rate_limit_quota.v3 import rate_limit_quota_pb2

    bucket = rate_limit_quota_pb2.RateLimitQuotaBucketSettings()
    assert settings.Unpack(bucket)
    ids = bucket.bucket_id_builder.bucket_id_builder
    # What the sidecar sends: string values as written, custom inputs as read (the instance
    # class header, set by the sidecar's body check).
    sent = {
        key: value.string_value if value.HasField("string_value") else "3"
        for key, value in ids.items()
    }
    assert Rule.parse(sent) == (WANT, contract.ANONYMOUS)
    assert units(sent) == cost
    assert contract.UNITS_KEY in ids
    # The limit travels in one entry (Envoy builds and hashes a bucket id entry by entry).
    assert set(ids) == {contract.RULE_KEY, contract.CLIENT_KEY, contract.UNITS_KEY}


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


# --- the trust bundle and the token SDS document ----------------------------------------------


def _xds_credential(bootstrap: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(the token secret the credential injector reads, the trusted CA, the header) of the
    bootstrap's control-plane cluster."""
    from controlplane.sidecar.bootstrap import XDS_CLUSTER

    [cluster] = [
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER
    ]
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    [options] = cluster["typed_extension_protocol_options"].values()
    injector = options["http_filters"][0]["typed_config"]["credential"]["typed_config"]
    return injector["credential"], tls["validation_context"]["trusted_ca"], injector["header"]


def test_an_injected_sidecar_reads_its_token_where_the_trust_bundle_points() -> None:
    from controlplane.identity.kubernetes import (
        AUTHORIZATION_METADATA,
        KubernetesTokenAuthenticator,
        trust_bundle_data,
    )
    from controlplane.sidecar import inject

    config = inject.InjectConfig()
    bootstrap = inject.sidecar_bootstrap(config, "fraud-model", 8080, 15006, {})
    credential, trusted_ca, header = _xds_credential(bootstrap)
    container = inject.sidecar_container(config, bootstrap, 15006)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    data = trust_bundle_data("ROOT PEM")  # what the control plane publishes

    # The ConfigMap the pod mounts is the one the control plane writes.
    ca_mount = mounts[inject.CA_VOLUME_SPEC["name"]]
    assert inject.CA_VOLUME_SPEC["configMap"]["name"] == contract_tb.TRUST_BUNDLE_CONFIGMAP
    assert trusted_ca == {"filename": f"{ca_mount}/{contract_tb.ROOT_CERT_KEY}"}
    assert data[contract_tb.ROOT_CERT_KEY] == "ROOT PEM"
    # The SDS source the bootstrap names is an entry of it, naming the secret it reads...
    sds_path = Path(credential["sds_config"]["path_config_source"]["path"])
    assert str(sds_path.parent) == ca_mount
    [secret] = yaml.safe_load(data[sds_path.name])["resources"]
    assert secret["name"] == credential["name"]
    # ...in the file the projected token is mounted at, minted for the audience TokenReview
    # asks about, and sent in the header the authenticator reads.
    [source] = inject.TOKEN_VOLUME_SPEC["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert secret["generic_secret"]["secret"]["filename"] == (
        f"{mounts[inject.TOKEN_VOLUME_SPEC['name']]}/{token['path']}"
    )
    assert token["audience"] == KubernetesTokenAuthenticator(api=None).audience
    assert header == AUTHORIZATION_METADATA


def test_a_written_bootstrap_reads_the_token_file_written_beside_it(tmp_path: Path) -> None:
    from controlplane.compile.inputs.inventory import Sidecar
    from controlplane.identity.tokens import AUTHORIZATION_METADATA
    from controlplane.sidecar.bootstrap import XdsCredentials, write_bootstrap

    sidecar = Sidecar(
        node_id="fraud-model-0.ml", service="fraud-model", namespace="ml",
        identity="spiffe://cluster.local/ns/ml/sa/fraud-model", app_port=8080,
        inbound_port=15006,
    )
    credentials = XdsCredentials(token="mgt-secret", ca_pem="ROOT PEM", server_id="spiffe://x")
    path = write_bootstrap(
        tmp_path / "sidecar.yaml", sidecar, xds_host="127.0.0.1", xds_port=18000,
        admin_port=15000, credentials=credentials,
    )
    bootstrap = yaml.safe_load(path.read_text())
    assert "mgt-secret" not in path.read_text()
    credential, _, header = _xds_credential(bootstrap)
    sds = Path(credential["sds_config"]["path_config_source"]["path"])
    [secret] = yaml.safe_load(sds.read_text())["resources"]
    assert secret["name"] == credential["name"]
    assert Path(secret["generic_secret"]["secret"]["filename"]).read_text() == "mgt-secret"
    assert header == AUTHORIZATION_METADATA


def test_the_token_sds_document_is_written_in_one_place() -> None:
    """Its producers import it; none builds its own (``"generic_secret"`` is its mark)."""
    writers = [
        p.relative_to(Path(contract_tb.__file__).parents[1]).as_posix()
        for p in Path(contract_tb.__file__).parents[1].rglob("*.py")
        if '"generic_secret": {"secret": {"filename"' in p.read_text()
    ]
    assert writers == ["contracts/trust_bundle.py"]


# --- a policy's (kind, namespace, name) -------------------------------------------------------


def test_every_box_names_a_policy_by_its_ref() -> None:
    """The store's status keys, compile's PolicyRef and the admin report all say
    ``PolicyBase.ref`` for the example policies."""
    from dataclasses import astuple

    from controlplane.compile import policy_ref
    from controlplane.compile.inputs.store import PolicyStore
    from controlplane.sources.files import FileSource

    examples = Path(__file__).resolve().parents[2] / "policies"
    store = PolicyStore()
    assert FileSource([examples], store).sync()
    policies = store.current().policies
    assert len({p.kind for p in policies}) >= 4
    assert {s.key for s in store.statuses()} == {p.ref for p in policies}
    for p in policies:
        assert astuple(policy_ref(p)) == p.ref == (p.kind, p.metadata.namespace, p.metadata.name)


def test_no_module_rebuilds_the_ref_by_hand() -> None:
    """``(p.kind, p.metadata.namespace, p.metadata.name)`` is ``p.ref``: one definition."""
    root = Path(contract_tb.__file__).parents[1]
    by_hand = re.compile(r"(\w+)\.kind, \1\.metadata\.namespace, \1\.metadata\.name\b")
    found = [
        f"{p.relative_to(root)}:{n}"
        for p in sorted(root.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if by_hand.search(line)
    ]
    assert found == []
