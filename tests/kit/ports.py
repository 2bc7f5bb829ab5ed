"""Free port allocation on loopback (or any local address) for test servers.

The kernel picks a free port (bind to port 0); the kit remembers every port it handed out in
this process so two fixtures of one run never get the same number, even when the first server
has not bound its port yet. Ports are released only when the process exits.

Inside a network namespace every port is free: allocate there only to avoid clashes between
services of the same namespace (pass ``netns`` to :func:`free_port`).
"""

from __future__ import annotations

import errno
import socket
import threading
from typing import Literal, Protocol

Proto = Literal["tcp", "udp"]

_lock = threading.Lock()
_handed_out: set[tuple[str, Proto, int]] = set()
_MAX_TRIES = 64


class _SocketMaker(Protocol):
    """Anything that can open a socket inside its namespace (see ``Netns.socket``)."""

    def socket(self, family: int = ..., type: int = ...) -> socket.socket: ...


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _open(netns: _SocketMaker | None, host: str, kind: int) -> socket.socket:
    if netns is not None:
        return netns.socket(_family(host), kind)
    return socket.socket(_family(host), kind)


def free_port(
    proto: Proto = "tcp", host: str = "127.0.0.1", *, netns: _SocketMaker | None = None
) -> int:
    """A port on ``host`` that is free now and was never handed out before in this process."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    for _ in range(_MAX_TRIES):
        with _open(netns, host, kind) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        with _lock:
            key = (host, proto, port)
            if key not in _handed_out:
                _handed_out.add(key)
                return port
    raise RuntimeError(f"no fresh {proto} port on {host} after {_MAX_TRIES} tries")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A fresh free TCP port on ``host`` (loopback by default)."""
    return free_port("tcp", host)


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A fresh free UDP port on ``host`` (loopback by default)."""
    return free_port("udp", host)


def port_is_free(
    port: int, proto: Proto = "tcp", host: str = "127.0.0.1", *, netns: _SocketMaker | None = None
) -> bool:
    """True when nothing listens on (or is bound to) ``host:port``.

    For TCP the check binds with ``SO_REUSEADDR`` (so sockets in TIME_WAIT do not count, as they
    would not stop a server either) and also tries to connect, which catches listeners on a
    wildcard address that the bind check might miss.
    """
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with _open(netns, host, kind) as sock:
        if proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise  # e.g. EADDRNOTAVAIL: the address is not local, which is not "busy"
    if proto == "tcp":
        return not tcp_connect_ok(host, port, timeout=0.5, netns=netns)
    return True


def tcp_connect_ok(
    host: str, port: int, *, timeout: float = 1.0, netns: _SocketMaker | None = None
) -> bool:
    """True when a TCP connection to ``host:port`` is accepted within ``timeout`` seconds."""
    with _open(netns, host, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError:
            return False
    return True
