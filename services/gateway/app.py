"""The gateway's Flask app: routes, auth, request ids, body limit, one JSON error shape, HTTP metrics."""

from __future__ import annotations

import logging
import re
import time

from flask import Flask, g, request
from flask_restful import Api
from werkzeug.exceptions import HTTPException

from services.gateway import metrics as M
from services.gateway.auth import authorize
from services.gateway.config import GatewayConfig
from services.gateway.health import Health, Metrics, Ready
from services.gateway.http import HTTPError, error_body, json_response, release_websocket
from services.gateway.megatron_api import MegatronGenerate
from services.gateway.openai_api import (
    ChatCompletions,
    Completions,
    Detokenize,
    Models,
    Tokenize,
    TokenizerInfo,
)
from shared.errors import ServiceError
from shared.limits import MAX_REQUEST_ID_CHARS
from shared.logging import REQUEST_ID, new_request_id

logger = logging.getLogger(__name__)


def error_response(e: BaseException):
    """Every failure, whatever raised it, becomes a JSON body with a 4xx/5xx status (never 200)."""
    if isinstance(e, HTTPError):
        err = e
    elif isinstance(e, ServiceError):
        err = HTTPError.from_service_error(e)
    elif isinstance(e, HTTPException):
        message = {
            404: "not found: " + request.path,
            405: "The method is not allowed for the requested URL.",
            413: "request body is too large",
        }.get(e.code or 500, e.description or e.name)
        err = HTTPError(e.code or 500, message)
    else:
        logger.error("unhandled error on %s %s", request.method, request.path, exc_info=e)
        err = HTTPError(500, f"internal error (request_id={getattr(g, 'request_id', '-')})")
    return json_response(error_body(err.status, err.message, err.field), err.status, err.headers)


_REQUEST_ID = re.compile(rf"[\x20-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")


def _request_id(given: str | None) -> str:
    """The client's X-Request-Id when it is printable ASCII of at most 128 characters (it travels as gRPC
    metadata and into logs); otherwise a new id, and the refusal is logged."""
    if given is None or given == "":
        return new_request_id()
    if _REQUEST_ID.fullmatch(given):
        return given
    rid = new_request_id()
    logger.warning(
        "X-Request-Id %r is not printable ASCII of at most %d characters; using %s",
        given[:64],
        MAX_REQUEST_ID_CHARS,
        rid,
    )
    return rid


def _discard_unread_body(limit: int) -> None:
    """Read what the client sent and the route did not (a 405, 401 or 404 is answered before the body).

    gunicorn drains at most 64 KiB of an unread body and otherwise closes the connection after a response
    that announced keep-alive, so the client's next request on it would be dropped unanswered. Bounded
    by max_body_bytes (a larger body is a 413) and by the read timeout on the socket.
    """
    n = request.content_length or 0
    if not 0 < n <= limit:
        return
    try:
        while request.stream.read(1 << 16):
            pass
    except Exception:  # noqa: BLE001 - the client left or stalled: the server closes that connection
        logger.debug("could not read the rest of a request body", exc_info=True)


class JsonApi(Api):
    def handle_error(self, e):  # flask-restful's hook: keep one error shape for every route
        return error_response(e)


def create_app(cfg: GatewayConfig, pool) -> Flask:
    app = Flask("megastack-gateway")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    api = JsonApi(app, catch_all_404s=True)
    api.add_resource(MegatronGenerate, "/api", resource_class_args=(pool,))
    api.add_resource(Completions, "/v1/completions", "/completions", resource_class_args=(pool,))
    api.add_resource(ChatCompletions, "/v1/chat/completions", resource_class_args=(pool,))
    api.add_resource(Models, "/v1/models", resource_class_args=(pool,))
    api.add_resource(TokenizerInfo, "/tokenizer_info", resource_class_args=(pool,))
    api.add_resource(Tokenize, "/tokenize", resource_class_args=(pool,))
    api.add_resource(Detokenize, "/detokenize", resource_class_args=(pool,))
    api.add_resource(Health, "/health", resource_class_args=(pool,))
    api.add_resource(Ready, "/ready", resource_class_args=(pool, cfg.ready_timeout_s))
    api.add_resource(Metrics, "/metrics")
    from services.gateway.jobs_api import JobClients
    from services.gateway.jobs_api import register as register_jobs
    from services.gateway.websocket import register as register_websocket

    app.extensions["megastack_jobs"] = clients = JobClients(
        {"converter": cfg.converter_addr, "trainer": cfg.trainer_addr, "evaluator": cfg.evaluator_addr},
        max_watchers=cfg.watchers_limit,
    )
    register_jobs(api, clients)

    register_websocket(app, pool)
    app.register_error_handler(Exception, error_response)
    keys = cfg.key_scopes

    @app.before_request
    def _begin():
        if request.headers.get("Upgrade", "").lower() == "websocket":
            release_websocket(request.environ)
        g.request_id = _request_id(request.headers.get("X-Request-Id"))
        g.token = REQUEST_ID.set(g.request_id)
        g.start = time.perf_counter()
        refused = authorize(keys, request.headers.get("Authorization", ""), request.path)
        if refused is not None:
            raise HTTPError(refused[0], refused[1], "Authorization")

    @app.after_request
    def _end(resp):
        _discard_unread_body(cfg.max_body_bytes)
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - g.get("start", time.perf_counter())
        M.HTTP_REQUESTS.labels(route, request.method, str(resp.status_code)).inc()
        M.HTTP_DURATION.labels(route).observe(elapsed)
        resp.headers["X-Request-Id"] = g.get("request_id", "-")
        if route != "/metrics":
            logger.info("%s %s -> %d in %.3fs", request.method, request.path, resp.status_code, elapsed)
        return resp

    @app.teardown_request
    def _teardown(_exc):
        token = g.pop("token", None)
        if token is not None:
            REQUEST_ID.reset(token)

    return app
