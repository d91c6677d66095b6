"""A plaintext sidecar against the TLS xDS port: one line of advice per minute instead of a
flood of handshake errors, and every attempt counted in `modelguard status` (issue 19)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from controlplane.netutil import free_port
from tests.cli.embedded import modelguard, start_serve
from tests.conftest import Processes


@pytest.mark.timeout(120)
def test_plaintext_attempts_get_one_line_of_advice_and_are_counted(
    processes: Processes, tmp_path: Path
) -> None:
    xds, admin = free_port(), free_port()
    server = start_serve(
        processes, "--policies", "policies/", "--verdicts", "",
        "--identity-dir", str(tmp_path / "identity"),
        "--xds-port", str(xds), "--admin-port", str(admin),
    )  # fmt: skip
    # What a sidecar bootstrapped without --identity-dir does: HTTP/2 in plaintext, again
    # and again (gRPC's reconnect backoff, like Envoy's).
    for _ in range(3):
        with (
            grpc.insecure_channel(f"127.0.0.1:{xds}") as channel,
            pytest.raises(grpc.FutureTimeoutError),
        ):
            grpc.channel_ready_future(channel).result(timeout=1.5)
    time.sleep(0.5)
    log = processes.log_of(server)
    advice = [line for line in log.splitlines() if "speaks plaintext to the TLS xDS port" in line]
    assert len(advice) == 1, log  # rate-limited: one line per minute
    assert "bootstrap it with --identity-dir, or serve --insecure" in advice[0]
    assert f"127.0.0.1:{xds}" in advice[0]
    assert "WRONG_VERSION_NUMBER" not in log  # the flood is gone
    status = modelguard("status", "--admin", f"127.0.0.1:{admin}", "-o", "json")
    refused = json.loads(status.stdout)["refused"]
    assert int(refused["plaintext_on_tls"]) >= 3, refused
    text = modelguard("status", "--admin", f"127.0.0.1:{admin}").stdout
    assert "plaintext connection(s) to the TLS xDS port" in text
    # Its stderr still carries everything else (the control plane's own log lines).
    assert "modelguard control plane: xDS on" in log
