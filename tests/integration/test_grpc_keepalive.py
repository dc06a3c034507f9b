"""Long, quiet server streams (job watches) survive client keepalive pings: no GOAWAY "too_many_pings"."""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.grpc.server import build_server


def test_a_quiet_watch_stream_outlives_many_keepalive_pings():
    server = build_server(service="probe", registrations=[], host="127.0.0.1", port=0, max_workers=4)
    server.start()
    server.set_serving(True)
    # a client far more eager than ours (1 s instead of 30 s): gRPC's server defaults end this connection
    # with GOAWAY too_many_pings after a few pings
    ch = grpc.insecure_channel(
        server.address,
        options=[
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
    )
    stub = health_pb2_grpc.HealthStub(ch)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    seen, errors = [], []

    def read():
        try:
            for msg in call:
                seen.append(msg.status)
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    time.sleep(8)
    alive = t.is_alive() and not errors
    call.cancel()
    t.join(timeout=5)
    ch.close()
    server.stop(0)
    assert seen and seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert alive, [e.details() for e in errors if e.code() != grpc.StatusCode.CANCELLED]
