"""gRPC clients of the gateway: a pool of textgen replicas with health checks and least-loaded routing.

A replica is taken out of rotation when its health check fails or a call to it ends UNAVAILABLE, and
put back when its health check passes again. A call that fails UNAVAILABLE before any response data
was sent to the HTTP client is retried on another replica.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from protos.textgen.v1 import textgen_pb2 as pb
from protos.textgen.v1 import textgen_pb2_grpc as pb_grpc
from services.gateway import metrics as M
from shared.errors import Unavailable, from_rpc_error
from shared.grpc.channel import call_metadata, check_health, make_channel

logger = logging.getLogger(__name__)
TEXTGEN_SERVICE = "megastack.textgen.v1.TextGenService"


class Replica:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = make_channel(address)
        self.stub = pb_grpc.TextGenServiceStub(self.channel)
        self.healthy = False
        self.in_flight = 0
        for metric in (M.REPLICA_UP, M.REPLICA_IN_FLIGHT, M.RETRIES):
            metric.labels(address)  # exported from the start (rate() and dashboards need the zero)

    def set_healthy(self, ok: bool, why: str = "") -> None:
        if ok != self.healthy:
            logger.warning(
                "replica %s is %s%s",
                self.address,
                "healthy" if ok else "unhealthy",
                f": {why}" if why else "",
            )
        self.healthy = ok
        M.REPLICA_UP.labels(self.address).set(1 if ok else 0)


class TextgenPool:
    def __init__(self, addresses: tuple[str, ...], *, health_interval_s: float, timeout_s: float) -> None:
        self.replicas = [Replica(a) for a in addresses]
        self.health_interval_s = health_interval_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._health_loop, name="gateway-health", daemon=True)
        self._info: pb.GetModelInfoResponse | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self.check_all()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        for r in self.replicas:
            r.channel.close()

    def check_all(self) -> None:
        for r in self.replicas:
            r.set_healthy(check_health(r.channel, TEXTGEN_SERVICE, timeout_s=2.0))

    def _health_loop(self) -> None:
        while not self._stop.wait(self.health_interval_s):
            self.check_all()

    # -- routing -------------------------------------------------------------------------------
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def pick(self, exclude: set[str]) -> Replica:
        if not any(r.healthy and r.address not in exclude for r in self.replicas):
            self.check_all()  # a replica may have come back since the last periodic check
        with self._lock:
            candidates = [r for r in self.replicas if r.healthy and r.address not in exclude]
            if not candidates:
                raise Unavailable("no healthy textgen replica is available")
            low = min(r.in_flight for r in candidates)
            best = [r for r in candidates if r.in_flight == low]
            r = best[next(self._rr) % len(best)]
            r.in_flight += 1
            M.REPLICA_IN_FLIGHT.labels(r.address).set(r.in_flight)
            return r

    def release(self, r: Replica) -> None:
        with self._lock:
            r.in_flight -= 1
            M.REPLICA_IN_FLIGHT.labels(r.address).set(r.in_flight)

    @contextmanager
    def _using(self, exclude: set[str]) -> Iterator[Replica]:
        r = self.pick(exclude)
        try:
            yield r
        finally:
            self.release(r)

    def _on_unavailable(self, r: Replica, err: grpc.RpcError, exclude: set[str]) -> None:
        r.set_healthy(False, err.details() or "UNAVAILABLE")
        exclude.add(r.address)
        M.RETRIES.labels(r.address).inc()

    # -- calls ---------------------------------------------------------------------------------
    def unary(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        """Call ``method`` on the least-loaded replica; retry others while the error is UNAVAILABLE."""
        exclude: set[str] = set()
        while True:
            with self._using(exclude) as r:
                try:
                    return getattr(r.stub, method)(
                        request, timeout=timeout_s or self.timeout_s, metadata=call_metadata()
                    )
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.UNAVAILABLE:
                        self._on_unavailable(r, err, exclude)
                        continue
                    raise from_rpc_error(err) from None

    def stream(
        self, request: pb.GenerateStreamRequest, on_call: Callable[[Any], None] | None = None
    ) -> Iterator[pb.GenerateStreamResponse]:
        """GenerateStream with retry until the first message arrives; later errors are raised."""
        exclude: set[str] = set()
        while True:
            r = self.pick(exclude)
            call = r.stub.GenerateStream(request, timeout=self.timeout_s, metadata=call_metadata())
            if on_call is not None:
                on_call(call)
            started = False
            try:
                for msg in call:
                    started = True
                    yield msg
                return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE and not started:
                    self._on_unavailable(r, err, exclude)
                    continue
                raise from_rpc_error(err) from None
            finally:
                call.cancel()  # no-op when finished; frees the engine slot when the HTTP client left
                self.release(r)

    def model_info(self, max_age_s: float = 30.0) -> pb.GetModelInfoResponse:
        info = self._info
        if info is None or time.monotonic() - self._info_at > max_age_s:
            info = self.unary("GetModelInfo", pb.GetModelInfoRequest(), timeout_s=10.0)
            self._info, self._info_at = info, time.monotonic()
        return info

    _info_at = 0.0
