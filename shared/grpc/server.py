"""Build a gRPC server the same way for every service: interceptor, health, reflection, graceful stop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.errors import StartupError
from shared.grpc.channel import MAX_MESSAGE_BYTES
from shared.grpc.interceptors import ServiceInterceptor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """One servicer: the generated ``add_XServicer_to_server`` function and the full service name."""

    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any
    full_name: str  # e.g. "megastack.textgen.v1.TextGenService"


@dataclass
class GrpcServer:
    server: grpc.Server
    address: str
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)

    def start(self) -> None:
        """Start serving."""
        self.server.start()

    def set_serving(self, serving: bool) -> None:
        """Set the health service's answer (SERVING or NOT_SERVING)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace_s: float | None) -> None:
        """Stop, letting calls in flight finish for ``grace_s`` seconds."""
        self.set_serving(False)
        self.server.stop(grace_s).wait()

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()


def build_server(
    *, service: str, registrations: Sequence[Registration], host: str, port: int, max_workers: int
) -> GrpcServer:
    """Bind (not yet start) a server. A port that is already taken raises StartupError."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{service}-rpc"),
        interceptors=[ServiceInterceptor(service)],
        options=[
            # Without this, Linux lets a second server bind the same port silently.
            ("grpc.so_reuseport", 0),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # Clients ping every 30 s (CHANNEL_OPTIONS) to keep long watch streams alive through NATs and
            # proxies; accept that instead of answering GOAWAY "too_many_pings" after a few minutes.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
        maximum_concurrent_rpcs=max_workers * 4,
    )
    names = []
    for reg in registrations:
        reg.add_to_server(reg.servicer, server)
        names.append(reg.full_name)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(f"cannot bind gRPC port {address}: address already in use or not available")
    out = GrpcServer(
        server=server, address=f"{host}:{bound}", port=bound, health=health_servicer, service_names=names
    )
    out.set_serving(False)
    return out
