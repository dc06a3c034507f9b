"""python -m services.gateway: the HTTP front door (Megatron PUT /api, OpenAI routes, /metrics)."""

from __future__ import annotations

import logging
import signal
import threading

from werkzeug.serving import make_server

from services.gateway.app import create_app
from services.gateway.clients import TextgenPool
from services.gateway.config import GatewayConfig
from shared.logging import configure_logging
from shared.metrics import set_build_info
from shared.service import fail, load_config

logger = logging.getLogger("services.gateway")


def main() -> None:
    cfg = load_config("gateway", GatewayConfig)
    configure_logging("gateway", cfg.log_level, cfg.log_json)
    set_build_info("gateway")
    pool = TextgenPool(cfg.textgen_addrs, health_interval_s=cfg.health_interval_s, timeout_s=cfg.request_timeout_s)
    app = create_app(cfg, pool)
    try:
        server = make_server(cfg.host, cfg.port, app, threaded=True)
    except OSError as e:
        pool.close()
        fail("gateway", f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}")
        return
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
    logger.info("gateway stopped")


if __name__ == "__main__":
    main()
