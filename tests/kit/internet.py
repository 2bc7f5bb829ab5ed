"""A small internet for whole-product tests, benchmarks and the demo: an XMPP server (TLS, kit
CA) and coturn (STUN/TURN) on the "pub" namespace of a :class:`Topology`, and SocialVPN agents in
site namespaces (optionally behind NAT routers). ``with Internet(lab, tmp, ca) as net:`` starts
the servers; leaving the block stops every agent and server it started, also on failure.

The XMPP server is pluggable: ``server="prosody"`` (default) or ``server="ejabberd"``.
``domains=("a.test", "b.test")`` makes a federation instead (``certs`` may give a domain's
server another certificate, e.g. from a CA nobody trusts): one Prosody per domain, each on its
own address of ``pub`` (198.18.0.1, 198.18.0.2, ...) with c2s on 5222 and s2s on 5269 over TLS
with certificate verification (``s2s_secure_auth``). Names resolve through per-namespace hosts
files (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` bind-mounts over ``/etc/hosts``),
written for ``pub`` and every site before anything starts there and removed by :meth:`close`;
agents then connect to their domain by name, as they would on the real network.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal, Protocol

from tests.kit.agents import AgentProc
from tests.kit.ca import CertFiles, ThrowawayCA
from tests.kit.coturn import Coturn
from tests.kit.ejabberd import Ejabberd
from tests.kit.netns import NatKind, NetLab, Site, Topology
from tests.kit.prosody import DEFAULT_DOMAIN, Prosody

ServerKind = Literal["prosody", "ejabberd"]
NETNS_ETC = Path("/etc/netns")
C2S_PORT = 5222
S2S_PORT = 5269


class XmppServer(Protocol):
    """What the bed needs of an XMPP server kit (Prosody and Ejabberd both provide it)."""

    domain: str
    host: str
    port: int
    log_path: Path

    @property
    def pid(self) -> int | None: ...
    def start(self) -> None: ...
    def close(self) -> None: ...
    def register(self, user: str, password: str) -> str: ...
    def log_tail(self, lines: int = 40) -> str: ...


def write_netns_hosts(netns: str, names: dict[str, str]) -> Path:
    """Write ``/etc/netns/<netns>/hosts`` (localhost plus ``names``: name -> address)."""
    directory = NETNS_ETC / netns
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
    lines += [f"{address} {name}" for name, address in names.items()]
    (directory / "hosts").write_text("\n".join(lines) + "\n")
    return directory


def remove_netns_etc(netns: str) -> None:
    """Remove ``/etc/netns/<netns>`` (no error if it is gone)."""
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)


class Internet:
    def __init__(self, lab: NetLab, tmp: Path, ca: ThrowawayCA, *,
                 prosody_log: str = "info", server: ServerKind = "prosody",
                 domains: tuple[str, ...] | None = None,
                 certs: dict[str, CertFiles] | None = None) -> None:
        self.lab = lab
        self.tmp = tmp
        self.ca = ca
        self.topo: Topology = lab.topology()
        self.federated = domains is not None and len(domains) > 1
        self._etc_dirs: list[str] = []
        self.servers: dict[str, XmppServer] = {}
        domains = domains or (DEFAULT_DOMAIN,)
        if self.federated:
            if server != "prosody":
                raise ValueError("federation is built with Prosody servers")
            self.names: dict[str, str] = {}
            for i, domain in enumerate(domains, start=1):
                address = f"198.18.0.{i}"
                if address != self.topo.service_ip:
                    self.topo.pub.add_address("lo", f"{address}/32")
                self.names[domain] = address
            self._hosts(self.topo.pub.name)
            for domain, address in self.names.items():
                self.servers[domain] = Prosody(
                    tmp / f"prosody-{domain}", domain=domain, netns=self.topo.pub, host=address,
                    port=C2S_PORT, s2s_port=S2S_PORT, ca=ca, cert=(certs or {}).get(domain),
                    log_level=prosody_log)  # type: ignore[arg-type]
        elif server == "ejabberd":
            self.servers[domains[0]] = Ejabberd(tmp / "ejabberd", domain=domains[0], ca=ca,
                                                netns=self.topo.pub, host=self.topo.service_ip)
        else:
            self.servers[domains[0]] = Prosody(
                tmp / "prosody", domain=domains[0], netns=self.topo.pub,
                host=self.topo.service_ip, ca=ca, log_level=prosody_log)  # type: ignore[arg-type]
        self.server: XmppServer = next(iter(self.servers.values()))
        self.turn = Coturn(self.topo.pub, self.topo.service_ip, workdir=tmp / "coturn")
        self.agents: list[AgentProc] = []
        self._accounts: set[tuple[str, str]] = set()

    def _hosts(self, netns: str) -> None:
        write_netns_hosts(netns, self.names)
        self._etc_dirs.append(netns)

    def start(self) -> Internet:
        try:
            for server in self.servers.values():
                server.start()
            self.turn.start()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> Internet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.turn.stop()
        for server in self.servers.values():
            server.close()
        for netns in self._etc_dirs:
            remove_netns_etc(netns)
        self._etc_dirs.clear()

    def detach(self) -> None:
        """Let the servers outlive this process (`make demo` leaves its cluster running): drop
        the kits' last-resort finalizers that would stop them at interpreter exit."""
        for server in [*self.servers.values(), self.turn]:
            finalizer = getattr(server, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()

    def server_pids(self) -> list[tuple[str, int]]:
        """(what, pid) of every server process running now."""
        out = [(f"xmpp {d}", s.pid) for d, s in self.servers.items()]
        out.append(("coturn", self.turn.pid))
        return [(what, pid) for what, pid in out if pid]

    def ice_config(self, turn: bool = True) -> str:
        host, port, user, password = self.turn.turn_credentials
        text = f'[ice]\nstun = ["{host}:{port}"]\n'
        if turn:
            text += (f'turn = [{{ url = "turn:{host}:{port}", username = "{user}", '
                     f'password = "{password}" }}]\n')
        return text

    def site(self, name: str, nat: NatKind | None = None) -> Site:
        site = self.topo.add_site(name, nat=nat)
        if self.federated:
            self._hosts(site.host.name)
        return site

    def server_log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {d} ---\n{s.log_tail(lines)}" for d, s in self.servers.items())

    def agent(self, name: str, site: Site, *, account: str | None = None, turn: bool = True,
              device_name: str | None = None, start: bool = True,
              domain: str | None = None) -> AgentProc:
        """An agent in ``site``'s host namespace for ``account`` (default: ``name``; the same
        account again makes another device of it) on ``domain``'s server (default: the first),
        signed up on the first use."""
        account = account or name
        server = self.servers[domain] if domain else self.server
        if (account, server.domain) not in self._accounts:
            server.register(account, f"{account}-pw")
            self._accounts.add((account, server.domain))
        # federated: by name, resolved through the namespace's hosts file
        where = (f"{server.domain}:{server.port}" if self.federated
                 else f"{server.host}:{server.port}")
        agent = AgentProc(self.tmp / name, f"{account}@{server.domain}", f"{account}-pw",
                          server=where, ca_file=self.ca.ca_file, netns=site.host.name,
                          extra_config=self.ice_config(turn), device_name=device_name or name)
        agent.init()
        self.agents.append(agent)
        if start:
            agent.start()
        return agent
