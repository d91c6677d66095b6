"""Who may call the admin API (status, quarantine release, throttles, usage, traces).

On loopback (the default, and the manifests' choice) the admin API is reachable only from
inside the pod, so ``kubectl port-forward`` is the door and Kubernetes RBAC on
``pods/portforward`` is the lock. Bound to any other address it demands a bearer token:
``--admin-token-file`` (a Secret mounted as a file, re-read when it changes so a rotated
Secret takes effect without a restart); the server refuses to start beyond loopback
without one. Callers send ``authorization: Bearer <token>``; the ``modelguard`` commands
take it from ``$MODELGUARD_ADMIN_TOKEN`` or the file named by ``$MODELGUARD_ADMIN_TOKEN_FILE``.

A token on a plaintext channel can be read by anyone on the path: beyond loopback keep the
admin port inside a NetworkPolicy, or keep to loopback and port-forward.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor

log = logging.getLogger(__name__)

TOKEN_ENV = "MODELGUARD_ADMIN_TOKEN"
TOKEN_FILE_ENV = "MODELGUARD_ADMIN_TOKEN_FILE"


class AdminAuthError(ValueError):
    pass


def is_loopback(host: str, extra_non_loopback: tuple[str, ...] = ()) -> bool:
    """True for addresses only this host can reach. "0.0.0.0", "::" and names other than
    localhost reach further. ``extra_non_loopback`` lets a test treat one loopback address
    (127.0.0.2) as if it were not."""
    if host in extra_non_loopback:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenFile:
    """The expected token, re-read when the file's modification time changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: float | None = None
        self._token = b""
        self.current()  # fails now, at start, if the file is missing or empty

    def current(self) -> bytes:
        try:
            stamp = self.path.stat().st_mtime
            if stamp != self._stamp:
                token = self.path.read_bytes().strip()
                if not token:
                    raise AdminAuthError(f"admin token file {self.path} is empty")
                self._token, self._stamp = token, stamp
        except OSError as err:
            if not self._token:
                raise AdminAuthError(f"admin token file {self.path}: {err}") from err
            log.error("admin token file %s: %s; keeping the last token", self.path, err)
        return self._token


def _deny(message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


class BearerTokenInterceptor(_ServerInterceptor):
    """Every admin call must carry ``authorization: Bearer <token>``."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens
        self.refused = 0

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        if isinstance(header, bytes):
            header = header.decode(errors="replace")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self.tokens.current()
        ):
            return await continuation(handler_call_details)
        self.refused += 1
        log.warning("admin call %s refused: no valid bearer token", handler_call_details.method)
        return _deny(
            "the admin API requires 'authorization: Bearer <token>' (modelguard commands: "
            f"${TOKEN_ENV} or ${TOKEN_FILE_ENV})"
        )


def server_interceptors(
    host: str, token_file: str | None, extra_non_loopback: tuple[str, ...] = ()
) -> list[_ServerInterceptor]:
    """The admin server's interceptors; refuses an unauthenticated bind beyond loopback."""
    if token_file:
        return [BearerTokenInterceptor(TokenFile(token_file))]
    if not is_loopback(host, extra_non_loopback):
        raise AdminAuthError(
            f"admin API on {host} is reachable beyond this host: give --admin-token-file "
            "(a Secret), or bind it to 127.0.0.1 and use kubectl port-forward"
        )
    return []


# --- the client side (the modelguard commands) -------------------------------------------------


def _client_token() -> str | None:
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token.strip()
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        return Path(path).read_text().strip()
    return None


class _Bearer(_UnaryUnary, _UnaryStream):
    def __init__(self, token: str) -> None:
        self.metadata = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.metadata]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def admin_channel(address: str) -> grpc.Channel:
    """A channel to the admin API, with the bearer token from the environment if set."""
    channel = grpc.insecure_channel(address)
    token = _client_token()
    if token:
        return grpc.intercept_channel(channel, _Bearer(token))
    return channel
