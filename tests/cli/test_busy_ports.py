"""A second instance on busy ports is refused, naming the port and who holds it (issue 19):
no SO_REUSEPORT on the control plane's gRPC servers nor on the sidecars' listeners."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from controlplane.netutil import free_port, port_holder
from tests.cli.embedded import modelguard, start_embedded, start_serve
from tests.conftest import Processes

pytestmark = pytest.mark.envoy


@pytest.mark.timeout(300)
def test_a_second_run_on_busy_ports_exits_naming_the_port(
    processes: Processes, tmp_path: Path
) -> None:
    first = start_embedded(processes, tmp_path / "first")
    started = time.monotonic()
    second = modelguard("run", "--policies", "policies/", "--workdir", str(tmp_path / "second"),
                        *first.ports_argv())  # fmt: skip
    assert second.returncode != 0, second.stdout + second.stderr
    assert time.monotonic() - started < 60  # refused at once, not after a timeout
    message = second.stderr
    # The first port checked is the sidecar's listener; the message names it and its holder.
    assert f"127.0.0.1:{first.listen_port} is already in use" in message, message
    assert "by pid " in message and "envoy" in message, message
    assert "modelguard is running" not in second.stdout
    assert first.process.poll() is None  # the first instance is untouched


@pytest.mark.timeout(120)
def test_a_second_serve_on_the_same_xds_port_is_refused(
    processes: Processes, tmp_path: Path
) -> None:
    xds, admin = free_port(), free_port()
    argv = ["serve", "--insecure", "--policies", "policies/", "--verdicts", "",
            "--xds-port", str(xds), "--admin-port", str(admin)]  # fmt: skip
    first = start_serve(processes, *argv[1:], name="serve-1")
    second = modelguard(*argv)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"xDS port 127.0.0.1:{xds} is already in use by pid {first.pid}" in second.stderr
    # Only the admin port taken: named as such.
    third = modelguard(*argv[:-4], "--xds-port", str(free_port()), "--admin-port", str(admin))
    assert third.returncode == 1
    assert f"admin port 127.0.0.1:{admin} is already in use" in third.stderr


def test_port_holder_names_the_listening_process() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        holder = port_holder(port)
        assert holder is not None and holder.startswith("pid ")
        assert "python" in holder or "pytest" in holder
    assert port_holder(port) is None
