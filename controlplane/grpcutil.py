"""Registering gRPC services so that a request body that does not decode is refused clearly
and counted.

grpc.aio decodes a unary request before any handler of ours runs; when that fails it answers
UNKNOWN itself and nothing of ours sees the call, so junk from a broken or hostile client
was invisible. Services registered through ``decode_checked(server)`` decode in their
handler instead: an undecodable body gets INVALID_ARGUMENT ("undecodable request to
<service>/<method>: <the protobuf error>") and is counted per service and method
(``decode_failures(server)``, exported as ``modelguard.grpc.undecodable_requests``).

Streaming requests are left to grpc (a stream's undecodable message ends that stream; ADS
handles its own). Interceptors still run first: a call refused there (e.g. an
unauthenticated sidecar call) is not counted here.
"""

from __future__ import annotations

import collections
import inspect
import threading
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # the stubs are generic, the runtime classes are not
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Generic = grpc.GenericRpcHandler[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _Generic = grpc.GenericRpcHandler


class DecodeFailures:
    """Requests refused because their body did not decode, by (service, method)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()  # read by metric collection on another thread

    def note(self, service: str, method: str) -> None:
        with self._lock:
            self._counts[service, method] += 1

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


_FAILURES: weakref.WeakKeyDictionary[Any, DecodeFailures] = weakref.WeakKeyDictionary()
_FAILURES_LOCK = threading.Lock()


def decode_failures(server: grpc.aio.Server) -> DecodeFailures:
    """The counts of ``server``'s services registered through ``decode_checked``."""
    with _FAILURES_LOCK:
        failures = _FAILURES.get(server)
        if failures is None:
            failures = _FAILURES[server] = DecodeFailures()
        return failures


class _Undecodable:
    """What the deserializer hands the handler instead of raising."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _checked_handler(
    handler: _Handler, service: str, method: str, failures: DecodeFailures
) -> _Handler:
    decode = handler.request_deserializer
    if handler.request_streaming or decode is None:
        return handler
    behavior = handler.unary_unary or handler.unary_stream
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler  # a synchronous behavior (none of ours): grpc's own answer stands

    def deserialize(raw: bytes) -> Any:
        try:
            return decode(raw)
        except Exception as err:  # DecodeError, or whatever a deserializer raises
            return _Undecodable(err)

    async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        failures.note(service, method)
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"undecodable request to {service}/{method}: {request.error}",
        )

    # The behaviors are grpc.aio's (coroutines, async generators); the stubs type them as
    # the synchronous API's.
    if handler.unary_unary is not None:
        unary: Any = handler.unary_unary

        async def once(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if type(request) is _Undecodable:
                await refuse(request, context)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            once,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )
    streaming: Any = handler.unary_stream

    async def each(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        if type(request) is _Undecodable:
            await refuse(request, context)
        async for response in streaming(request, context):
            yield response

    return grpc.unary_stream_rpc_method_handler(
        each, request_deserializer=deserialize, response_serializer=handler.response_serializer
    )


def _names(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class _CheckedGenericHandler(_Generic):
    def __init__(self, inner: _Generic, failures: DecodeFailures) -> None:
        self.inner, self.failures = inner, failures
        self._checked: dict[str, _Handler | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        if method in self._checked:
            return self._checked[method]
        handler = self.inner.service(handler_call_details)
        if handler is not None:
            handler = _checked_handler(handler, *_names(method), self.failures)
        if len(self._checked) < 1024:  # method names come from clients: keep the cache bounded
            self._checked[method] = handler
        return handler


class _CheckedRegistrar:
    """What the generated ``add_*Servicer_to_server`` functions use of a server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server: Any = server  # add_registered_method_handlers is missing from the stubs
        self.failures = decode_failures(server)

    def add_generic_rpc_handlers(self, handlers: Sequence[_Generic]) -> None:
        self.server.add_generic_rpc_handlers(
            tuple(_CheckedGenericHandler(h, self.failures) for h in handlers)
        )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, _Handler]
    ) -> None:
        self.server.add_registered_method_handlers(
            service,
            {m: _checked_handler(h, service, m, self.failures) for m, h in handlers.items()},
        )


def decode_checked(server: grpc.aio.Server) -> Any:
    """``server``, for registering services whose undecodable requests are refused and
    counted: ``add_FooServicer_to_server(servicer, decode_checked(server))``."""
    return _CheckedRegistrar(server)


def add_service(server: grpc.aio.Server, service: str, handlers: Mapping[str, _Handler]) -> None:
    """Registers hand-made method handlers (e.g. with another request type than the
    generated one) the same way."""
    registrar = _CheckedRegistrar(server)
    handlers = dict(handlers)
    registrar.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    registrar.add_registered_method_handlers(service, handlers)
