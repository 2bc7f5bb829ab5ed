"""A small TCP forwarder from this namespace into network namespaces (used by `make demo`).

Each agent's dashboard listens on 127.0.0.1:7387 inside its own namespace, which a browser on
this machine cannot reach. ``python -m tests.kit.forward 7401:NS:127.0.0.1:7387 ...`` listens
on 127.0.0.1:7401 here and, per accepted connection, opens the upstream socket inside ``NS``
(a thread joins the namespace just to create it, see :func:`tests.kit.netns.in_netns`) and
copies bytes both ways until either side closes. Runs until SIGTERM/SIGINT.

:class:`Forwarder` is the same forwarder in a thread of the calling process, on a free port
(the dashboard tests use it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import threading
from dataclasses import dataclass

from tests.kit.netns import in_netns

CONNECT_TIMEOUT = 5.0
CHUNK = 65536


@dataclass(frozen=True)
class Route:
    listen_port: int
    netns: str
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> Route:
        """``LISTEN_PORT:NETNS:HOST:PORT``."""
        try:
            lport, netns, host, port = spec.split(":")
            return cls(int(lport), netns, host, int(port))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LISTEN_PORT:NETNS:HOST:PORT, got {spec!r}")\
                from None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def _handle(route: Route, reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    upstream: socket.socket | None = None
    try:
        upstream = await asyncio.to_thread(
            in_netns, route.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        upstream.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(upstream, (route.host, route.port)),
                               CONNECT_TIMEOUT)
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        upstream = None  # owned by the stream now
    except (OSError, TimeoutError) as exc:
        print(f"forward {route.listen_port} -> {route.netns}: {exc}", file=sys.stderr,
              flush=True)
        if upstream is not None:
            upstream.close()
        writer.close()
        return
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        for w in (writer, up_writer):
            w.close()


async def serve(routes: list[Route], host: str = "127.0.0.1") -> None:
    servers = []
    for route in routes:
        servers.append(await asyncio.start_server(
            lambda r, w, route=route: _handle(route, r, w), host, route.listen_port,
            reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("forwarding " + ", ".join(f"{host}:{r.listen_port} -> {r.netns} {r.host}:{r.port}"
                                    for r in routes), flush=True)
    await stop.wait()
    for server in servers:
        server.close()


class Forwarder:
    """``127.0.0.1:<free port>`` here → ``target`` inside namespace ``netns``, served by an
    event loop in a thread until :meth:`close` (bounded joins; open connections are dropped)."""

    def __init__(self, netns: str, target: tuple[str, int] = ("127.0.0.1", 7387)) -> None:
        route = Route(0, netns, *target)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="forward",
                                        daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            lambda r, w: _handle(route, r, w), "127.0.0.1", 0), self.loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("routes", nargs="+", type=Route.parse,
                        metavar="LISTEN_PORT:NETNS:HOST:PORT")
    parser.add_argument("--listen-host", default="127.0.0.1")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.routes, args.listen_host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
