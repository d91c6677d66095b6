"""The API-key Lua filter remembers digests per worker (a data-path fix of issue 9): a real
Envoy with the generated filter and RBAC must decide exactly as if it hashed every request,
across cache hits, evictions, keys too long to cache, and forged digest headers."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from bench.lib.load import backend_bootstrap, bootstrap, cluster, hcm, listener
from controlplane.ir import AccessIR, AccessRule, Action
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from controlplane.translate import apikey, rbac
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
