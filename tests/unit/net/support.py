"""Hand-made IPv4/IPv6 packets for the net/ unit tests."""

from __future__ import annotations

import ipaddress


def ipv4(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    """A minimal IPv4 header (no checksum; nothing here checks it) plus ``payload``."""
    header = bytearray(20)
    header[0] = 0x45
    header[2:4] = (20 + len(payload)).to_bytes(2, "big")
    header[8] = 64
    header[9] = 17
    header[12:16] = ipaddress.IPv4Address(src).packed
    header[16:20] = ipaddress.IPv4Address(dst).packed
    return bytes(header) + payload


def ipv6(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    header = bytearray(40)
    header[0] = 0x60
    header[4:6] = len(payload).to_bytes(2, "big")
    header[6] = 17
    header[7] = 64
    header[8:24] = ipaddress.IPv6Address(src).packed
    header[24:40] = ipaddress.IPv6Address(dst).packed
    return bytes(header) + payload


def packet(src: str, dst: str, payload: bytes = b"hello") -> bytes:
    return ipv6(src, dst, payload) if ":" in dst else ipv4(src, dst, payload)
