"""The TUN device of a group: the only module that touches ``/dev/net/tun`` (through pytun).

A :class:`TunDevice` is a layer-3 TUN (``IFF_TUN | IFF_NO_PI``): every read returns one IP
packet, every write injects one. It is *not* persistent, so the kernel destroys the interface
(with its addresses and routes) when the last descriptor goes away, also when the process is
killed. Addresses, routes and link state are the router's business (:mod:`.router`); this module
only opens, reads, writes and closes.

Threads and blocking
--------------------
The packet path runs in dedicated threads with blocking calls. A plain blocking ``read(2)`` on a
TUN descriptor cannot be interrupted from another thread: closing the descriptor does not wake
the reader (the syscall holds its own reference; verified on this kernel), so the device would
also stay up. Therefore:

* The descriptor is non-blocking. :meth:`TunDevice.read` first tries ``os.read``; only when the
  queue is empty it waits in ``poll`` on the TUN descriptor *and* a self-pipe. Under load the
  common path is exactly one ``read`` syscall and no exception.
* :meth:`TunDevice.close` marks the device closed, writes to the self-pipe (every waiting reader
  wakes up and raises :class:`TunClosed`) and then atomically replaces the TUN descriptor with
  ``/dev/null`` via ``dup2``. That drops our reference to the TUN file at once, so the interface
  vanishes, while the descriptor *number* stays valid and harmless until the object is garbage
  collected: a reader racing with ``close`` can never read from an unrelated file that happened
  to reuse the number. (``/dev/null`` reads return ``b""``, which a reader turns into
  :class:`TunClosed`.)
* If the interface is deleted underneath us (``ip link del``, ``socialvpn cleanup``), reads fail
  with ``EBADFD``/``EFAULT``; that is reported as :class:`TunClosed` too.

Writes never raise for a bad packet: the kernel refuses malformed ones with ``EINVAL``; such
errors are counted in :attr:`TunDevice.dropped_writes` and the packet is dropped (``0`` returned).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import threading
from collections import deque
from collections.abc import Iterable
from typing import NoReturn, Protocol, runtime_checkable

import pytun

from ..errors import SocialVPNError
from . import offload

IFNAMSIZ = 15
"""Usable characters of a Linux interface name."""

DEFAULT_READ_SIZE = 65536
"""Large enough for any packet a TUN hands out (also 64 KB super-packets with offloads)."""

TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20  # UDP segmentation, Linux 6.2+
TUN_F_USO6 = 0x40

DEFAULT_BATCH = 64
FRAME_BUFFER = 65536 + 64
"""Room for the largest frame a TUN with offloads hands out (virtio header + 64 KiB packet)."""
"""Most packets :meth:`TunDevice.read_batch` returns per call."""

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_Buffer = bytes | bytearray | memoryview


class TunError(SocialVPNError):
    """The TUN device could not be opened or used; the message names the device."""


class TunClosed(TunError):
    """The device was closed (by us) or deleted (by someone else); stop using it."""


def validate_ifname(name: str) -> str:
    """Return ``name`` if it is a usable Linux interface name, else raise ``ValueError``.

    Allowed: 1-15 characters from ``A-Z a-z 0-9 _ . -``, not ``.`` or ``..``. (The kernel
    allows a little more, but ``%`` is a template, ``/`` and ``:`` break sysfs and aliases, and
    whitespace breaks every tool that prints names.)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"interface name must be a non-empty string, got {name!r}")
    if len(name) > IFNAMSIZ:
        raise ValueError(
            f"interface name {name!r} is {len(name)} characters; Linux allows at most {IFNAMSIZ}"
        )
    if name in (".", "..") or not _IFNAME_RE.fullmatch(name):
        raise ValueError(
            f"interface name {name!r} may only use letters, digits, '_', '.' and '-'"
        )
    return name


