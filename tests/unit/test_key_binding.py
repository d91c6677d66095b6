"""The binding of API keys to principals: one RBAC match per distinct set of principals.

The caller filter labels each verified key with its set of principals and the Deny RBAC
filter checks the label against the caller (issue 18: a match per key cost ~27k
instructions a request at 100 keys). The behaviour itself is replayed against a real Envoy
in tests/integration/test_access_mtls.py; here, that the labels and the policy agree.
"""

from __future__ import annotations

import re

from google.protobuf import json_format

from controlplane.ir import ApiKeyIR, CallerIR
from controlplane.policies.access.ir import AccessIR, JwtProvider
from controlplane.policies.access.translate import binding_policy
from controlplane.translate import apikey

CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
BILLING = "spiffe://cluster.local/ns/shop/sa/billing"


def key(i: int, *principals: str) -> ApiKeyIR:
    return ApiKeyIR(digest=f"{i:064x}", id=f"client-{i}", tenant=f"client-{i}",
                    principals=principals)


KEYS = (
    *(key(i, CHECKOUT) for i in range(60)),
    *(key(i, BILLING, "alice") for i in range(60, 90)),
    *(key(i) for i in range(90, 100)),  # bound to nobody
)


def test_keys_with_the_same_principals_share_a_label() -> None:
    labels = apikey.binding_labels(KEYS)
    assert len(labels) == 90  # the unbound keys have none
    assert {labels[k.digest] for k in KEYS[:60]} == {labels[KEYS[0].digest]}
    assert {labels[k.digest] for k in KEYS[60:90]} == {labels[KEYS[60].digest]}
    assert labels[KEYS[0].digest] != labels[KEYS[60].digest]
    assert apikey.binding_sets(KEYS) == [
        ("bind-0", ("alice", BILLING)),
        ("bind-1", (CHECKOUT,)),
    ]
    # The order of principals in a key's entry does not make another set.
    assert apikey.binding_labels([key(1, "a", "b"), key(2, "b", "a", "a")]) == {
        f"{1:064x}": "bind-0",
        f"{2:064x}": "bind-0",
    }


def test_the_caller_filter_sets_the_label_of_each_bound_key() -> None:
    source = apikey.script(caller=CallerIR(keys=KEYS, bind_peer=True))
    rows = dict(re.findall(r'\["([0-9a-f]{64})"\] = \{(.*)\},', source))
    assert rows[KEYS[0].digest].endswith('"bind-1"')
    assert rows[KEYS[60].digest].endswith('"bind-0"')
    assert rows[KEYS[95].digest].endswith("false")
    assert 'headers:add("x-modelguard-key-binding", entry[5])' in source


def test_the_deny_policy_matches_each_set_once() -> None:
    access = AccessIR(
        enforced=(),
        audited=(),
        default_deny=False,
        audit_default_deny=False,
        jwt_providers=(JwtProvider(name="idp", issuer="https://idp", jwks="{}"),),
        api_keys=True,
    )
    policy = binding_policy(access, CallerIR(keys=KEYS, bind_peer=True, bind_jwt=True))
    assert policy is not None
    text = json_format.MessageToJson(policy)
    # Peer: one group per set holding a SPIFFE ID; JWT: one per set holding a subject.
    assert text.count('"x-modelguard-key-binding"') == 3
    assert text.count('"x-modelguard-key-id"') == 0
    assert text.count(CHECKOUT) == 1 and text.count(BILLING) == 1
    peer, jwt = policy.principals
    bound = peer.and_ids.ids[2].not_id.or_ids.ids
    assert [b.and_ids.ids[0].header.string_match.exact for b in bound] == ["bind-0", "bind-1"]
    assert bound[0].and_ids.ids[1].authenticated.principal_name.exact == BILLING
    (only,) = [jwt.and_ids.ids[2].not_id]
    assert only.and_ids.ids[0].header.string_match.exact == "bind-0"  # alice's set only
