"""UDP I/O for links: one socket per agent, shared by STUN and WireGuard messages.

The packet path uses it from dedicated threads with plain blocking calls (measured here: one
asyncio callback per packet halves throughput). Addresses are kept in the socket's own form
(``sockaddr`` tuples) on the hot path; :func:`display` turns one into ``host:port`` for people.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from typing import Any, Protocol

SockAddr = tuple[Any, ...]

SOCKET_BUFFER = 8 * 1024 * 1024  # large buffers absorb bursts while a thread is descheduled

# Linux UDP offloads (include/uapi/linux/udp.h): one sendmsg carries many equal-sized datagrams
# (GSO, the kernel splits them), one recvmsg returns many datagrams of one flow (GRO).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_GSO_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
_CMSG_SPACE = socket.CMSG_SPACE(4)


class DatagramIO(Protocol):
    """What the link device needs from a datagram socket (a fake twin lives in tests)."""

    def sendto(self, data: bytes | bytearray | memoryview, addr: SockAddr) -> None: ...

    def recv_into(self, buf: bytearray) -> tuple[int, SockAddr]: ...

    def recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr]: ...

    def send_batch(self, messages: list[bytearray], addr: SockAddr) -> None: ...

    # Optional, used when present: ``send_packed(buf, sizes, addr)`` (see UdpTransport).

    def sockaddr(self, host: str, port: int) -> SockAddr: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


def _set_buffer(sock: socket.socket, force: int, normal: int, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)  # root may exceed rmem_max/wmem_max
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, normal, size)


class UdpTransport:
    """A dual-stack UDP socket (IPv6 with IPv4-mapped addresses; IPv4 only if v6 is off)."""

    def __init__(
        self, port: int = 0, host: str | None = None, buffer_size: int = SOCKET_BUFFER
    ) -> None:
        self.errors: dict[str, int] = {}
        self._closed = False
        sock: socket.socket | None = None
        if host is None or ":" in host:
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind((host or "::", port))
            except OSError:
                if sock is not None:
                    sock.close()
                sock = None
                if host is not None:
                    raise
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((host or "0.0.0.0", port))
            except OSError:
                sock.close()
                raise
        self._adopt(sock, buffer_size)

    @classmethod
    def from_socket(cls, sock: socket.socket, buffer_size: int = SOCKET_BUFFER) -> UdpTransport:
        """Wrap a socket bound elsewhere (e.g. the one ICE selected, dup'ed by link/ice.py)."""
        self = cls.__new__(cls)
        self.errors = {}
        self._closed = False
        self._adopt(sock, buffer_size)
        return self

    def _adopt(self, sock: socket.socket, buffer_size: int) -> None:
        self.sock = sock
        self.family = sock.family
        _set_buffer(sock, getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF, buffer_size)
        _set_buffer(sock, getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF, buffer_size)
        self.port: int = sock.getsockname()[1]
        self.gso = self._try(SOL_UDP, UDP_SEGMENT, 0)
        self.gro = self._try(SOL_UDP, UDP_GRO, 1)

    def _try(self, level: int, option: int, value: int) -> bool:
        try:
            self.sock.setsockopt(level, option, value)
        except OSError:
            return False
        return True

    def sockaddr(self, host: str, port: int) -> SockAddr:
        """``host:port`` in the form this socket sends to and reports (v4-mapped on v6)."""
        ip = ipaddress.ip_address(host)
        if self.family == socket.AF_INET6:
            if ip.version == 4:
                return (f"::ffff:{ip}", port, 0, 0)
            return (str(ip), port, 0, 0)
        if ip.version == 6:
            raise ValueError(f"{host}: IPv6 endpoint on an IPv4-only socket")
        return (str(ip), port)

    def sendto(self, data: bytes | bytearray | memoryview, addr: SockAddr) -> None:
        try:
            self.sock.sendto(data, addr)
        except OSError as exc:
            # The network may be down or the route gone for a moment: count, never crash the
            # packet thread. The timers retry handshakes; lost data is TCP's to resend.
            name = errno.errorcode.get(exc.errno or 0, "OSError")
            self.errors[name] = self.errors.get(name, 0) + 1

    def recv_into(self, buf: bytearray) -> tuple[int, SockAddr]:
        return self.sock.recvfrom_into(buf)

    def recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr]:
        """Receive into ``buf``: (bytes, segment size, sender). With GRO the kernel may hand
        over several datagrams of one sender back to back, each ``segment size`` long (the
        last may be shorter); otherwise the segment size is the whole datagram."""
        if not self.gro:
            n, addr = self.sock.recvfrom_into(buf)
            return n, n, addr
        n, ancdata, _flags, addr = self.sock.recvmsg_into((buf,), _CMSG_SPACE)
        for level, kind, data in ancdata:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                return n, _GRO_SIZE.unpack_from(data)[0] or n, addr
        return n, n, addr

    def fileno(self) -> int:
        return self.sock.fileno()

    def try_recv_segments(self, buf: bytearray) -> tuple[int, int, SockAddr] | None:
        """:meth:`recv_segments` without blocking: None when nothing is queued."""
        try:
            if not self.gro:
                n, addr = self.sock.recvfrom_into(buf, 0, socket.MSG_DONTWAIT)
                return n, n, addr
            n, ancdata, _flags, addr = self.sock.recvmsg_into((buf,), _CMSG_SPACE,
                                                              socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        for level, kind, data in ancdata:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                return n, _GRO_SIZE.unpack_from(data)[0] or n, addr
        return n, n, addr

    def send_batch(self, messages: list[bytearray], addr: SockAddr) -> None:
        """Send datagrams to one destination, in order, with as few system calls as GSO allows:
        each run of equal-sized messages (the last of a run may be shorter) is one sendmsg."""
        if not self.gso or len(messages) == 1:
            for message in messages:
                self.sendto(message, addr)
            return
        i, count = 0, len(messages)
        while i < count:
            size = len(messages[i])
            j = i + 1
            limit = min(count, i + GSO_MAX_SEGMENTS, i + max(1, GSO_MAX_BYTES // size))
            while j < limit and len(messages[j]) == size:
                j += 1
            if j < limit and len(messages[j]) < size:
                j += 1  # a shorter last segment may close the run
            if j - i == 1:
                self.sendto(messages[i], addr)
            else:
                try:
                    self.sock.sendmsg(messages[i:j], [(SOL_UDP, UDP_SEGMENT,
                                                       _GSO_SIZE.pack(size))], 0, addr)
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                        self.gso = False  # no GSO on this path: plain sends from now on
                        for message in messages[i:j]:
                            self.sendto(message, addr)
                    else:
                        name = errno.errorcode.get(exc.errno or 0, "OSError")
                        self.errors[name] = self.errors.get(name, 0) + 1
            i = j

    def send_packed(self, buf: memoryview, sizes: list[int], addr: SockAddr) -> None:
        """Send datagrams laid back to back in ``buf`` (``sizes`` in order) to one destination:
        each run of equal sizes (the last of a run may be shorter) is one GSO ``sendmsg`` of
        one contiguous buffer, so the kernel gets no per-datagram iovec or Python object."""
        count = len(sizes)
        if not self.gso or count == 1:
            pos = 0
            for size in sizes:
                self.sendto(buf[pos : pos + size], addr)
                pos += size
            return
        i = pos = 0
        sendmsg = self.sock.sendmsg
        while i < count:
            size = sizes[i]
            j = i + 1
            limit = min(count, i + GSO_MAX_SEGMENTS, i + max(1, GSO_MAX_BYTES // size))
            while j < limit and sizes[j] == size:
                j += 1
            if j < limit and sizes[j] < size:
                j += 1  # a shorter last segment may close the run
            end = pos + size * (j - i - 1) + sizes[j - 1]
            if j - i == 1:
                self.sendto(buf[pos:end], addr)
            else:
                try:
                    sendmsg((buf[pos:end],), [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(size))], 0,
                            addr)
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP):
                        self.gso = False  # no GSO on this path: plain sends from now on
                        self.send_packed(buf[pos:], sizes[i:], addr)
                        return
                    name = errno.errorcode.get(exc.errno or 0, "OSError")
                    self.errors[name] = self.errors.get(name, 0) + 1
            pos = end
            i = j

    def wake(self) -> None:
        """Unblock a thread sitting in :meth:`recv_into` (it then sees it should stop)."""
        loop = "::1" if self.family == socket.AF_INET6 else "127.0.0.1"
        with contextlib.suppress(OSError), socket.socket(self.family, socket.SOCK_DGRAM) as s:
            s.sendto(b"", (loop, self.port))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.sock.close()


def display(addr: SockAddr | None) -> str | None:
    """``('::ffff:10.0.0.2', 51820, 0, 0)`` → ``10.0.0.2:51820``; IPv6 as ``[addr]:port``."""
    if addr is None:
        return None
    host, port = addr[0], addr[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_of(addr: SockAddr) -> str:
    host: str = addr[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host
