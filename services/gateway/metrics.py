"""Prometheus metrics of the gateway (prefix megastack_gateway_)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.metrics import LATENCY_BUCKETS_S

HTTP_REQUESTS = Counter(
    "megastack_gateway_http_requests_total",
    "HTTP requests answered, by route, method and status.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "megastack_gateway_http_request_duration_seconds",
    "HTTP request time (streams: until the last byte).",
    ["route"],
    buckets=LATENCY_BUCKETS_S,
)
REPLICA_UP = Gauge(
    "megastack_gateway_replica_up", "1 when the textgen replica passes its health check.", ["replica"]
)
REPLICA_IN_FLIGHT = Gauge(
    "megastack_gateway_replica_in_flight", "Calls in flight to the replica.", ["replica"]
)
RETRIES = Counter(
    "megastack_gateway_retries_total", "Calls retried on another replica after UNAVAILABLE.", ["replica"]
)
WS_CONNECTIONS = Gauge("megastack_gateway_websocket_connections", "Open WebSocket (/ws) connections.")
WS_MESSAGES = Counter(
    "megastack_gateway_websocket_messages_total", "Prompt messages received over WebSockets."
)
WS_ERRORS = Counter(
    "megastack_gateway_websocket_errors_total",
    "WebSocket prompts that ended in an error, by cause.",
    ["cause"],
)
for _cause in ("bad_request", "client_gone"):
    WS_ERRORS.labels(_cause)
