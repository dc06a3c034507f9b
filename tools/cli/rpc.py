"""gRPC calls from the CLI: errors become one clear line (ServiceError), never a traceback."""

from __future__ import annotations

from typing import Any

import grpc

from shared.errors import Unavailable, from_rpc_error


def rpc(method: Any, request: Any, *, stream: bool = False, timeout: float | None = None) -> Any:
    try:
        if stream:
            return _stream(method(request, timeout=timeout))
        return method(request, timeout=timeout)
    except grpc.RpcError as e:
        raise _error(e) from None


def _stream(call):
    try:
        yield from call
    except grpc.RpcError as e:
        raise _error(e) from None


def _error(e: grpc.RpcError):
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"service unreachable ({e.details()}); is the stack up? (`make up`)")
    return from_rpc_error(e)
