"""One error body for every gateway stream (SSE of /v1/*, job watches, WebSocket) and one finish-reason
table."""

import pytest
from flask import Flask

from protos.textgen.v1 import textgen_pb2 as pb
from services.gateway.fields import FINISH_NAMES, finish_name
from services.gateway.http import HTTPError, error_body, stream_error
from shared.errors import ResourceExhausted

pytestmark = pytest.mark.unit


def test_a_stream_error_is_the_error_body_of_its_status():
    with Flask(__name__).app_context():
        assert stream_error(HTTPError(400, "bad top_p", "top_p")) == error_body(400, "bad top_p", "top_p")
        e = ResourceExhausted("queue full", field="prompt")
        body = stream_error(e)
    assert body["error"] == {
        "message": "queue full",
        "type": "rate_limit_error",
        "param": "prompt",
        "code": 429,
    }
    assert body["message"] == "queue full" and body["field"] == "prompt"
    assert stream_error(HTTPError(503, "no replica"))["error"]["code"] == 503  # outside a request too


def test_every_finish_reason_has_one_name():
    named = {v for k, v in pb.FinishReason.items() if k != "FINISH_REASON_UNSPECIFIED"}
    assert named <= set(FINISH_NAMES)
    assert finish_name(pb.FINISH_REASON_EOL) == "stop" and finish_name(pb.FINISH_REASON_CANCELLED) == "abort"
