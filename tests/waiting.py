"""Waiting for other processes, and ports for the servers the tests start (loopback only)."""

from __future__ import annotations

import socket
import time

WORKER_PORTS = range(10002, 20000)  # Ray's default worker port range: stay out of it


def wait_for(predicate, timeout: float = 180, what: str = "condition", poll: float = 0.1):
    """predicate()'s first true value, or an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_ports(n: int) -> list[int]:
    """n free ports on 127.0.0.1, outside Ray's worker port range."""
    socks, ports = [], []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        if s.getsockname()[1] not in WORKER_PORTS:
            ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports
