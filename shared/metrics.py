"""Prometheus helpers: the standard per-RPC metrics and the /metrics endpoint of a service.

Names follow prometheus.io naming: ``megastack_<what>_<unit>``, counters end in ``_total``, base
units (seconds, bytes). Labels stay low-cardinality (never prompts, paths or request ids).
"""

from __future__ import annotations

import errno
import platform

from prometheus_client import Counter, Histogram, Info, start_http_server

from shared.errors import StartupError

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RPC_REQUESTS = Counter(
    "megastack_rpc_requests_total",
    "gRPC calls handled, by service, method and final status code.",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "megastack_rpc_duration_seconds",
    "gRPC handler time, streaming RPCs until their last message.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS_S,
)
RPC_IN_FLIGHT_HELP = "gRPC calls being handled now."
BUILD_INFO = Info("megastack_build", "megastack version and runtime of this process.")


def set_build_info(service: str) -> None:
    """Publish the build-info metric of ``service`` (megastack version, Python version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("megastack")
    except PackageNotFoundError:
        v = "dev"
    BUILD_INFO.info({"service": service, "version": v, "python": platform.python_version()})


def start_metrics_server(host: str, port: int) -> int:
    """Serve the default registry on http://host:port/metrics; return the bound port."""
    try:
        server, _thread = start_http_server(port, addr=host)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"metrics port {host}:{port} is already in use") from None
        raise StartupError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from None
    return int(server.server_port)
