"""A user of the installed package: the wheel installed NON-editable into a fresh venv, its
`modelguard` run from a folder outside the source tree, as the README shows the commands.

test_wheel_install.py proves `serve` + `bootstrap` + Envoy from the wheel. What it leaves out,
and a user meets first: `modelguard run` (the embedded default: demo model, sidecar, banner)
from the installed package; `run` where there is no policies/ folder (it served nothing,
silently); the banner's hints, which named `.venv/bin/modelguard`, a file such a user does not
have; and the listing commands (`status`, `usage`, `quarantine list`, `traces`) of the
installed CLI against that control plane. Dependencies reach the fresh venv as in
test_wheel_install (one .pth line to the test venv's site-packages); nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from controlplane.netutil import free_port, http_request
from tests.conftest import REPO, Processes
from tests.integration.test_wheel_install import INSTANCE, install_wheel

pytestmark = pytest.mark.envoy


def test_the_installed_cli_runs_the_embedded_default_outside_the_source_tree(
    tmp_path: Path, processes: Processes
) -> None:
    modelguard = install_wheel(tmp_path)[0] / "bin" / "modelguard"
    home = tmp_path / "home"  # a user's folder: no policies/, no .venv/
    home.mkdir()
    env = {"PYTHONPATH": "", "MODELGUARD_CACHE_DIR": str(home / "cache"), "PATH": "/usr/bin:/bin"}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(modelguard), *argv], capture_output=True, text=True, timeout=60, cwd=home,
            env={**env, "HOME": str(home)},
        )  # fmt: skip

    version = cli("version")
    assert re.fullmatch(r"modelguard \d+\.\d+\.\d+\n", version.stdout), version
    # Where the README's `make run` would find policies/, an installed user has none.
    # Its ports are held here, so that without the check it could not start anything either.
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = str(held.getsockname()[1])
        missing = cli(
            "run", "--listen-port", port, "--outbound-port", "0", "--xds-port", port,
            "--admin-port", port, "--metrics-port", port,
        )  # fmt: skip
    assert missing.returncode == 2
    assert "--policies policies/: no such file or folder" in missing.stderr, missing.stderr

    ports = {name: free_port() for name in ("listen", "xds", "admin", "metrics")}
    run = processes.start(
        [str(modelguard), "run", "--policies", str(REPO / "policies"),
         "--listen-port", str(ports["listen"]), "--outbound-port", "0",
         "--xds-port", str(ports["xds"]), "--admin-port", str(ports["admin"]),
         "--metrics-port", str(ports["metrics"])],
        name="installed-run", env=env, cwd=home,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while "modelguard is running" not in processes.log_of(run):
        assert run.poll() is None, processes.log_of(run)
        assert time.monotonic() < deadline, processes.log_of(run)
        time.sleep(0.2)
    banner = processes.log_of(run)
    # The hints name the modelguard that runs, which the user can paste.
    assert f"{modelguard} status --admin 127.0.0.1:{ports['admin']}" in banner, banner
    assert ".venv/bin/" not in banner, banner
    hint = next(line for line in banner.splitlines() if " status --admin " in line)
    status_argv = shlex.split(hint.split("sidecar status", 1)[1])

    keys = dict(line.split() for line in (home / ".modelguard" / "demo-keys.txt").open())
    code, body = 0, b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            code, _, body = http_request(
                "POST", f"http://127.0.0.1:{ports['listen']}/v1/predict",
                json.dumps(INSTANCE).encode(),
                {"content-type": "application/json", "x-api-key": keys["acme-standard"]},
                timeout=5.0,
            )  # fmt: skip
        except OSError:
            code = 0
        if code == 200:
            break
        time.sleep(0.3)
    assert code == 200, f"{code} {body!r}\n{processes.log_of(run)[-3000:]}"

    admin = ["--admin", f"127.0.0.1:{ports['admin']}"]
    status = subprocess.run(
        status_argv, capture_output=True, text=True, timeout=60, cwd=home, env=env
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"digits-model-0\s+digits-model\.demo\s+SotW\s+SYNCED", status.stdout)
    assert "AccessPolicy demo/digits-model      Accepted" in status.stdout
    quarantines = json.loads(cli("quarantine", "list", "--all", "-o", "json", *admin).stdout)
    assert quarantines["entries"] == [] and quarantines["monitor"]["queries"] >= 0
    usage = cli("usage", *admin)
    assert usage.returncode == 0, usage.stderr
    traces = cli("traces", "--verdict", "hardened", *admin)
    assert traces.returncode == 0, traces.stderr

    # The README: profiles are cached, so a restart does not recalibrate; `run` kept none.
    deadline = time.monotonic() + 120
    while "profile calibrated" not in processes.log_of(run):
        assert run.poll() is None and time.monotonic() < deadline, processes.log_of(run)
        time.sleep(0.5)
    assert list((home / ".modelguard" / "profiles").glob("*.json")), processes.log_of(run)

    # Ctrl-C stops everything it started.
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 0, processes.log_of(run)[-2000:]
    assert "stopped: control plane, sidecar and demo model" in processes.log_of(run)
    assert "Traceback" not in processes.log_of(run), processes.log_of(run)[-3000:]
