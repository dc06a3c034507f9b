"""free_port: ports for later use come from below the ephemeral range and are never handed out twice."""

import socket

import pytest

from shared.net import LOW_PORT, ephemeral_range, free_port

pytestmark = pytest.mark.unit


def test_free_ports_avoid_the_ephemeral_range_and_repeat_nothing():
    lo = ephemeral_range()[0]
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    if lo - LOW_PORT >= 100:
        assert all(LOW_PORT <= p < lo for p in ports)  # no outgoing connection can take them meanwhile
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # and they were free


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    import shared.net as net

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    taken = held.getsockname()[1]
    draws = iter([taken, taken, taken + 1 if taken + 1 < 65535 else taken - 1])
    monkeypatch.setattr(net.random, "randint", lambda a, b: next(draws))
    monkeypatch.setattr(net, "ephemeral_range", lambda: (65000, 65535))
    monkeypatch.setattr(net, "LOW_PORT", 1024)
    try:
        port = net.free_port()
    finally:
        held.close()
    assert port != taken
