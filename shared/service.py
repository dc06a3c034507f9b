"""The start-up sequence every ``python -m services.<svc>`` shares.

config from env -> logging -> metrics endpoint -> domain objects -> gRPC server (health SERVING) ->
wait for SIGTERM/SIGINT -> NOT_SERVING, drain, close. Any start-up failure (bad setting, missing model
folder, port in use) prints one line naming the cause and exits non-zero, without a traceback.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from shared.config import ConfigError, ServiceConfig, from_env
from shared.errors import StartupError
from shared.grpc.server import GrpcServer, Registration, build_server
from shared.logging import configure_logging
from shared.metrics import set_build_info, start_metrics_server

logger = logging.getLogger(__name__)
C = TypeVar("C", bound=ServiceConfig)


@dataclass
class ServiceParts:
    """What a service contributes: its servicers and what to close on shutdown."""

    registrations: Sequence[Registration]
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)
    on_started: list[Callable[[GrpcServer], None]] = field(default_factory=list)
    # Work that must own the main thread (the textgen engine); it returns when the event is set.
    main_loop: Callable[[threading.Event], None] | None = None


def env_prefix(service: str) -> str:
    """``MEGASTACK_{SERVICE}_``."""
    return f"MEGASTACK_{service.upper()}_"


def fail(service: str, message: str, code: int = 1) -> NoReturn:
    """Print one error line for the service and exit with ``code``."""
    print(f"megastack-{service}: error: {message}", file=sys.stderr, flush=True)  # noqa: T201 - the one start-up line
    sys.exit(code)


def load_config(service: str, config_cls: type[C]) -> C:
    """The service's config from its environment, or one error line and exit 2."""
    try:
        return from_env(config_cls, env_prefix(service))
    except ConfigError as e:
        fail(service, str(e), code=2)
        raise  # unreachable


def run_service(service: str, config_cls: type[C], build: Callable[[C], ServiceParts]) -> None:
    """Start a service (config, logging, metrics, gRPC server, health) and serve until SIGTERM/SIGINT."""
    cfg = load_config(service, config_cls)
    configure_logging(service, cfg.log_level, cfg.log_json)
    set_build_info(service)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    parts: ServiceParts | None = None
    server: GrpcServer | None = None
    try:
        metrics_port = start_metrics_server(cfg.host, cfg.metrics_port)
        parts = build(cfg)
        server = build_server(
            service=service,
            registrations=parts.registrations,
            host=cfg.host,
            port=cfg.port,
            max_workers=cfg.max_workers,
        )
        server.start()
        for hook in parts.on_started:
            hook(server)
        server.set_serving(True)
    except StartupError as e:
        _shutdown(parts, server, 0)
        fail(service, str(e))
    except Exception as e:  # noqa: BLE001 - an unforeseen start-up failure is still one line, not a traceback
        logger.debug("start-up failed", exc_info=e)
        _shutdown(parts, server, 0)
        fail(
            service,
            f"start-up failed: {type(e).__name__}: {e} (set {env_prefix(service)}LOG_LEVEL=DEBUG for the "
            "traceback)",
        )
    assert server is not None and parts is not None  # every failure above has exited
    logger.info(
        "%s serving gRPC on %s, metrics on http://%s:%d/metrics",
        service,
        server.address,
        cfg.host,
        metrics_port,
    )
    if parts.main_loop is not None:
        try:
            parts.main_loop(stop)
        except Exception:  # noqa: BLE001 - the main loop died: stop serving, exit non-zero
            logger.exception("%s main loop failed", service)
            _shutdown(parts, server, 0)
            sys.exit(1)
    stop.wait()
    logger.info("%s stopping (grace %.1fs)", service, cfg.grace_s)
    _shutdown(parts, server, cfg.grace_s)
    logger.info("%s stopped", service)


def _shutdown(parts: ServiceParts | None, server: GrpcServer | None, grace_s: float) -> None:
    if server is not None:
        server.stop(grace_s)
    for hook in parts.on_shutdown if parts else []:
        try:
            hook()
        except Exception:  # noqa: BLE001 - keep closing the rest
            logger.exception("error during shutdown")
