"""WebSocket streaming as PAI-EAS / BladeLLM clients expect it (``GET /ws``, upgraded; also at
``/api/predict/<service_name>``, the URL form EAS clients are configured with).

The client connects (with ``Authorization: <key>`` or ``Bearer <key>`` when the gateway has API keys),
sends one JSON message per prompt and reads messages until ``is_end``::

    -> {"prompt": "...", "max_new_tokens": 64, "temperature": 0.7, "top_k": 0, "top_p": 0.9}
    <- {"text": "Once", "is_end": false}
    <- {"text": " upon", "is_end": false}
    <- {"is_end": true, "finish_reason": "length", "usage": {...}}

``text`` is the new piece since the previous message. Several prompts may follow on one connection, one
at a time. An error is the gateway's one error body (as a non-streamed error and the SSE error events:
``{"message", "field", "error": {"message", "type", "param", "code"}}``) plus ``"is_end": true``, and the
connection stays open (so does every other error, 5xx included); a client that leaves mid-stream frees its
engine slot at once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask_sock import ConnectionClosed, Sock

from protos.textgen.v1 import textgen_pb2 as pb
from services.gateway import metrics as M
from services.gateway.fields import finish_name, integer, number, sampling_params, stop_list
from services.gateway.http import HTTPError, error_body, stream_error
from shared.errors import ServiceError
from shared.limits import INT64_MAX

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
IGNORED = {"history", "use_stream_chat", "stream"}  # sent by EAS chat clients; nothing to do with them here


def register(app, pool) -> None:
    sock = Sock(app)

    @sock.route("/ws")
    def ws(conn) -> None:  # noqa: ANN001 - simple_websocket.Server
        serve(conn, pool)

    @sock.route("/api/predict/<service_name>")
    def eas(conn, service_name: str) -> None:  # noqa: ANN001
        # PAI-EAS clients are configured with ws://HOST/api/predict/<service_name>: same protocol as /ws
        logger.info("EAS WebSocket client for service %r", service_name)
        serve(conn, pool)


def parse(raw: Any) -> pb.GenerateStreamRequest:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "messages must be UTF-8 JSON text", "message") from None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise HTTPError(400, f"message is larger than {MAX_MESSAGE_BYTES} bytes", "message")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise HTTPError(400, f"message is not JSON ({e.msg} at column {e.colno})", "message") from None
    except RecursionError:
        raise HTTPError(400, "message is nested too deeply", "message") from None
    if not isinstance(doc, dict):
        raise HTTPError(400, "message must be a JSON object with a prompt", "message")
    unknown = sorted(
        set(doc)
        - IGNORED
        - {
            "prompt",
            "max_new_tokens",
            "max_tokens",
            "tokens_to_generate",
            "temperature",
            "top_k",
            "top_p",
            "repetition_penalty",
            "seed",
            "stop",
        }
    )
    if unknown:
        raise HTTPError(400, f"unknown field {unknown[0]!r}", unknown[0])
    prompt = doc.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise HTTPError(400, "prompt must be a non-empty string", "prompt")
    length_keys = [k for k in ("max_new_tokens", "max_tokens", "tokens_to_generate") if k in doc]
    if len(length_keys) > 1:
        raise HTTPError(400, f"give one of {', '.join(length_keys)}", length_keys[1])
    max_new = integer(doc, length_keys[0] if length_keys else "max_new_tokens", 256, 1)
    temperature = number(doc, "temperature", 1.0, 0.0, 100.0)
    top_k = integer(doc, "top_k", 0, 0)
    top_p = number(doc, "top_p", 0.0, 0.0, 1.0)
    penalty = number(doc, "repetition_penalty", 1.0, 0.0, 100.0, lo_open=True)
    seed = integer(doc, "seed", -1, 0, INT64_MAX)
    sampling = sampling_params(temperature, top_k, top_p, seed, penalty)
    params = pb.GenerationParams(
        sampling=sampling, stopping=pb.StoppingParams(max_new_tokens=max_new, stop=stop_list(doc))
    )
    return pb.GenerateStreamRequest(prompts=[pb.Prompt(text=prompt)], params=params)


def serve(conn, pool) -> None:  # noqa: ANN001
    M.WS_CONNECTIONS.inc()
    try:
        while True:
            try:
                raw = conn.receive()
            except ConnectionClosed:
                return
            if raw is None:
                continue
            M.WS_MESSAGES.inc()
            try:
                request = parse(raw)
            except HTTPError as e:
                M.WS_ERRORS.labels("bad_request").inc()
                if not _send(conn, {**stream_error(e), "is_end": True}):
                    return
                continue
            except Exception:  # noqa: BLE001 - a message the parser did not foresee: answer, keep the connection
                logger.exception("could not read a WebSocket message")
                M.WS_ERRORS.labels("internal").inc()
                if not _send(conn, {**error_body(500, "internal error reading the message"), "is_end": True}):
                    return
                continue
            if not _relay(conn, pool, request):
                return
    finally:
        M.WS_CONNECTIONS.dec()


def _relay(conn, pool, request: pb.GenerateStreamRequest) -> bool:  # noqa: ANN001
    """Stream one prompt's generation; False when the client went away."""
    events = pool.stream(request)
    try:
        for msg in events:
            if msg.text:
                conn.send(json.dumps({"text": msg.text, "is_end": False}, ensure_ascii=False))
            if msg.finished:
                c = msg.completion
                conn.send(
                    json.dumps(
                        {
                            "is_end": True,
                            "finish_reason": finish_name(c.finish_reason),
                            "usage": {
                                "prompt_tokens": len(c.prompt_token_ids),
                                "completion_tokens": len(c.token_ids),
                            },
                        }
                    )
                )
        return True
    except ConnectionClosed:
        M.WS_ERRORS.labels("client_gone").inc()
        return False
    except ServiceError as e:
        M.WS_ERRORS.labels(e.code.name.lower()).inc()
        return _send(conn, {**stream_error(e), "is_end": True})
    except Exception:  # noqa: BLE001 - never drop the connection on our own fault
        logger.exception("WebSocket relay failed")
        M.WS_ERRORS.labels("internal").inc()
        return _send(conn, {**error_body(500, "internal error"), "is_end": True})
    finally:
        events.close()  # cancels the textgen call if it is still running


def _send(conn, doc: dict) -> bool:  # noqa: ANN001
    try:
        conn.send(json.dumps(doc, ensure_ascii=False))
        return True
    except (ConnectionClosed, OSError):
        return False
