"""HTTP plumbing of the gateway: one error type, one error body, JSON parsing, SSE framing."""

from __future__ import annotations

import json
import socket
from typing import Any

from flask import Response, g, has_app_context, request

from shared.errors import ServiceError, http_status

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}


class HTTPError(Exception):
    """An error answered to the client: status, message (shown as-is) and the field at fault."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}

    @classmethod
    def from_service_error(cls, err: ServiceError) -> HTTPError:
        status = http_status(err.code)
        headers = {"Retry-After": "1"} if status in (429, 503) else {}
        return cls(status, err.message, err.field, headers)


def error_body(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    """``message`` at the top (Megatron's CLI prints it), ``error`` in OpenAI's shape, the field named."""
    body: dict[str, Any] = {
        "message": message,
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": field,
            "code": status,
        },
        "request_id": getattr(g, "request_id", None) if has_app_context() else None,
    }
    if field:
        body["field"] = field
    return body


def stream_error(err: ServiceError | HTTPError) -> dict[str, Any]:
    """The one error event of every stream (the SSE of /v1/* and of job watches, WebSocket messages): the same
    body as a non-streamed error of the status the error maps to."""
    if isinstance(err, HTTPError):
        return error_body(err.status, err.message, err.field)
    return error_body(http_status(err.code), err.message, err.field)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(json.dumps(body) + "\n", status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, whatever the Content-Type; 400 otherwise."""
    raw = request.get_data(cache=True)
    if not raw:
        raise HTTPError(400, "request body is empty; send a JSON object")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "request body is not UTF-8 encoded") from None
    except json.JSONDecodeError as e:
        raise HTTPError(
            400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:
        raise HTTPError(400, "request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, f"request body must be a JSON object, got {type(doc).__name__}")
    return doc


def sse(doc: Any) -> str:
    return f"data: {json.dumps(doc)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def release_websocket(environ: dict) -> None:
    """An upgraded WebSocket may idle between prompts: lift the read timeout the production server puts on
    client sockets (services/gateway/server.py), before flask-sock starts reading it."""
    sock = environ.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        socket.socket.settimeout(sock, None)
