"""Every call on the xDS port proves which sidecar made it, not only the ADS stream.

The sidecar-facing services (query feed, OTLP, rate limit, RLQS) share the xDS port, so an
impostor who reaches the port could otherwise feed the extraction monitor fake counts
against a victim's key, report quota usage or flood telemetry. Envoy puts the sidecar's
credential on every call it makes through the control-plane cluster (an upstream
``credential_injector``: ``authorization: Bearer <token>``); this interceptor checks it
with the same authenticator as ADS before any service sees the request.

ADS is passed through: it authenticates itself on its first request, where the node (id,
identity) it must match arrives. Every other call is identified from its credential alone
(``SidecarAuthenticator.identify``); the caller is then available to the service as
``current_caller()`` for the checks that need it (a feed batch must name the sidecar that
sent it). A refused call ends UNAUTHENTICATED before its handler runs, and is counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from controlplane.identity.tokens import AuthenticationError, Caller

log = logging.getLogger(__name__)

# ADS (SotW and Delta) authenticates on its first request, against the node it names.
PASS_THROUGH = ("/envoy.service.discovery.v3.AggregatedDiscoveryService/",)
# How long a call waits for a credential whose review is under way (cluster mode reviews
# service-account tokens in a thread; reviews are cached, so this is once per token).
PENDING_WAIT = 3.0
_PENDING_POLL = 0.05

if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _Interceptor = grpc.aio.ServerInterceptor
_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "modelguard_caller", default=None
)


def current_caller() -> Caller | None:
    """The authenticated sidecar of the call being served; None with identity off."""
    return _CALLER.get()


class Identifier(Protocol):
    def identify(self, metadata: Mapping[str, str]) -> Caller: ...


class SidecarAuthInterceptor(_Interceptor):
    """Refuses every non-ADS call whose credential does not prove a sidecar."""

    def __init__(
        self, identifier: Identifier, on_refused: Callable[[str], None] | None = None
    ) -> None:
        self.identifier = identifier
        self.on_refused = on_refused
        self.refused: collections.Counter[str] = collections.Counter()  # by gRPC service

    async def _identify(self, metadata: Mapping[str, str]) -> Caller:
        from controlplane.identity.kubernetes import AuthenticationPending

        deadline = time.monotonic() + PENDING_WAIT
        while True:
            try:
                return self.identifier.identify(metadata)
            except AuthenticationPending:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(_PENDING_POLL)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method: str = details.method
        handler = await continuation(details)
        if handler is None or method.startswith(PASS_THROUGH):
            return handler  # unknown methods end UNIMPLEMENTED as before
        metadata = {
            key: value
            for key, value in (details.invocation_metadata or ())
            if isinstance(value, str)  # -bin values are never credentials
        }
        try:
            caller = await self._identify(metadata)
        except AuthenticationError as err:
            service = method.rsplit("/", 2)[-2] if method.count("/") >= 2 else method
            self.refused[service] += 1
            if self.on_refused is not None:
                self.on_refused("unauthenticated_call")
            log.warning("call %s refused: %s", method, err)
            return _refuse(handler, str(err))
        return _as_caller(handler, caller)


def _refuse(handler: _Handler, message: str) -> _Handler:
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover  (abort raises)

    return _same_kind(handler, deny_stream if handler.response_streaming else deny)


def _as_caller(handler: _Handler, caller: Caller) -> _Handler:
    behavior = _behavior(handler)
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler  # a synchronous behavior runs in a thread: no caller to hand it
    if inspect.isasyncgenfunction(behavior):

        async def each(request: Any, context: Any) -> AsyncIterator[Any]:
            token = _CALLER.set(caller)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                _CALLER.reset(token)

        return _same_kind(handler, each)

    async def once(request: Any, context: Any) -> Any:
        token = _CALLER.set(caller)
        try:
            return await behavior(request, context)
        finally:
            _CALLER.reset(token)

    return _same_kind(handler, once)


def _behavior(handler: _Handler) -> Callable[..., Any]:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary
        or handler.stream_stream
    )
    assert behavior is not None
    return behavior


def _same_kind(handler: _Handler, behavior: Any) -> _Handler:
    """A handler like ``handler`` (streaming, (de)serializers) with another behavior."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
