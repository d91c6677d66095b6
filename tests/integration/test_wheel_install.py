"""The image's path without Docker: build the wheel from exactly what k8s/image/Dockerfile
copies, install it NON-editable into a fresh venv, run ``modelguard serve`` from there with the
demo policies, start a real Envoy from ``modelguard bootstrap``, and send a request through it.

This catches what an editable install hides: files the code reads from the source tree (the
Wasm module) that are not package data, and repo-relative paths.

Dependencies: the fresh venv gets the wheel alone (``--no-deps``) and reaches its
dependencies through one ``.pth`` line naming the test venv's site-packages. That is the same
set of files ``make setup`` installed (including the forced reinstall of opentelemetry-proto
and googleapis-common-protos after xds-protos, which tests/unit/test_install.py and
``test_dockerfile_installs_what_make_setup_installs`` pin), so the dependencies are what the
image gets; what is under test is the package itself. A ``.pth`` path line only appends to
``sys.path``: the ``.pth`` files inside that folder (the editable install's finder for this
checkout) are not processed, and the fresh venv's own site-packages comes first, so
``controlplane`` can only come from the wheel (asserted below). ``--system-site-packages``
would not do: it would leave the editable install active. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from controlplane.app.runner import demo_keys
from controlplane.local.envoy import EnvoyProcess
from controlplane.netutil import free_port, http_request
from tests.conftest import REPO, Processes

pytestmark = pytest.mark.envoy

DOCKERFILE = REPO / "k8s" / "image" / "Dockerfile"
# A digit (an 8×8 image) the demo model answers.
INSTANCE = {"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}


def _docker_context(into: Path) -> None:
    """Copy what the Dockerfile's COPY lines copy (relative to its WORKDIR), nothing else."""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line, comments=True)
        *sources, dest = words[1:]
        for source in sources:
            src = REPO / source
            target = into / dest
            if dest.endswith("/") or len(sources) > 1:
                target = target / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(
                    src, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(src, target, follow_symlinks=False)


def _run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def install_wheel(tmp_path: Path) -> tuple[Path, Path]:
    """The wheel built from the image's files, installed non-editable (``--no-deps``) into a
    fresh venv under ``tmp_path``; its dependencies are this test venv's, through a .pth
    file (nothing is downloaded). Returns (the venv, its purelib folder)."""
    context, dist, venv = (tmp_path / d for d in ("context", "dist", "venv"))
    context.mkdir()
    dist.mkdir()
    _docker_context(context)
    # --no-build-isolation: setuptools from the test venv, so nothing is downloaded.
    _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(context)],
        cwd=context,
    )  # fmt: skip
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(next(dist.glob("modelguard-*.whl")))],
        cwd=tmp_path,
    )  # fmt: skip
    purelib = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            cwd=tmp_path,
        ).strip()
    )
    (purelib / "_modelguard_test_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    return venv, purelib


def test_dockerfile_installs_what_make_setup_installs() -> None:
    """The image must reinstall the two packages xds-protos overwrites, as make setup does."""
    text = DOCKERFILE.read_text()
    assert "pip install --no-cache-dir ." in text
    assert "--force-reinstall --no-deps" in text
    for package in ("opentelemetry-proto==", "googleapis-common-protos=="):
        assert f"grep -o '{package}[0-9.]*' pyproject.toml" in text, package
    # The reinstall comes after the package (and so after xds-protos).
    assert text.index("pip install --no-cache-dir .") < text.index("--force-reinstall")
    assert "COPY wasm/modelguard_filter.wasm" in text


def test_wheel_installed_non_editable_serves_a_real_envoy(
    tmp_path: Path, processes: Processes, envoy_bin: Path
) -> None:
    started = time.monotonic()
    venv, purelib = install_wheel(tmp_path)
    python = venv / "bin" / "python"
    work = tmp_path / "work"
    work.mkdir()
    where = _run(
        [str(python), "-c", "import controlplane.policies.extraction.translate as w; "
         "print(w.__file__); "
         "print(w.MODULE_PATH.is_file() and not w.MODULE_PATH.is_symlink())"],
        cwd=work,
    ).split()  # fmt: skip
    assert where[0].startswith(str(purelib)), f"controlplane imported from {where[0]}"
    assert where[1] == "True", "the Wasm module is not package data of the wheel"

    modelguard = str(venv / "bin" / "modelguard")
    model_port, xds_port, admin_port, listen_port, envoy_admin = (free_port() for _ in range(5))
    env = {"MODELGUARD_CACHE_DIR": str(work / "cache"), "PYTHONPATH": ""}
    model = processes.start(
        [str(python), "-m", "controlplane.local.model", "--host", "127.0.0.1",
         "--port", str(model_port)],
        name="model", env=env, cwd=work,
    )  # fmt: skip
    identity = work / "identity"
    # The demo policies admit registered keys only (the Secret demo-keys, as `make run` has).
    key_folder, keys = demo_keys(work)
    api_key = next(iter(keys.values()))
    plane = processes.start(
        [modelguard, "serve", "--policies", str(REPO / "policies"), "--xds-port", str(xds_port),
         "--admin-port", str(admin_port), "--verdicts", "", "--identity-dir", str(identity),
         "--api-keys", str(key_folder)],
        name="serve", env=env, cwd=work,
    )  # fmt: skip
    # The CA and the bootstrap-token key exist once the control plane listens.
    deadline = time.monotonic() + 30
    while "xDS on" not in processes.log_of(plane):
        assert plane.poll() is None, processes.log_of(plane)
        assert time.monotonic() < deadline, processes.log_of(plane)
        time.sleep(0.1)
    bootstrap = work / "bootstrap.yaml"
    _run(
        [modelguard, "bootstrap", "--service", "digits-model", "--namespace", "demo",
         "--app-port", str(model_port), "--inbound-port", str(listen_port),
         "--admin-port", str(envoy_admin), "--xds", f"127.0.0.1:{xds_port}",
         "--identity-dir", str(identity), "-o", str(bootstrap)],
        cwd=work,
    )  # fmt: skip
    envoy = processes.track(
        EnvoyProcess(bootstrap.read_text(), admin_port=envoy_admin, log_path=work / "envoy.log")
    )
    envoy.start()
    envoy.wait_ready(30)

    deadline = time.monotonic() + 45
    status, body = 0, b""
    while time.monotonic() < deadline:
        for name, process in (("serve", plane), ("model", model)):
            assert process.poll() is None, f"{name} exited:\n{processes.log_of(process)}"
        try:
            status, _, body = http_request(
                "POST",
                f"http://127.0.0.1:{listen_port}/v1/predict",
                json.dumps(INSTANCE).encode(),
                {"content-type": "application/json", "x-api-key": api_key},
                timeout=5.0,
            )
        except OSError:
            status = 0
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200, f"{status} {body!r}\n{processes.log_of(plane)[-3000:]}"
    answer = json.loads(body)
    assert len(answer["predictions"]) == 1
    # The demo policy hardens outputs in the Wasm filter: the filter the wheel shipped runs.
    config = json.dumps(envoy.config_dump())
    assert "modelguard.extraction.demo" in config
    log = processes.log_of(plane)
    assert "FileNotFoundError" not in log and "Traceback" not in log, log[-3000:]
    assert time.monotonic() - started < 90
