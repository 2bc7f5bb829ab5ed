"""A small internet for whole-product tests, benchmarks and the demo: Prosody (TLS, kit CA) and
coturn (STUN/TURN) on the "pub" namespace of a :class:`Topology`, and SocialVPN agents in site
namespaces (optionally behind NAT routers). ``with Internet(lab, tmp, ca) as net:`` starts the
servers; leaving the block stops every agent and server it started, also on failure."""

from __future__ import annotations

from pathlib import Path

from tests.kit.agents import AgentProc
from tests.kit.ca import ThrowawayCA
from tests.kit.coturn import Coturn
from tests.kit.netns import NatKind, NetLab, Site, Topology
from tests.kit.prosody import Prosody


class Internet:
    def __init__(self, lab: NetLab, tmp: Path, ca: ThrowawayCA, *,
                 prosody_log: str = "info") -> None:
        self.lab = lab
        self.tmp = tmp
        self.ca = ca
        self.topo: Topology = lab.topology()
        self.server = Prosody(tmp / "prosody", netns=self.topo.pub, host=self.topo.service_ip,
                              ca=ca, log_level=prosody_log)  # type: ignore[arg-type]
        self.turn = Coturn(self.topo.pub, self.topo.service_ip)
        self.agents: list[AgentProc] = []
        self._accounts: set[str] = set()

    def start(self) -> Internet:
        try:
            self.server.start()
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
        self.server.close()

    def ice_config(self, turn: bool = True) -> str:
        host, port, user, password = self.turn.turn_credentials
        text = f'[ice]\nstun = ["{host}:{port}"]\n'
        if turn:
            text += (f'turn = [{{ url = "turn:{host}:{port}", username = "{user}", '
                     f'password = "{password}" }}]\n')
        return text

    def site(self, name: str, nat: NatKind | None = None) -> Site:
        return self.topo.add_site(name, nat=nat)

    def agent(self, name: str, site: Site, *, account: str | None = None, turn: bool = True,
              device_name: str | None = None, start: bool = True) -> AgentProc:
        """An agent in ``site``'s host namespace for ``account`` (default: ``name``; the same
        account again makes another device of it), signed up on the first use."""
        account = account or name
        if account not in self._accounts:
            self.server.register(account, f"{account}-pw")
            self._accounts.add(account)
        agent = AgentProc(self.tmp / name, f"{account}@{self.server.domain}", f"{account}-pw",
                          server=f"{self.server.host}:{self.server.port}",
                          ca_file=self.ca.ca_file, netns=site.host.name,
                          extra_config=self.ice_config(turn), device_name=device_name or name)
        agent.init()
        self.agents.append(agent)
        if start:
            agent.start()
        return agent
