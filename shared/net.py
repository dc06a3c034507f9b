"""Small network helpers shared by the stack launcher, the distributed set-up and the tests."""

from __future__ import annotations

import random
import socket
import threading

# Ports handed out for later use are drawn below the kernel's ephemeral range: a port from that range
# (what binding port 0 returns) is free only until some process opens an outgoing connection, whose
# source port the kernel takes from the same range. A local Ray head opens hundreds of connections while
# it starts, and one of them took the metrics port chosen for its dashboard agent (the agent died with
# EADDRINUSE and every job submission failed with "No available agent"). Ray's own worker ports are
# 10002-19999 by default, so the range starts at 20000.
LOW_PORT = 20000
_given: set[int] = set()
_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically chosen ports (Linux default 32768-60999)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now, outside the ephemeral range, never the same twice in a process.

    Another process may still bind it before the caller does, but no outgoing connection will take it.
    """
    lo = LOW_PORT
    hi = ephemeral_range()[0] - 1
    with _lock:
        if hi - lo >= 100:
            for _ in range(200):
                port = random.randint(lo, hi)
                if port not in _given and _bindable(host, port):
                    _given.add(port)
                    return port
        while True:  # no room below the ephemeral range: let the OS choose
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _given:
                _given.add(port)
                return port
