"""Free TCP ports for local clusters, tests and benchmarks.

A port the OS hands out for ``bind(0)`` comes from its ephemeral range, the same range every
other process (a Ray worker's gRPC server, an outgoing connection) draws from: between our
picking a port and a server binding it, someone else can take it (seen in CI as a Serve
proxy's "Failed to bind to address"). So ports are picked below the ephemeral range and
above Ray's worker-port range, where nothing is handed out implicitly, and never twice in
one process.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's default --min-worker-port / --max-worker-port are 10002 / 19999.
LOW = 20_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = _EPHEMERAL_RANGE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # all interfaces: servers (Serve's proxy) bind 0.0.0.0
        except OSError:
            return False
    return True


def _os_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port() -> int:
    """A port free now, outside the ephemeral range and Ray's worker ports, not returned
    before by this process. Falls back to an OS-assigned port where that window is empty
    (a kernel whose ephemeral range starts low)."""
    high = ephemeral_range()[0]
    candidates = list(range(LOW, high))
    random.shuffle(candidates)  # several processes picking at once rarely collide
    for port in candidates:
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    port = _os_port()
    _handed_out.add(port)
    return port
