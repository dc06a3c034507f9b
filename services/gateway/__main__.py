"""python -m services.gateway: the HTTP front door (Megatron PUT /api, OpenAI routes, /metrics)."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading

from werkzeug.serving import make_server

from services.gateway.app import create_app
from services.gateway.clients import TextgenPool
from services.gateway.config import GatewayConfig
from shared.logging import configure_logging
from shared.metrics import set_build_info
from shared.service import fail, load_config

logger = logging.getLogger("services.gateway")


def _port_problem(host: str, port: int) -> str | None:
    """Why host:port cannot be bound, checked up front (werkzeug would print a multi-line notice)."""
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
    pool = TextgenPool(cfg.textgen_addrs, health_interval_s=cfg.health_interval_s, timeout_s=cfg.request_timeout_s)
    app = create_app(cfg, pool)
    problem = _port_problem(cfg.host, cfg.port)
    if problem:
        pool.close()
        fail("gateway", f"cannot listen on {cfg.host}:{cfg.port}: {problem}")
    server = make_server(cfg.host, cfg.port, app, threaded=True)
    server.daemon_threads = True
    pool.start()
    stop = threading.Event()

    def _signal(*_):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    logger.info("gateway listening on http://%s:%d (textgen replicas: %s)", cfg.host, server.server_port, ", ".join(cfg.textgen_addrs))
    server.serve_forever()
    pool.close()
    app.extensions["megastack_jobs"].close()
    logger.info("gateway stopped")


if __name__ == "__main__":
    main()
