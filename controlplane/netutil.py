"""Small network helpers shared by the local runner and the tests (stdlib only)."""

from __future__ import annotations

import http.client
import socket
import time
import urllib.parse


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until host:port accepts connections; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if port_open(host, port):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.1f}s")
        time.sleep(0.05)


def http_request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request: (status, headers with lower-case names, body).

    Never raises on 4xx/5xx: callers check denials (403) and limits (429) through Envoy.
    Connection errors and timeouts do raise (OSError / TimeoutError).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme in {url!r}")
    if parts.hostname is None:
        raise ValueError(f"no host in {url!r}")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        data = response.read()
        # Repeated headers (e.g. set-cookie) are joined the way HTTP allows.
        merged: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return response.status, merged, data
    finally:
        conn.close()


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` (any address), from /proc/net."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    listening = len(fields) > 9 and fields[3] == "0A"  # 0A: LISTEN
                    if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:  # not Linux, or no /proc
            continue
    return inodes


def port_holder(port: int) -> str | None:
    """Who listens on ``port``: ``pid 123 (modelguard run ...)``, or None when that cannot
    be told (no /proc, or the process belongs to another user)."""
    import os

    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if not any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to inspect
            continue
        command = " ".join(a.decode("utf-8", "replace") for a in argv if a)
        if len(command) > 100:
            command = command[:97] + "..."
        return f"pid {pid} ({command})"
    return None


# The flag of `modelguard serve`/`run` that moves each port a failed bind names.
PORT_FLAGS = {
    "xDS": "--xds-port",
    "admin": "--admin-port",
    "metrics": "--metrics-port",
    "sidecar listener": "--listen-port",
    "outbound": "--outbound-port",
}


def port_in_use_message(what: str, host: str, port: int) -> str:
    """``the xDS port 127.0.0.1:18000 is in use by pid 42 (...)``, for a failed bind, with
    the flag that picks another port."""
    holder = port_holder(port)
    flag = PORT_FLAGS.get(what)
    return (
        f"the {what} port {host}:{port} is already in use"
        + (f" by {holder}" if holder else "")
        + ": stop that process or choose another port"
        + (f" with {flag}" if flag else "")
    )


def port_available(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now (no SO_REUSEPORT: a port someone
    listens on is refused, as Envoy's and gRPC's binds will be)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no holder
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
