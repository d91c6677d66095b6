"""``modelguard run`` (the embedded default) and ``modelguard serve`` as test subjects: on
free ports, in their own session, stopped by PID; their banner read from their output."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from controlplane.netutil import free_port
from tests.conftest import REPO, Processes

MODELGUARD = str(Path(sys.executable).parent / "modelguard")


@dataclass
class Embedded:
    process: subprocess.Popen[bytes]
    processes: Processes
    listen_port: int
    outbound_port: int
    xds_port: int
    admin_port: int
    metrics_port: int = 0  # HTTP: /metrics and /ui

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def output(self) -> str:
        return self.processes.log_of(self.process)

    def ports_argv(self) -> list[str]:
        return [
            "--listen-port", str(self.listen_port),
            "--outbound-port", str(self.outbound_port),
            "--xds-port", str(self.xds_port),
            "--admin-port", str(self.admin_port),
            "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip


def start_embedded(
    processes: Processes,
    workdir: Path,
    name: str = "run",
    timeout: float = 120.0,
    policies: str = "policies/",
) -> Embedded:
    """Start `modelguard run --policies policies/` on free ports; wait for its banner."""
    embedded = Embedded(
        process=None,  # type: ignore[arg-type]
        processes=processes,
        listen_port=free_port(),
        outbound_port=free_port(),
        xds_port=free_port(),
        admin_port=free_port(),
        metrics_port=free_port(),
    )
    argv = [
        MODELGUARD, "run", "--policies", policies,  # as make run, from the repository
        "--workdir", str(workdir), *embedded.ports_argv(),
    ]  # fmt: skip
    embedded.process = processes.start(argv, name=name, env={**os.environ}, cwd=REPO)
    deadline = time.monotonic() + timeout
    while "modelguard is running" not in embedded.output():
        if embedded.process.poll() is not None:
            raise AssertionError(f"modelguard run exited early:\n{embedded.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no banner after {timeout}s:\n{embedded.output()}")
        time.sleep(0.2)
    return embedded


def start_serve(
    processes: Processes, *argv: str, name: str = "serve", timeout: float = 60.0
) -> subprocess.Popen[bytes]:
    """Start ``modelguard serve *argv``; wait for its banner (it is listening then)."""
    server = processes.start([MODELGUARD, "serve", *argv], name=name)
    deadline = time.monotonic() + timeout
    while "modelguard control plane" not in processes.log_of(server):
        assert server.poll() is None, processes.log_of(server)
        assert time.monotonic() < deadline, processes.log_of(server)
        time.sleep(0.1)
    return server


def modelguard(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MODELGUARD, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