@runtime_checkable
class TunIO(Protocol):
    """What the packet path needs from a TUN device (:class:`TunDevice`, ``fake.FakeTun``).

    Every read blocks until a packet arrives or the device is closed (then :class:`TunClosed`).
    """

    @property
    def name(self) -> str: ...

    @property
    def mtu(self) -> int: ...

    def fileno(self) -> int: ...

    def read(self, size: int = DEFAULT_READ_SIZE) -> bytes: ...

    def readinto(self, buf: bytearray | memoryview) -> int: ...

    def read_batch(
        self, max_packets: int = DEFAULT_BATCH, size: int = DEFAULT_READ_SIZE
    ) -> list[bytes]: ...

    # Optional, used by the link device when present (TunDevice): ``read_batch(..., block=)``,
    # ``read_groups(max_reads, block=, slot=)`` (offloads) and ``wait_readable()``.

    def write(self, packet: _Buffer) -> int: ...

    def write_batch(self, packets: Iterable[_Buffer]) -> int: ...

    def close(self) -> None: ...


class TunDevice:
    """An open, non-persistent layer-3 TUN device. Make one with :meth:`open`.

    Safe to use from several threads: any number of readers and writers, and :meth:`close`
    from any thread (it wakes every blocked reader).
    """

    def __init__(self, name: str, fd: int, mtu: int, offloads: bool = False) -> None:
        """Wrap an already configured TUN descriptor; use :meth:`open` instead."""
        self._name = name
        self._fd = fd
        self._mtu = mtu
        self.offloads = offloads
        """True when reads may be TSO super-packets and writes GSO ones (virtio headers)."""
        self._pending: deque[_Buffer] = deque()  # segments of a split super-packet
        self._read_bufs: dict[int, list[bytearray]] = {}  # read_groups' frames by slot
        self._poller: select.poll | None = None  # wait_readable's
        self.dropped_reads = 0
        """Frames from the kernel that could not be segmented."""
        self.super_reads = 0
        """TSO super-packets read (offloads only)."""
        self.merged_writes = 0
        """GSO super-packets written (offloads only)."""
        self.uso = False
        """The kernel may hand over UDP super-packets too (TUN_F_USO4/6 accepted)."""
        self._closed = False
        self._close_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.dropped_writes = 0
        """Packets the kernel refused (malformed, too big, no buffer space)."""

    @classmethod
    def open(cls, name: str, mtu: int, *, offloads: bool = False) -> TunDevice:
        """Create TUN device ``name`` with ``mtu`` (or take over a detached one of that name).

        The device is made in the network namespace of the calling thread and is not
        persistent (a taken-over persistent one is made non-persistent). Raises
        ``ValueError`` for a bad name or MTU, :class:`TunError` when the kernel refuses (name
        taken by a busy TUN or by another kind of link, no permission).
        """
        validate_ifname(name)
        if not isinstance(mtu, int) or not 68 <= mtu <= 65535:
            raise ValueError(f"MTU of {name} must be an integer in 68..65535, got {mtu!r}")
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if offloads else 0)
        try:
            dev = pytun.TunTapDevice(name=name, flags=flags)
        except OSError as exc:
            raise TunError(f"cannot open TUN device {name}: {_describe(exc)}") from exc
        try:
            # A detached device left by `ip tuntap add` is persistent: attaching keeps that
            # flag, so clear it - ours must vanish with the last descriptor.
            dev.persist(False)
            # SIOCSIFMTU on a socket in the calling thread's namespace (where the device is).
            dev.mtu = mtu
            # Own a private duplicate: os.dup makes it close-on-exec (pytun's is inheritable,
            # and a child process inheriting it would keep the interface alive after we die).
            fd = os.dup(dev.fileno())
        except OSError as exc:
            raise TunError(f"cannot set up TUN device {name}: {_describe(exc)}") from exc
        finally:
            dev.close()
        uso = False
        if offloads:
            # The kernel may now hand us TCP (and, where it offers USO, UDP) super-packets
            # with partial checksums. Older kernels refuse the USO bits: then TCP only.
            tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
            for bits in (tcp | TUN_F_USO4 | TUN_F_USO6, tcp, 0):
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, bits)
                except OSError:
                    continue  # with 0 refused too: frames still carry a (zero) virtio header
                uso = bool(bits & TUN_F_USO4)
                break
        os.set_blocking(fd, False)
        device = cls(name, fd, mtu, offloads)
        device.uso = uso
        return device

    # --- attributes -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu(self) -> int:
        """The MTU given at :meth:`open` (the router may change the interface's later)."""
        return self._mtu

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The TUN descriptor (non-blocking). After :meth:`close` it refers to ``/dev/null``."""
        return self._fd

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._fd}"
        return f"TunDevice({self._name!r}, {state})"

    # --- reading ----------------------------------------------------------------------------

    def read(self, size: int = DEFAULT_READ_SIZE) -> bytes:
        """Block until one packet arrives and return it (at most ``size`` bytes of it).

        With offloads, a super-packet from the kernel is split into wire-sized segments and
        handed out one per call."""
        if not self.offloads:
            return self._read_raw(size)
        while not self._pending:
            self._split_into_pending(self._read_raw(DEFAULT_READ_SIZE))
        return bytes(self._pending.popleft())

    def _split_into_pending(self, frame: bytes) -> None:
        try:
            segments = offload.split(frame)
        except offload.OffloadError:
            self.dropped_reads += 1
            return
        if len(segments) > 1:
            self.super_reads += 1
        self._pending.extend(segments)

    def stats(self) -> dict[str, int | bool]:
        return {"offloads": self.offloads, "uso": self.uso, "super_reads": self.super_reads,
                "merged_writes": self.merged_writes, "dropped_reads": self.dropped_reads,
                "dropped_writes": self.dropped_writes}

    def _read_raw(self, size: int) -> bytes:
        while True:
            try:
                data = os.read(self._fd, size)
            except BlockingIOError:
                self._wait()
                continue
            except OSError as exc:
                raise self._gone(exc) from exc
            if data:
                return data
            self._empty_read()

    def readinto(self, buf: bytearray | memoryview) -> int:
        """Block until one packet arrives, copy it into ``buf``; return its length."""
        if self.offloads:
            packet = self.read()
            buf[: len(packet)] = packet
            return len(packet)
        while True:
            try:
                n = os.readv(self._fd, (buf,))
            except BlockingIOError:
                self._wait()
                continue
            except OSError as exc:
                raise self._gone(exc) from exc
            if n:
                return n
            self._empty_read()

    def read_batch(
        self, max_packets: int = DEFAULT_BATCH, size: int = DEFAULT_READ_SIZE, *,
        block: bool = True,
    ) -> list[bytes]:
        """Block for one packet, then take up to ``max_packets - 1`` more that are queued
        (``block=False``: return ``[]`` at once when nothing is queued).

        With offloads, ``max_packets`` counts reads from the kernel; the result holds every
        segment of the super-packets read."""
        fd = self._fd
        read_size = size if not self.offloads else DEFAULT_READ_SIZE
        if block:
            frames = [self._read_raw(read_size)]
        else:
            if self._closed:
                raise TunClosed(f"TUN device {self._name} is closed")
            frames = []
        try:
            while len(frames) < max_packets:
                data = os.read(fd, read_size)
                if not data:
                    break
                frames.append(data)
        except OSError:
            pass  # queue drained (EAGAIN) or device gone: the next read() reports the latter
        if not self.offloads:
            return frames
        for frame in frames:
            self._split_into_pending(frame)
        packets: list[bytes] = list(self._pending)  # type: ignore[arg-type]
        self._pending.clear()
        return packets

    def read_groups(self, max_reads: int = DEFAULT_BATCH, *, block: bool = True,
                    slot: int = 0) -> list[offload.Segments]:
        """Offloads only: block for one read from the kernel (``block=False``: return ``[]``
        at once when nothing is queued), then take up to ``max_reads - 1`` more that are
        queued; each read becomes one :class:`~.offload.Segments` (its packets, made lazily in
        place, share one destination).

        The reads land in buffers this device owns and reuses, one set per ``slot``: the
        groups and their packets are valid only until the next call with the same slot, and
        threads that may read at the same time must use different slots."""
        bufs = self._read_bufs.get(slot)
        if bufs is None:
            bufs = self._read_bufs[slot] = []
        while len(bufs) < max_reads:
            bufs.append(bytearray(FRAME_BUFFER))
        fd = self._fd
        readv = os.readv
        while True:
            try:
                n = readv(fd, (bufs[0],))
            except BlockingIOError:
                if not block:
                    if self._closed:
                        raise TunClosed(f"TUN device {self._name} is closed") from None
                    return []
                self._wait()
                continue
            except OSError as exc:
                raise self._gone(exc) from exc
            if n:
                break
            self._empty_read()
        groups: list[offload.Segments] = []
        i = 0
        while True:
            try:
                group = offload.Segments(bufs[i], n)
            except offload.OffloadError:
                self.dropped_reads += 1
            else:
                if group.count > 1:
                    self.super_reads += 1
                groups.append(group)
            i += 1
            if i >= max_reads:
                break
            try:
                n = readv(fd, (bufs[i],))
            except OSError:
                break  # queue drained (EAGAIN) or device gone: the next call reports the latter
            if not n:
                break
        return groups

    def wait_readable(self) -> None:
        """Block until a packet is queued (or the device is closed: :class:`TunClosed`).
        For one waiting thread (it keeps one poll object)."""
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")
        poller.poll()
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")

    def _wait(self) -> None:
        """Sleep until the TUN descriptor or the self-pipe is readable (or in error)."""
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")
        poller = select.poll()  # one per wait: poll objects refuse concurrent use
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        poller.poll()
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")

    def _empty_read(self) -> NoReturn:
        # /dev/null (after close) returns b""; a TUN never hands out an empty packet, so
        # anything else returning end-of-file is gone too (and must not make readers spin).
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")
        raise TunClosed(f"TUN device {self._name} is gone: end of file")

    def _gone(self, exc: OSError) -> TunClosed:
        if self._closed:
            return TunClosed(f"TUN device {self._name} is closed")
        return TunClosed(f"TUN device {self._name} is gone: {_describe(exc)}")

    # --- writing ----------------------------------------------------------------------------

    def write(self, packet: _Buffer) -> int:
        """Hand one IP packet to the kernel; returns its length, or 0 if it was dropped.
        With offloads, a packet in partial form goes with ``NEEDS_CSUM`` (offload module doc).

        Raises only :class:`TunClosed` (after :meth:`close`); a packet the kernel refuses is
        counted in :attr:`dropped_writes`.
        """
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")
        try:
            if self.offloads:
                return os.writev(self._fd, (offload.partial_header(packet), packet)
                                 ) - offload.VNET_HDR_LEN
            return os.write(self._fd, packet)
        except OSError:
            self.dropped_writes += 1
            return 0

    def write_batch(self, packets: Iterable[_Buffer]) -> int:
        """Write each packet; returns how many the kernel took. With offloads, consecutive
        segments of one TCP flow go to the kernel as one GSO super-packet (one write, one
        pass through the receiving stack)."""
        if self._closed:
            raise TunClosed(f"TUN device {self._name} is closed")
        fd = self._fd
        written = 0
        if self.offloads:
            for buffers in offload.coalesce(packets):
                try:
                    os.writev(fd, buffers)
                    written += 1
                    if len(buffers) > 2:
                        self.merged_writes += 1
                except OSError:
                    self.dropped_writes += 1
            return written
        for packet in packets:
            try:
                os.write(fd, packet)
                written += 1
            except OSError:
                self.dropped_writes += 1
        return written

    # --- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the device (the interface disappears) and wake blocked readers. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.dup2(null, self._fd, inheritable=False)
            finally:
                os.close(null)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Only now may the descriptor numbers be reused: no thread can hold this object.
        with contextlib.suppress(Exception):
            self.close()
        for attr in ("_fd", "_wake_r", "_wake_w"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                setattr(self, attr, -1)
                with contextlib.suppress(OSError):
                    os.close(fd)


def _describe(exc: OSError) -> str:
    if exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} ({os.strerror(exc.errno)})"
    return str(exc)
