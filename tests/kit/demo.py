"""`make demo`: a local cluster of SocialVPN agents with a real XMPP server.

Builds a small internet of network namespaces: Prosody (TLS with a throw-away CA) and coturn on
a "pub" namespace; alice with no NAT, bob behind a home-router NAT, carol behind a symmetric
NAT, each running its own agent (`socialvpn up`). Through the CLI, exactly as a person would,
alice makes friends with bob and carol and forms the group `lab` (bob asks to join and alice
accepts; alice invites carol and carol accepts). The agents then link up over ICE (direct, or
relayed by TURN where both NATs are hard) with WireGuard-protocol sessions, and the demo shows
`peers` and pings across the group addresses. Everything is removed on exit (also Ctrl-C).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.kit.agents import AgentProc, wait_for
from tests.kit.ca import ThrowawayCA
from tests.kit.internet import Internet
from tests.kit.netns import NetLab

USERS = ("alice", "bob", "carol")


def say(text: str = "") -> None:
    print(text, flush=True)


SITES = {"alice": None, "bob": "eim", "carol": "symmetric"}
NAT_TEXT = {None: "no NAT", "eim": "a home-router NAT", "symmetric": "a symmetric NAT"}


def run_demo(hold: float | None, keep: bool) -> int:
    root = Path(tempfile.mkdtemp(prefix="socialvpn-demo-"))
    lab = NetLab()
    net = Internet(lab, root, ThrowawayCA.create(root / "ca"))
    agents: dict[str, AgentProc] = {}
    try:
        say("== network namespaces: " + ", ".join(
            f"{u} behind {NAT_TEXT[n]}" for u, n in SITES.items())
            + f"; Prosody and coturn on the 'internet' ({net.topo.service_ip})")
        net.start()
        server = net.server
        host, port = net.turn.stun_address
        say(f"   Prosody (TLS, test CA) {server.host}:{server.port}, domain {server.domain}; "
            f"STUN/TURN {host}:{port}")
        for user, nat in SITES.items():
            agents[user] = net.agent(user, net.site(user, nat), device_name=f"{user}-laptop",
                                     start=False)
        t0 = time.monotonic()
        for agent in agents.values():
            agent.start()
        for agent in agents.values():
            agent.wait_connected(timeout=20)
        say(f"== {len(agents)} agents signed in over verified TLS in "
            f"{time.monotonic() - t0:.2f} s")

        alice = agents["alice"]
        for friend in ("bob", "carol"):
            other = agents[friend]
            say(f"== alice: socialvpn friend add {other.jid}")
            alice.cli("friend", "add", other.jid)
            wait_for(lambda o=other: o.json("requests")["friends"], 10,
                     f"{friend} to see the request")
            say(f"== {friend}: socialvpn requests")
            say(indent(other.cli("requests").stdout))
            say(f"== {friend}: socialvpn accept {alice.jid}")
            other.cli("accept", alice.jid)

        def friends_settled() -> bool:
            f = alice.json("friends")
            return len(f) == 2 and all(x["subscription"] == "both" and x["devices"] for x in f)

        wait_for(friends_settled, 15, "alice's friendships to settle")
        say("== alice: socialvpn friends")
        say(indent(alice.cli("friends").stdout))

        bob, carol = agents["bob"], agents["carol"]
        say("== alice: socialvpn group create lab --subnet 10.77.0.0/24")
        say(indent(alice.cli("group", "create", "lab", "--subnet", "10.77.0.0/24").stdout))
        say(f"== bob: socialvpn group join {alice.jid} lab")
        say(indent(bob.cli("group", "join", alice.jid, "lab").stdout))
        wait_for(lambda: alice.json("requests")["joins"], 10, "bob's join request")
        say("== alice: socialvpn requests")
        say(indent(alice.cli("requests").stdout))
        say(f"== alice: socialvpn accept {bob.jid} --group lab")
        alice.cli("accept", bob.jid, "--group", "lab")
        say(f"== alice: socialvpn group invite lab {carol.jid}")
        alice.cli("group", "invite", "lab", carol.jid)
        wait_for(lambda: carol.json("requests")["invitations"], 10, "carol's invitation")
        say("== carol: socialvpn requests")
        say(indent(carol.cli("requests").stdout))
        say(f"== carol: socialvpn accept {alice.jid} --group lab")
        carol.cli("accept", alice.jid, "--group", "lab")

        def everyone_in() -> bool:
            return all(any(g["name"] == "lab" and g["epoch"] >= 3 for g in a.json("groups"))
                       for a in agents.values())

        wait_for(everyone_in, 15, "all three devices to hold the signed document")
        say("== bob: socialvpn group show lab   (a signed membership document, epoch 3)")
        say(indent(bob.cli("group", "show", "lab").stdout))

        def mesh_up() -> bool:
            return all(len([p for p in a.json("peers") if p.get("state") == "up"]) == 2
                       for a in agents.values())

        t0 = time.monotonic()
        wait_for(mesh_up, 60, "the three links to come up", interval=0.2)
        say(f"== all links up {time.monotonic() - t0:.2f} s after the last accept")
        for user in USERS:
            say(f"== {user}: socialvpn peers")
            say(indent(agents[user].cli("peers").stdout))
        for src, dst in (("bob", "carol-laptop"), ("carol", "alice-laptop")):
            say(f"== {src}: socialvpn ping {dst} -c 2")
            say(indent(agents[src].cli("ping", dst, "-c", "2", check=False).stdout))
        say("== alice: socialvpn status")
        say(indent(alice.cli("status").stdout))

        say("== look at it yourself (while this demo runs):")
        for user, agent in agents.items():
            cmd = (f"ip netns exec {agent.netns} {shlex.quote(sys.executable)} -m socialvpn "
                   f"peers --config {agent.config}")
            say(f"   {user:6} {cmd}")
        say(f"   logs:  {root}/<user>/agent.log   prosody: {net.server.log_path}")
        if hold is None and sys.stdin.isatty():
            say("== press Enter (or Ctrl-C) to stop the demo and remove everything")
            try:
                input()
            except EOFError:
                pass
        elif hold:
            say(f"== holding for {hold:.0f} s, then removing everything")
            time.sleep(hold)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        net.close()
        lab.cleanup()
        if keep:
            say(f"== stopped all agents and Prosody; files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            say("== stopped all agents and Prosody, removed their files (--keep keeps them)")


def indent(text: str) -> str:
    return "\n".join("   " + line for line in text.rstrip().splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hold", type=float, default=None,
                        help="seconds to keep the cluster running (default: until Enter on a "
                             "terminal, none otherwise)")
    parser.add_argument("--keep", action="store_true", help="keep configs and logs afterwards")
    args = parser.parse_args()
    return run_demo(args.hold, args.keep)


if __name__ == "__main__":
    sys.exit(main())
