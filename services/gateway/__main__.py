"""python -m services.gateway: the HTTP front door (Megatron PUT /api, OpenAI routes, /metrics), served by
gunicorn (services/gateway/server.py: one process, many threads, read timeouts, graceful SIGTERM)."""

from __future__ import annotations

import errno
import logging
import socket

from services.gateway.app import create_app
from services.gateway.clients import TextgenPool
from services.gateway.config import GatewayConfig
from services.gateway.server import GatewayServer
from shared.logging import configure_logging
from shared.metrics import set_build_info
from shared.service import fail, load_config

logger = logging.getLogger("services.gateway")


def _port_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be bound, checked up front (gunicorn would retry and print a multi-line
    notice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return "Address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
    return None


def main() -> None:
    cfg = load_config("gateway", GatewayConfig)
    configure_logging("gateway", cfg.log_level, cfg.log_json)
    set_build_info("gateway")
    problem = _port_problem(cfg.host, cfg.port)
    if problem:
        fail("gateway", f"cannot listen on {cfg.host}:{cfg.port}: {problem}")

    def make_app():
        # in the worker process: the pool's health thread and channels live where the requests are served
        pool = TextgenPool(
            cfg.textgen_addrs, health_interval_s=cfg.health_interval_s, timeout_s=cfg.request_timeout_s
        )
        app = create_app(cfg, pool)
        app.extensions["megastack_pool"] = pool
        pool.start()
        logger.info(
            "gateway serving on http://%s:%d with %d threads (textgen replicas: %s)",
            cfg.host,
            cfg.port,
            cfg.threads,
            ", ".join(cfg.textgen_addrs),
        )
        return app

    GatewayServer(cfg, make_app).run()
    logger.info("gateway stopped")


if __name__ == "__main__":
    main()
