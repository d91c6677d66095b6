"""Real Envoy processes: they serve, they stop, and a bad config fails loudly."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.local.envoy import EnvoyError, EnvoyProcess, validate_config
from controlplane.netutil import http_request
from controlplane.sidecar.bootstrap import XDS_CLUSTER, build_bootstrap

pytestmark = pytest.mark.envoy

INSTANCE = [0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0] * 8


HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "envoy.extensions.filters.http.router.v3.Router"


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def static_bootstrap(listen_port: int, model_port: int, admin_port: int) -> dict[str, Any]:
    """One listener → one cluster → the demo model; no xDS."""
    connection_manager = {
        "@type": f"type.googleapis.com/{HCM}",
        "stat_prefix": "ingress",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "model",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "demo-model"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"type.googleapis.com/{ROUTER}"},
            }
        ],
    }
    return {
        "node": {"id": "static-test", "cluster": "test"},
        "admin": {"address": _address(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "ingress",
                    "address": _address(listen_port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": connection_manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "demo-model",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "demo-model",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _address(model_port)}}]}
                        ],
                    },
                }
            ],
        },
    }


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_envoy_serves_the_model_and_stops(
    demo_model: tuple[str, int], free_port: Callable[[], int], tmp_path: Path
) -> None:
    listen_port, admin_port = free_port(), free_port()
    envoy = EnvoyProcess(
        static_bootstrap(listen_port, demo_model[1], admin_port),
        admin_port=admin_port,
        log_path=tmp_path / "envoy.log",
    )
    with envoy:
        envoy.wait_ready(10)
        assert envoy.server_state() == "LIVE"
        body = json.dumps({"instances": [INSTANCE]}).encode()
        status, headers, data = http_request(
            "POST",
            f"http://127.0.0.1:{listen_port}/v1/predict",
            body,
            {"content-type": "application/json"},
        )
        assert status == 200, data
        assert "x-envoy-upstream-service-time" in headers  # it went through Envoy
        answer = json.loads(data)
        assert answer["model"] == "digits-logreg"
        [prediction] = answer["predictions"]
        assert sum(prediction["probabilities"]) == pytest.approx(1.0)
        direct = json.loads(
            http_request("POST", f"http://127.0.0.1:{demo_model[1]}/v1/predict", body)[2]
        )
        assert answer == direct

        status, _, data = http_request(
            "POST", f"http://127.0.0.1:{listen_port}/v1/predict", b"{bad"
        )
        assert status == 400 and "error" in json.loads(data)

        stats = envoy.stats()
        assert stats["http.ingress.downstream_rq_2xx"] >= 1
        assert stats["http.ingress.downstream_rq_4xx"] >= 1
        assert envoy.stats(r"^cluster\.demo-model\.upstream_rq_total$") == {
            "cluster.demo-model.upstream_rq_total": 2
        }
        dump = envoy.config_dump()
        assert "ingress" in json.dumps(dump["configs"])
        pid = envoy.pid
        assert pid is not None and envoy.alive()
    assert not envoy.alive()
    assert not pid_exists(pid)
    assert (tmp_path / "envoy.log").exists()
    assert "starting main dispatch loop" in envoy.log_text()
    envoy.stop()  # idempotent


def test_two_envoys_run_side_by_side(
    demo_model: tuple[str, int], free_port: Callable[[], int]
) -> None:
    # Each gets its own base id: no clash on hot-restart shared memory.
    envoys = []
    try:
        for _ in range(2):
            listen_port, admin_port = free_port(), free_port()
            envoy = EnvoyProcess(
                static_bootstrap(listen_port, demo_model[1], admin_port), admin_port=admin_port
            )
            envoys.append(envoy)
            envoy.start()
            envoy.wait_ready(10)
        assert all(e.alive() for e in envoys)
        assert len({e.pid for e in envoys}) == 2
    finally:
        for envoy in envoys:
            envoy.stop()
    assert not any(pid_exists(e.pid) for e in envoys if e.pid)


def broken_bootstrap(admin_port: int) -> dict[str, Any]:
    config = static_bootstrap(1, 1, admin_port)
    config["static_resources"]["clusters"][0]["connect_timeout"] = "soon"
    return config


def test_validate_config_reports_envoys_reason(free_port: Callable[[], int]) -> None:
    ok, output = validate_config(static_bootstrap(free_port(), free_port(), free_port()))
    assert ok, output
    ok, output = validate_config(broken_bootstrap(free_port()))
    assert not ok
    assert "connect_timeout" in output or "Duration" in output, output
    ok, output = validate_config("static_resources: {clusters: [{name: x, type: NOPE}]}")
    assert not ok
    assert "NOPE" in output, output


def test_start_fails_with_envoys_message_and_leaves_no_process(
    free_port: Callable[[], int],
) -> None:
    admin_port = free_port()
    envoy = EnvoyProcess(broken_bootstrap(admin_port), admin_port=admin_port)
    started = time.monotonic()
    with pytest.raises(EnvoyError, match="exited with code") as failure:
        envoy.start()
    assert time.monotonic() - started < 10
    assert "connect_timeout" in str(failure.value) or "Duration" in str(failure.value)
    assert envoy.pid is not None and not pid_exists(envoy.pid)


def test_start_fails_when_the_listener_port_is_taken(
    demo_model: tuple[str, int], free_port: Callable[[], int]
) -> None:
    taken = demo_model[1]
    admin_port = free_port()
    envoy = EnvoyProcess(static_bootstrap(taken, taken, admin_port), admin_port=admin_port)
    try:
        with pytest.raises(EnvoyError, match=r"(?i)address already in use|cannot bind"):
            envoy.start()
            # Some Envoy versions bind listeners after admin is up: wait for the verdict.
            envoy.wait_ready(10)
    finally:
        envoy.stop()


def test_sidecar_without_control_plane_waits_and_retries_fast(
    free_port: Callable[[], int],
) -> None:
    sidecar = Sidecar(
        node_id="digits-0.demo",
        service="digits",
        namespace="demo",
        identity="spiffe://cluster.local/ns/demo/sa/digits",
        app_port=8080,
        inbound_port=15006,
    )
    xds_port, admin_port = free_port(), free_port()
    envoy = EnvoyProcess(
        build_bootstrap(sidecar, xds_host="127.0.0.1", xds_port=xds_port, admin_port=admin_port),
        admin_port=admin_port,
    )
    with envoy:
        # Admin answers at once, but the server waits for its first CDS/LDS.
        assert envoy.server_state() == "PRE_INITIALIZING"
        with pytest.raises(EnvoyError, match="not LIVE"):
            envoy.wait_ready(0.5)
        time.sleep(2.5)
        attempts = envoy.stat(f"cluster.{XDS_CLUSTER}.upstream_cx_total")
        # retry_back_off 0.25 to 1 s (Envoy's default doubles from 0.5 s up to 30 s:
        # measured here, 12 attempts in 6 s with ours, 5 without).
        assert attempts >= 3, envoy.log_tail()
        assert envoy.alive()
