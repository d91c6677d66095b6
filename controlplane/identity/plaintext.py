"""Advice for a sidecar that speaks plaintext to the TLS xDS port, instead of a log flood.

gRPC's C core refuses such a connection during the TLS handshake, before any Python code
sees it, and writes one line per attempt straight to file descriptor 2 ("Handshake failed
... WRONG_VERSION_NUMBER", no peer, no advice); Envoy retries every second or so. The only
place to notice it is that line, so the control plane's process (``serve``/``run`` only;
never a library user's process) routes fd 2 through a pipe: those lines are counted
(``modelguard status``: refused ``plaintext_on_tls``) and replaced by one log line of
advice per minute; every other line goes on to the real stderr unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

REASON = "plaintext_on_tls"
ADVICE_EVERY = 60.0  # seconds between two advice lines
ADVICE = (
    "a sidecar speaks plaintext to the TLS xDS port %s (%d attempt(s) so far): bootstrap it "
    "with --identity-dir, or serve --insecure"
)


def is_plaintext_attempt(line: bytes) -> bool:
    # BoringSSL's answer to bytes that are no TLS record: an HTTP/2 preface, say.
    return b"Handshake failed" in line and b"WRONG_VERSION_NUMBER" in line


class PlaintextWatch:
    """Owns fd 2 between ``start`` and ``stop``; ``count`` is called once per attempt."""

    def __init__(
        self, address: str, count: Callable[[str], None], every: float = ADVICE_EVERY
    ) -> None:
        self.address, self.count, self.every = address, count, every
        self.attempts = 0
        self._last_advice = -float("inf")
        self._saved: int | None = None
        self._read_fd: int | None = None
        self._out: int | None = None  # the real stderr, the pump's own copy
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        self._saved = os.dup(2)
        self._out = os.dup(2)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._read_fd = read_fd
        self._thread = threading.Thread(target=self._pump, name="plaintext-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._saved is None:
            return
        os.dup2(self._saved, 2)  # the pipe's last writer is gone: the pump sees EOF
        os.close(self._saved)
        self._saved = None
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _pump(self) -> None:
        assert self._read_fd is not None and self._out is not None
        out, pending = self._out, b""
        try:
            while chunk := os.read(self._read_fd, 65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line + b"\n", out)
            if pending:
                self._line(pending, out)
        except OSError:  # stderr gone: nothing left to say it on
            pass
        finally:
            os.close(self._read_fd)
            os.close(out)

    def _line(self, line: bytes, out: int) -> None:
        if not is_plaintext_attempt(line):
            with contextlib.suppress(OSError):
                os.write(out, line)
            return
        self.attempts += 1
        self.count(REASON)
        now = time.monotonic()
        if now - self._last_advice >= self.every:
            self._last_advice = now
            log.warning(ADVICE, self.address, self.attempts)
