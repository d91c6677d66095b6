"""The API-key Lua filter remembers digests per worker (a data-path fix of issue 9): a real
Envoy with the generated filter and RBAC must decide exactly as if it hashed every request,
across cache hits, evictions, keys too long to cache, and forged digest headers."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import pytest

from bench.lib.load import backend_bootstrap, bootstrap, cluster, hcm, listener
from controlplane.ir import Action
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.policies.access import translate as rbac
from controlplane.policies.access.ir import AccessIR, AccessRule, PathMatch
from controlplane.translate import apikey
from controlplane.translate.render import to_dict

pytestmark = pytest.mark.envoy

LONG_KEY = "k" * 300  # longer than any cached key: hashed every time
ALLOWED = ("key-a", "key-c", LONG_KEY)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def sidecar() -> Iterator[int]:
    access = AccessIR(
        enforced=(
            AccessRule(
                name="bench.keys.rule-0",
                action=Action.ALLOW,
                api_key_hashes=tuple(_digest(k) for k in ALLOWED),
            ),
        ),
        audited=(),
        default_deny=True,
        audit_default_deny=False,
        api_keys=True,
    )
    lua = to_dict(rbac.api_key_filter())
    # Two entries: the third distinct key already starts the cache over.
    lua["typed_config"]["default_source_code"]["inline_string"] = apikey.script(2)
    filters = [lua, *(to_dict(f) for f in rbac.rbac_filters(access))]
    backend_port, backend_admin = free_port(), free_port()
    port, admin = free_port(), free_port()
    backend = EnvoyProcess(backend_bootstrap(backend_port, backend_admin), admin_port=backend_admin)
    proxy = EnvoyProcess(
        bootstrap(
            admin,
            [listener(port, hcm(filters, {"route": {"cluster": "model"}}))],
            [cluster("model", backend_port)],
        ),
        admin_port=admin,
    )
    try:
        backend.start().wait_ready(20)
        proxy.start().wait_ready(20)
        yield port
    finally:
        proxy.stop()
        backend.stop()


def _status(port: int, headers: dict[str, str]) -> int:
    status, _, _ = http_request("POST", f"http://127.0.0.1:{port}/v1/predict", b"{}", headers)
    return status


def test_cached_digests_decide_like_fresh_ones(sidecar: int) -> None:
    sequence = [
        ("key-a", 200),  # hashed, cached
        ("key-a", 200),  # from the cache
        ("key-b", 403),  # hashed, cached (the cache is full)
        ("key-c", 200),  # the cache starts over
        ("key-a", 200),  # hashed again after the eviction
        ("key-b", 403),
        (LONG_KEY, 200),  # never cached
        (LONG_KEY, 200),
        ("k" * 299, 403),
    ]
    for key, expected in sequence:
        assert _status(sidecar, {"x-api-key": key}) == expected, key[:12]
    # A digest header the caller sent is dropped, cached key or not.
    forged = {"x-modelguard-api-key-sha256": _digest("key-a")}
    assert _status(sidecar, forged) == 403
    assert _status(sidecar, {**forged, "x-api-key": "key-b"}) == 403
    assert _status(sidecar, {}) == 403


# Rules sharing keys. Mixed: methods, paths, Deny and Audit beside keys (the Deny filter and
# the Allow filter keep policies; key classes k1: deny-admin + allow-predict, k2:
# allow-predict + audit-deny, k3: allow-any + audit-allow).
K1, K2, K3 = "key-one", "key-two", "key-three"
MIXED = AccessIR(
    enforced=(
        AccessRule(
            name="demo.x.rule-0",
            action=Action.DENY,
            paths=(PathMatch("/admin/*"),),
            api_key_hashes=(_digest(K1),),
        ),
        AccessRule(
            name="demo.x.rule-1",
            action=Action.ALLOW,
            methods=("POST",),
            paths=(PathMatch("/v1/predict"),),
            api_key_hashes=(_digest(K1), _digest(K2)),
        ),
        AccessRule(name="demo.x.rule-2", action=Action.ALLOW, api_key_hashes=(_digest(K3),)),
    ),
    audited=(
        AccessRule(name="demo.y.rule-0", action=Action.DENY, api_key_hashes=(_digest(K2),)),
        AccessRule(
            name="demo.y.rule-1",
            action=Action.ALLOW,
            paths=(PathMatch("/v1/predict"),),
            api_key_hashes=(_digest(K3),),
        ),
    ),
    default_deny=True,
    audit_default_deny=True,
    api_keys=True,
)
# Keys alone: both Allow engines are digest maps (K1 is in two Allow rules: the first by
# name is named, as with policies), the Deny rules keep policies over key classes.
KEYS_ONLY = AccessIR(
    enforced=(
        AccessRule(name="demo.x.b", action=Action.ALLOW, api_key_hashes=(_digest(K1), _digest(K2))),
        AccessRule(name="demo.x.a", action=Action.ALLOW, api_key_hashes=(_digest(K1),)),
        AccessRule(name="demo.x.c", action=Action.DENY, api_key_hashes=(_digest(K3),)),
    ),
    audited=(
        AccessRule(name="demo.y.d", action=Action.DENY, api_key_hashes=(_digest(K1),)),
        AccessRule(name="demo.y.e", action=Action.ALLOW, api_key_hashes=(_digest(K3),)),
    ),
    default_deny=True,
    audit_default_deny=True,
    api_keys=True,
)
FORGED = {"x-modelguard-api-key-sha256": _digest(K1)}
# Key classes are named keys-0, keys-1, ...: a caller naming one gets nothing for it.
FORGED_CLASSES = [{"x-modelguard-api-key-class": f"keys-{i}"} for i in range(3)]
# method, path, headers, status, deciding rule of a 403 ("none": no Allow rule), audited
# Deny rule ("" = none), and the audit Allow engine's (rule, result) or None (not checked).
Case = tuple[str, str, dict[str, str], int, str, str, "tuple[str | None, str] | None"]
CASES: dict[str, tuple[AccessIR, list[Case]]] = {
    "mixed": (
        MIXED,
        [
            ("POST", "/v1/predict", {"x-api-key": K1}, 200, "", "", None),
            ("POST", "/admin/x", {"x-api-key": K1}, 403, "demo.x.rule-0", "", None),
            ("GET", "/v1/predict", {"x-api-key": K1}, 403, "none", "", (None, "denied")),
            (
                "POST",
                "/v1/predict",
                {"x-api-key": K2},
                200,
                "",
                "demo.y.rule-0",
                ("demo.x.rule-1", "allowed"),
            ),
            ("POST", "/admin/x", {"x-api-key": K2}, 403, "none", "demo.y.rule-0", None),
            ("GET", "/anything", {"x-api-key": K3}, 200, "", "", None),
            ("POST", "/v1/predict", {}, 403, "none", "", (None, "denied")),
            ("POST", "/v1/predict", {"x-api-key": "wrong"}, 403, "none", "", None),
            ("POST", "/v1/predict", FORGED, 403, "none", "", None),
            ("POST", "/admin/x", FORGED, 403, "none", "", None),
            *(
                ("POST", "/v1/predict", {**forged, "x-api-key": "wrong"}, 403, "none", "", None)
                for forged in FORGED_CLASSES
            ),
            *(("POST", "/admin/x", forged, 403, "none", "", None) for forged in FORGED_CLASSES),
        ],
    ),
    "keys-only": (
        KEYS_ONLY,
        [
            ("GET", "/v1/x", {"x-api-key": K1}, 200, "", "demo.y.d", ("demo.x.a", "allowed")),
            ("GET", "/v1/x", {"x-api-key": K2}, 200, "", "", None),
            ("GET", "/v1/x", {"x-api-key": K3}, 403, "demo.x.c", "", None),  # Deny first
            ("GET", "/v1/x", {"x-api-key": "wrong"}, 403, "none", "", (None, "denied")),
            ("GET", "/v1/x", {}, 403, "none", "", (None, "denied")),
            ("GET", "/v1/x", FORGED, 403, "none", "", (None, "denied")),
        ],
    ),
}


@pytest.fixture(params=sorted(CASES))
def policy_sidecar(request: pytest.FixtureRequest) -> Iterator[tuple[int, EnvoyProcess, str]]:
    access = CASES[request.param][0]
    lua = rbac.api_key_filter(access)
    filters = [to_dict(lua), *(to_dict(f) for f in rbac.rbac_filters(access))]
    manager = hcm(filters, {"route": {"cluster": "model"}})
    manager["typed_config"]["local_reply_config"] = to_dict(rbac.denial_reply())
    manager["typed_config"]["access_log"] = [to_dict(rbac.decision_log(access))]
    backend_port, backend_admin = free_port(), free_port()
    port, admin = free_port(), free_port()
    backend = EnvoyProcess(backend_bootstrap(backend_port, backend_admin), admin_port=backend_admin)
    proxy = EnvoyProcess(
        bootstrap(admin, [listener(port, manager)], [cluster("model", backend_port)]),
        admin_port=admin,
        extra_args=("--file-flush-interval-msec", "100"),  # access-log lines within 0.1 s
    )
    try:
        backend.start().wait_ready(20)
        proxy.start().wait_ready(20)
        yield port, proxy, request.param
    finally:
        proxy.stop()
        backend.stop()


def _decision_lines(proxy: EnvoyProcess) -> list[dict[str, object]]:
    path = proxy.log_path
    assert path is not None
    # Envoy's stderr shares the file, and a log line may end where an access-log line starts.
    decoder, lines = json.JSONDecoder(), []
    for line in path.read_text(errors="replace").splitlines():
        start = line.find('{"')
        while start >= 0:
            try:
                entry, end = decoder.raw_decode(line, start)
            except ValueError:
                start = line.find('{"', start + 1)
                continue
            if isinstance(entry, dict) and entry.get("log") == "modelguard.access":
                lines.append(entry)
            start = line.find('{"', end)
    return lines


def test_rules_sharing_keys_decide_and_log_by_rule(
    policy_sidecar: tuple[int, EnvoyProcess, str],
) -> None:
    """Each rule still matches exactly its own keys, as digest map or as policies: denials
    name the deciding rule, and the decision log names the audited rules."""
    port, proxy, name = policy_sidecar
    cases = CASES[name][1]
    for i, (method, path, headers, status, reason, _, _) in enumerate(cases):
        got, _, body = http_request(
            method,
            f"http://127.0.0.1:{port}{path}",
            b"{}",
            {**headers, "x-request-id": f"case-{i}"},
        )
        assert got == status, (i, got, body)
        if status == 403:
            assert json.loads(body)["reason"] == f"rbac_access_denied_matched_policy[{reason}]"
    # Access logs are written when the stream ends: wait for the last case's line.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = {str(entry["request_id"]): entry for entry in _decision_lines(proxy)}
        if f"case-{len(cases) - 1}" in lines:
            break
        time.sleep(0.1)
    for i, (_, _, _, status, reason, audited, audit_allow) in enumerate(cases):
        entry = lines.get(f"case-{i}")
        if status == 200 and not audited:
            assert entry is None, (i, entry)
            continue
        assert entry is not None, (i, sorted(lines))
        assert entry["status"] == status, (i, entry)
        if reason:
            assert entry["reason"] == f"rbac_access_denied_matched_policy[{reason}]", (i, entry)
        if audited:
            assert entry["audit_deny_rule"] == audited, (i, entry)
            assert entry["audit_deny_result"] == "denied", (i, entry)
        else:
            assert entry["audit_deny_result"] == "allowed", (i, entry)
            assert not entry["audit_deny_rule"], (i, entry)
        if audit_allow is not None:
            rule, result = audit_allow
            assert entry["audit_allow_rule"] == rule, (i, entry)
            assert entry["audit_allow_result"] == result, (i, entry)
