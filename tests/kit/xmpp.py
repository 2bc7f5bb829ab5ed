"""Small XMPP probes for tests: raw stream features, a raw STARTTLS handshake, a slixmpp login.

These talk to test servers only (loopback or a kit namespace) and are bounded in time.
``netns`` arguments take a :class:`tests.kit.netns.Netns`: the TCP socket is then made in that
namespace, while the coroutine keeps running on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Literal

import slixmpp

from tests.kit.netns import Netns

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
DEFAULT_TIMEOUT = 5.0

LoginOutcome = Literal["session_start", "failed_auth", "tls_failed", "disconnected", "timeout"]


def _stream_header(domain: str) -> bytes:
    return (
        "<?xml version='1.0'?><stream:stream to='"
        + domain
        + "' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
        " version='1.0'>"
    ).encode()


async def _open(
    host: str, port: int, netns: Netns | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if netns is None:
        return await asyncio.open_connection(host, port)
    sock = netns.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _read_until(reader: asyncio.StreamReader, marker: bytes, limit: int = 65536) -> bytes:
    buf = b""
    while marker not in buf:
        chunk = await reader.read(4096)
        if not chunk:
            raise ConnectionError(f"server closed the stream before {marker!r}: {buf[-300:]!r}")
        buf += chunk
        if len(buf) > limit:
            raise ConnectionError("stream features too large")
    return buf


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


async def stream_features(
    host: str,
    port: int,
    domain: str = "svpn.test",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    netns: Netns | None = None,
) -> str:
    """The server's first ``<stream:features>`` (as text) on a fresh plaintext connection."""

    async def go() -> str:
        reader, writer = await _open(host, port, netns)
        try:
            writer.write(_stream_header(domain))
            await writer.drain()
            data = await _read_until(reader, b"</stream:features>")
        finally:
            await _close(writer)
        start = data.find(b"<stream:features")
        return data[start:].decode(errors="replace")

    return await asyncio.wait_for(go(), timeout)


def offers_starttls(features: str) -> bool:
    return NS_TLS in features


def sasl_mechanisms(features: str) -> list[str]:
    """Mechanism names in a features text (crude, enough for tests)."""
    out: list[str] = []
    rest = features
    while "<mechanism>" in rest:
        rest = rest.split("<mechanism>", 1)[1]
        name, rest = rest.split("</mechanism>", 1)
        out.append(name.strip())
    return out


async def starttls_handshake(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    domain: str = "svpn.test",
    *,
    timeout: float = DEFAULT_TIMEOUT,
    netns: Netns | None = None,
) -> dict[str, Any]:
    """Do STARTTLS by hand and a TLS handshake verifying ``domain``; return the peer cert.

    Raises ``ssl.SSLCertVerificationError`` for a wrong name or an unknown CA.
    """

    async def go() -> dict[str, Any]:
        reader, writer = await _open(host, port, netns)
        try:
            writer.write(_stream_header(domain))
            await writer.drain()
            features = await _read_until(reader, b"</stream:features>")
            if NS_TLS.encode() not in features:
                raise ConnectionError("server does not offer STARTTLS")
            writer.write(f"<starttls xmlns='{NS_TLS}'/>".encode())
            await writer.drain()
            await _read_until(reader, b"<proceed")
            await writer.start_tls(ssl_context, server_hostname=domain)
            ssl_obj = writer.get_extra_info("ssl_object")
            assert isinstance(ssl_obj, ssl.SSLObject)
            return dict(ssl_obj.getpeercert() or {})
        finally:
            await _close(writer)

    return await asyncio.wait_for(go(), timeout)


@dataclass
class LoginResult:
    outcome: LoginOutcome
    detail: str = ""


async def try_login(
    jid: str,
    password: str,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> LoginResult:
    """Sign in once with slixmpp and report what happened; always disconnects.

    With ``ssl_context`` the client requires STARTTLS and verifies with that context; with
    ``None`` it is the explicit plaintext test mode (loopback only).
    """
    xmpp = slixmpp.ClientXMPP(jid, password)
    xmpp.enable_direct_tls = False
    xmpp.auto_authorize = False
    xmpp.auto_subscribe = False
    if ssl_context is not None:
        xmpp.ssl_context = ssl_context
        xmpp.enable_starttls = True
        xmpp.enable_plaintext = False
    else:
        xmpp.enable_starttls = False
        xmpp.enable_plaintext = True
        xmpp.plugin["feature_mechanisms"].unencrypted_scram = True
        xmpp.plugin["feature_mechanisms"].unencrypted_plain = True

    done: asyncio.Future[LoginResult] = asyncio.get_running_loop().create_future()

    def finish(outcome: LoginOutcome, detail: object = "") -> None:
        if not done.done():
            done.set_result(LoginResult(outcome, str(detail)))

    xmpp.add_event_handler("session_start", lambda _e: finish("session_start"))
    xmpp.add_event_handler("failed_all_auth", lambda e: finish("failed_auth", e))
    xmpp.add_event_handler("ssl_invalid_chain", lambda e: finish("tls_failed", e))
    xmpp.add_event_handler("disconnected", lambda e: finish("disconnected", e))
    xmpp.connect(host, port)
    try:
        return await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return LoginResult("timeout", f"no outcome in {timeout}s")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(xmpp.disconnect(wait=0.5), 2.0)
        xmpp.abort()
