"""Shared fixtures: the Envoy binary, free ports, the demo model, and process cleanup.

Every process a test starts runs in its own session and is stopped by its PID
(SIGTERM, then SIGKILL after a grace period), never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

import pytest

from controlplane import netutil
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.local.envoy import EnvoyError, EnvoyProcess, envoy_binary
from controlplane.sidecar.bootstrap import XdsCredentials, build_bootstrap

REPO = Path(__file__).resolve().parent.parent


def stop_process(process: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM by PID, SIGKILL after ``grace``; reaps it (no zombie left)."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    except ProcessLookupError:
        process.poll()


class _Stoppable(Protocol):
    def stop(self) -> None: ...


class Processes:
    """Starts processes for one test and stops all of them (newest first) afterwards."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._items: list[subprocess.Popen[bytes] | _Stoppable] = []
        self._logs: dict[int, Path] = {}

    def start(
        self,
        argv: list[str],
        *,
        name: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session; stdout+stderr go to ``<log_dir>/<name>.log``."""
        name = name or Path(argv[0]).name
        log_path = self.log_dir / f"{name}-{len(self._items)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=cwd or REPO,
                start_new_session=True,
            )
        self._logs[process.pid] = log_path
        self._items.append(process)
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> str:
        return self._logs[process.pid].read_text(errors="replace")

    def track(self, item: _Stoppable) -> Any:
        """Stop ``item`` (an EnvoyProcess, a server...) with the rest; returns it."""
        self._items.append(item)
        return item

    def stop_all(self) -> None:
        while self._items:
            item = self._items.pop()
            if isinstance(item, subprocess.Popen):
                stop_process(item)
            else:
                item.stop()


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    """The Envoy binary. Never skipped: a missing Envoy is a broken setup."""
    try:
        return envoy_binary()
    except EnvoyError as err:
        pytest.fail(f"Envoy is required for these tests: {err}")


@pytest.fixture
def free_port() -> Callable[[], int]:
    """A factory of free loopback TCP ports: ``port = free_port()``."""
    return netutil.free_port


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def start_demo_model(processes: Processes, timeout: float = 60.0) -> tuple[str, int]:
    """Start ``python -m controlplane.local.model`` on a free port; wait for /healthz."""
    host, port = "127.0.0.1", netutil.free_port()
    process = processes.start(
        [sys.executable, "-m", "controlplane.local.model", "--host", host, "--port", str(port)],
        name="demo-model",
    )
    deadline = time.monotonic() + timeout  # a cold start trains the model (a few seconds)
    while True:
        if process.poll() is not None:
            log = processes.log_of(process)
            pytest.fail(f"demo model exited with {process.returncode}:\n{log}")
        try:
            status, _, _ = netutil.http_request("GET", f"http://{host}:{port}/healthz", timeout=1.0)
            if status == 200:
                return host, port
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"demo model not healthy on {host}:{port} within {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The demo model API as a subprocess, shared by the session: yields (host, port).

    It is stateless; a test that wants to stop or restart a model starts its own with
    the ``start_model`` fixture.
    """
    group = Processes(tmp_path_factory.mktemp("demo-model"))
    try:
        yield start_demo_model(group)
    finally:
        group.stop_all()


@pytest.fixture
def start_model(processes: Processes) -> Callable[[], tuple[str, int]]:
    """A factory of private demo models (stopped with the test): ``host, port = start_model()``."""
    return lambda: start_demo_model(processes)


# The demo's reference data (policies/digits-reference.csv), for ExtractionPolicies that
# use the reference detectors.
DIGITS_REFERENCE = REPO / "policies" / "digits-reference.csv"


@pytest.fixture(scope="session")
def profile_cache(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """Seeds a control plane's profile cache (STATE/profiles, next to its verdicts file)
    with the digits reference's profile, calibrated once per session, so a test's control
    plane starts Calibrated instead of calibrating for tens of seconds."""
    import shutil

    from controlplane.api.reference import load_file
    from controlplane.extraction.calibrate import cached_profile

    built = tmp_path_factory.mktemp("profiles")
    cached_profile("digits", load_file(DIGITS_REFERENCE, "label"), built, label_column="label")

    def seed(state: Path) -> Path:
        shutil.copytree(built, state / "profiles", dirs_exist_ok=True)
        return state / "profiles"

    return seed


def demo_sidecar(
    app_port: int,
    xds_port: int,
    log_path: Path,
    *,
    service: str = "digits-model",
    node_id: str | None = None,
    delta: bool = False,
    outbound_port: int | None = None,
    extra_args: tuple[str, ...] = (),
    identity_dir: str | os.PathLike[str] | None = None,
) -> tuple[EnvoyProcess, int]:
    """A sidecar of ``service`` in the demo namespace (a real Envoy, configured over ADS from
    127.0.0.1:``xds_port``) in front of the workload on ``app_port``, with its inbound
    listener and admin on free loopback ports. Returns it not started, and its inbound port.
    With ``identity_dir`` (the control plane's identity folder) it holds the credentials
    ``modelguard bootstrap`` gives a sidecar: xDS over TLS with its token.

    EnvoyProcess starts Envoy in its own session and stops it by PID.
    """
    inbound, admin = netutil.free_port(), netutil.free_port()
    sidecar = Sidecar(
        node_id=node_id or f"{service}-0",
        service=service,
        namespace="demo",
        identity=f"spiffe://cluster.local/ns/demo/sa/{service}",
        app_port=app_port,
        inbound_port=inbound,
        inbound_address="127.0.0.1",
        outbound_port=outbound_port,
    )
    credentials = None
    if identity_dir is not None:
        credentials = XdsCredentials.for_sidecar(sidecar, identity_dir)
    envoy = EnvoyProcess(
        build_bootstrap(
            sidecar,
            xds_host="127.0.0.1",
            xds_port=xds_port,
            admin_port=admin,
            delta=delta,
            credentials=credentials,
        ),
        admin_port=admin,
        log_path=log_path,
        extra_args=extra_args,
    )
    return envoy, inbound


class Redis:
    """Debian's redis-server on a free loopback port, no persistence."""

    def __init__(self, processes: Processes) -> None:
        self.processes, self.port = processes, netutil.free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required (make setup installs Debian's redis-server)")
        self.process = self.processes.start(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            name="redis",
        )
        netutil.wait_for_port("127.0.0.1", self.port, timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


@pytest.fixture
def redis_server(processes: Processes) -> Redis:
    """A started Redis, stopped with the test's other processes."""
    server = Redis(processes)
    server.start()
    return server


class Upstream:
    """A workload behind a sidecar, on a free loopback port, started at once: answers every
    POST with 200 and whatever the test sets (``body``, ``content_type``), and records the
    request bodies it received (``seen``; chunked ones reassembled). ``keep_alive``: it
    answers as HTTP/1.1 and keeps connections open (else HTTP/1.0, one request each)."""

    def __init__(self, keep_alive: bool = False) -> None:
        self.body, self.content_type = b"{}", "application/json"
        self.seen: list[bytes] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_POST(self) -> None:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                else:
                    data = self.rfile.read(int(self.headers.get("content-length") or 0))
                upstream.seen.append(data)
                self.send_response(200)
                self.send_header("content-type", upstream.content_type)
                self.send_header("content-length", str(len(upstream.body)))
                self.end_headers()
                self.wfile.write(upstream.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
