"""One error vocabulary for every service, and the two tables that translate it.

Domain code raises a :class:`ServiceError` subclass. The gRPC interceptor turns it into a status code
(``shared.grpc.interceptors``); the gateway turns a gRPC status into an HTTP status with
:data:`GRPC_TO_HTTP` (the grpc-gateway ``HTTPStatusFromCode`` table).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of all expected errors. ``message`` is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field  # the request field at fault, when there is one


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


class StartupError(Exception):
    """A service cannot start (missing model folder, port in use, ...). Printed as one line."""


# grpc-gateway runtime/errors.go HTTPStatusFromCode.
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        OutOfRange,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        Internal,
    )
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC status code (500 when unmapped)."""
    return GRPC_TO_HTTP.get(code, 500)


ERROR_FIELD_KEY = "x-error-field"  # trailing metadata: the request field a ServiceError names


def from_rpc_error(err: grpc.RpcError) -> ServiceError:
    """The ServiceError a failed gRPC call stands for (clients re-raise these), with the field at fault
    when the server named one."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    field = None
    try:
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        field = dict(trailing or ()).get(ERROR_FIELD_KEY)
    except Exception:  # noqa: BLE001 - metadata is a courtesy; the status is what counts
        field = None
    cls = _BY_CODE.get(code, Internal)
    out = cls(details or code.name, field=field)
    out.code = code
    return out
