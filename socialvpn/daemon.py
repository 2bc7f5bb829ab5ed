"""Process glue for ``socialvpn up``: logging, the state lock, signals, sd_notify, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from .agent import Agent
from .config import Config, read_password
from .errors import ConfigError
from .linkhub import cleanup_network
from .state import StateDir

log = logging.getLogger("socialvpn")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3  # the unit file lists it in RestartPreventExitStatus: retrying cannot help


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd the journal adds time stamps; a terminal gets them from us.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # slixmpp is chatty at INFO and repeats what we report ourselves.
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL if level != "debug" else logging.DEBUG)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about READY/STOPPING; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


async def run_agent(cfg: Config, password: str, state: StateDir) -> int:
    """Run until SIGTERM/SIGINT (→ 0) or an authentication failure (→ EXIT_AUTH)."""
    keys = state.load_keys()
    agent = Agent(cfg, password, state, keys)
    agent.notify = sd_notify
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        sd_notify("RELOADING=1")
        try:
            agent.reload(read_password(cfg))
            log.info("reloaded: password re-read")
        except ConfigError as exc:
            log.error("reload failed: %s", exc)
        sd_notify("READY=1")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    await agent.start()
    sd_notify("READY=1\nSTATUS=running")
    stopped = asyncio.ensure_future(stop.wait())
    code = EXIT_OK
    try:
        await asyncio.wait({stopped, agent.fatal}, return_when=asyncio.FIRST_COMPLETED)
        if agent.fatal.done() and not stopped.done():
            print(f"socialvpn: {agent.fatal.result()}", file=sys.stderr, flush=True)
            code = EXIT_AUTH
    finally:
        sd_notify("STOPPING=1")
        stopped.cancel()
        await agent.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("agent stopped")
    return code


def up(cfg: Config, log_level: str = "info") -> int:
    """``socialvpn up``: foreground agent. Errors in config/state raise before anything runs."""
    password = read_password(cfg)
    state = StateDir(cfg.state_dir)
    state.load_keys()  # fail early and clearly if `init` was not run
    state.lock()
    setup_logging(log_level)
    try:
        return asyncio.run(run_agent(cfg, password, state))
    finally:
        state.unlock()


def cleanup() -> list[str]:
    """``socialvpn cleanup``: remove every interface and route the agent made."""
    return cleanup_network()
