"""Logging set-up shared by every service: one format, a request id on every line.

The request id comes from the ``x-request-id`` gRPC metadata (or HTTP header at the gateway) and is
kept in a context variable, so every log record made while serving that request carries it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
REQUEST_ID_KEY = "x-request-id"


def new_request_id() -> str:
    """A fresh 16-hex-digit request id."""
    return uuid.uuid4().hex[:16]


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.service = self.service
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "severity": record.levelname,
            "service": getattr(record, "service", ""),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(service)s [%(request_id)s] %(name)s: %(message)s"


def configure_logging(service: str, level: str = "INFO", json_logs: bool = False) -> None:
    """Configure the root logger once for a process (idempotent)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter(service))
    handler.setFormatter(_JsonFormatter() if json_logs else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter that would drown the service's own lines.
    for noisy in ("urllib3", "filelock", "datasets", "werkzeug", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
