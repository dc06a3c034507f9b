"""The gateway's production HTTP server: gunicorn, one process, many threads (gthread).

Decision: one worker process with ``threads`` threads, not several processes. The gateway holds state
that must be one per process to be right: the textgen pool (health checks, least-loaded routing by
in-flight counts) and the Prometheus registry behind ``/metrics`` (several processes would each count
their own requests). The gateway only validates and relays (no model, no torch), so one process with
many threads is not CPU-bound; scale out with more gateway replicas behind a load balancer (the k8s
Deployment runs 2).

What gunicorn adds over werkzeug's development server: a bounded thread pool, idle connections parked
in a poller instead of holding a thread, keep-alive with a limit, and a graceful SIGTERM that stops
accepting and lets in-flight requests and streams finish up to ``graceful_timeout_s``. What it does
not have, added here: a read timeout on client sockets (:class:`TimedThreadWorker`), so a client that
sends a request head or body slowly (slowloris) or stops reading a response is dropped after
``read_timeout_s`` instead of holding a thread for ever. WebSocket connections are exempt once
upgraded (they may idle between prompts).
"""

from __future__ import annotations

import logging
import math
import socket
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.workers.gthread import ThreadWorker

from services.gateway.config import GatewayConfig

logger = logging.getLogger("services.gateway")


class TimedSocket(socket.socket):
    """A client socket whose blocking mode carries a timeout: gunicorn switches sockets to blocking before
    it parses a request, and every read or write after that is bounded by ``read_timeout_s``."""

    read_timeout_s: float | None = None
    timed_out = False

    def _io(self, op: Any, *args: Any) -> Any:
        try:
            return op(self, *args)
        except TimeoutError:
            self.timed_out = (
                True  # the worker closes this connection at once (TimedThreadWorker.finish_request)
            )
            raise

    def recv(self, *args: Any) -> bytes:
        return self._io(socket.socket.recv, *args)

    def recv_into(self, *args: Any) -> int:
        return self._io(socket.socket.recv_into, *args)

    def send(self, *args: Any) -> int:
        return self._io(socket.socket.send, *args)

    def sendall(self, *args: Any) -> None:
        return self._io(socket.socket.sendall, *args)

    def setblocking(self, flag: bool) -> None:
        if flag and self.read_timeout_s:
            self.settimeout(self.read_timeout_s)
        else:
            super().setblocking(flag)

    @classmethod
    def adopt(cls, sock: socket.socket, timeout_s: float) -> TimedSocket:
        timed = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        timed.read_timeout_s = timeout_s
        timed.settimeout(timeout_s)
        return timed


class _TimedListener:
    """Hands out accepted sockets as TimedSockets; everything else is the listener's own."""

    def __init__(self, listener: Any, timeout_s: float) -> None:
        self._listener = listener
        self._timeout_s = timeout_s

    def accept(self):
        sock, addr = self._listener.accept()
        return TimedSocket.adopt(sock, self._timeout_s), addr

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listener, name)


_read_timeout_s = 30.0  # set by GatewayServer in the arbiter, inherited by the forked worker


class _SlowClientFilter(logging.Filter):
    """gunicorn logs a socket timeout with a traceback; for us it is a client we chose to drop."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TimeoutError):
            record.msg, record.args, record.exc_info = (
                "dropped a client that sent or read nothing for read_timeout_s (%gs)",
                (_read_timeout_s,),
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class TimedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker with a read timeout on every client socket."""

    def init_process(self) -> None:
        # gunicorn's own records go through the service's handlers (text or JSON, one format per process)
        err = logging.getLogger("gunicorn.error")
        err.handlers.clear()
        err.propagate = True
        err.addFilter(_SlowClientFilter())
        super().init_process()

    def accept(self, listener):  # noqa: ANN001
        return super().accept(_TimedListener(listener, _read_timeout_s))

    def finish_request(self, conn, fs):  # noqa: ANN001
        # gunicorn closes a finished connection gracefully: it drains the socket for up to 2 s on the main
        # thread, one connection after another, so a crowd of dropped slow clients would stall accepting.
        # A client dropped for its slowness is closed at once.
        if getattr(conn.sock, "timed_out", False):
            self.nr_conns -= 1
            conn.close()
            return
        super().finish_request(conn, fs)


class GatewayServer(BaseApplication):
    """gunicorn, configured from GatewayConfig; the app and its textgen pool are made in the worker."""

    def __init__(self, cfg: GatewayConfig, make_app) -> None:  # noqa: ANN001
        self.cfg_ = cfg
        self.make_app = make_app
        global _read_timeout_s
        _read_timeout_s = cfg.read_timeout_s
        super().__init__()

    def load_config(self) -> None:
        c = self.cfg_
        options = {
            "bind": [f"{c.host}:{c.port}"],
            "workers": 1,
            "worker_class": f"{TimedThreadWorker.__module__}.{TimedThreadWorker.__qualname__}",
            "threads": c.threads,
            "worker_connections": c.max_connections,
            "keepalive": max(1, math.ceil(c.keepalive_s)),  # gunicorn takes whole seconds
            "graceful_timeout": max(1, math.ceil(c.graceful_timeout_s)),
            "timeout": max(
                30, math.ceil(c.graceful_timeout_s) + 5
            ),  # worker heartbeat, not a request deadline
            "limit_request_line": 8190,
            "limit_request_fields": 100,
            "limit_request_field_size": 16384,
            "accesslog": None,  # the app logs every request with its id
            "errorlog": "-",
            "loglevel": c.log_level.lower(),
            "proc_name": "megastack-gateway",
            "control_socket_disable": True,  # one shared path per user: two gateways on a host would collide
            "worker_exit": _worker_exit,
        }
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        return self.make_app()


def _worker_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn hook
    app = getattr(worker, "wsgi", None)
    for name in ("megastack_pool", "megastack_jobs"):
        part = getattr(app, "extensions", {}).get(name) if app is not None else None
        if part is not None:
            try:
                part.close()
            except Exception:  # noqa: BLE001 - closing on the way out
                logger.exception("closing %s", name)
