"""Client side: channels with sane defaults, request-id propagation and health checks."""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.logging import REQUEST_ID, REQUEST_ID_KEY

# Large enough for 128 prompts with logprobs, small enough to bound memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.enable_retries", 1),
    # Reconnect quickly to a restarted server (the default backoff grows to minutes).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def make_channel(address: str) -> grpc.Channel:
    """An insecure channel to ``host:port`` (services listen on loopback or a private network)."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def call_metadata(extra: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """Metadata carrying the current request id to the next service."""
    rid = REQUEST_ID.get()
    base = ((REQUEST_ID_KEY, rid),) if rid and rid != "-" else ()
    return base + extra


def check_health(channel: grpc.Channel, service: str = "", timeout_s: float = 2.0) -> bool:
    """True when the server answers SERVING for ``service`` ("" = the whole server)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def wait_healthy(address: str, *, timeout_s: float, service: str = "", alive: object = None) -> None:
    """Block until ``address`` reports SERVING; ``alive()`` returning False aborts early (process died)."""
    deadline = time.monotonic() + timeout_s
    with make_channel(address) as channel:
        while time.monotonic() < deadline:
            if alive is not None and not alive():  # type: ignore[operator]
                raise RuntimeError(f"process serving {address} exited before it became healthy")
            if check_health(channel, service, timeout_s=1.0):
                return
            time.sleep(0.1)
    raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f}s")
