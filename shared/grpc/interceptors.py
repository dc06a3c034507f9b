"""The one server interceptor every service installs.

For each call it: takes the request id from ``x-request-id`` metadata (or makes one) and puts it in the
logging context; maps :class:`ServiceError` to its status code; logs any other exception with its
traceback and answers ``INTERNAL`` with the request id (never the exception text); and records
``megastack_rpc_requests_total`` / ``megastack_rpc_duration_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from shared.errors import ERROR_FIELD_KEY, ServiceError
from shared.logging import REQUEST_ID, REQUEST_ID_KEY, new_request_id
from shared.metrics import RPC_DURATION, RPC_REQUESTS

logger = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, err: BaseException, rid: str) -> grpc.StatusCode:
    if isinstance(err, ServiceError):
        if err.field:  # the request field at fault travels too: the gateway's 400 names it
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid), (ERROR_FIELD_KEY, err.field)))
        context.abort(err.code, err.message)
    logger.error("unhandled error", exc_info=err)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (request_id={rid})")
    raise AssertionError("unreachable")  # context.abort always raises


class ServiceInterceptor(grpc.ServerInterceptor):
    def __init__(self, service: str) -> None:
        self.service = service

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        metadata = dict(details.invocation_metadata or ())
        rid = metadata.get(REQUEST_ID_KEY) or new_request_id()
        service = self.service

        def record(code: grpc.StatusCode, start: float) -> None:
            RPC_REQUESTS.labels(service, method, code.name).inc()
            RPC_DURATION.labels(service, method).observe(time.perf_counter() - start)

        def code_of(err: BaseException) -> grpc.StatusCode:
            return err.code if isinstance(err, ServiceError) else grpc.StatusCode.INTERNAL

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                token = REQUEST_ID.set(rid)
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
                try:
                    return inner(request, context)
                except Exception as err:  # noqa: BLE001 - the one place errors become statuses
                    code = code_of(err)
                    _abort(context, err, rid)
                finally:
                    record(code, start)
                    REQUEST_ID.reset(token)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            return factory(unary, handler.request_deserializer, handler.response_serializer)

        inner_stream = handler.unary_stream or handler.stream_stream

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = REQUEST_ID.set(rid)
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            try:
                yield from inner_stream(request, context)
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as err:  # noqa: BLE001
                code = code_of(err)
                _abort(context, err, rid)
            finally:
                if not context.is_active() and code == grpc.StatusCode.OK:
                    code = grpc.StatusCode.CANCELLED
                record(code, start)
                REQUEST_ID.reset(token)

        factory = (
            grpc.unary_stream_rpc_method_handler
            if handler.unary_stream
            else grpc.stream_stream_rpc_method_handler
        )
        return factory(streaming, handler.request_deserializer, handler.response_serializer)
