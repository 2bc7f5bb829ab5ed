"""The ``socialvpn`` command line.

Talks to the running agent only through :mod:`socialvpn.web.client`. Every command takes
``--config PATH``; every listing command takes ``--json``. Errors go to stderr as one line and
a non-zero exit: 2 for configuration and usage, 3 for a failed sign-in, 1 for the rest.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import __version__
from .config import (
    DEFAULT_STATE_DIR,
    Config,
    check_files,
    default_config_path,
    load_config,
    parse_config,
    parse_endpoint,
    render_config,
    validate_device_name,
    validate_jid,
)
from .errors import AgentNotRunning, APIError, ConfigError, SocialVPNError, StateError
from .state import StateDir, atomic_write
from .web.client import APIClient

PROG = "socialvpn"


# --- helpers -------------------------------------------------------------------------------


def _client(cfg: Config) -> APIClient:
    return APIClient(StateDir(cfg.state_dir).api_socket)


def _api(args: argparse.Namespace) -> APIClient:
    return _client(load_config(args.config))


def _listing(args: argparse.Namespace, path: str) -> Any:
    """GET ``path``; with ``--json`` print it and return None (the caller is done)."""
    value = _api(args).get(path)
    if args.json:
        _print_json(value)
        return None
    return value


def _report(args: argparse.Namespace, result: dict[str, Any], text: str) -> int:
    """The outcome of a change: JSON with ``--json``, else one line."""
    if args.json:
        _print_json(result)
    else:
        print(text)
    return 0


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    s = max(0, int(now - ts))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m ago"


# --- commands ------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    path: Path = args.config
    if path.exists() and not args.force:
        raise ConfigError(f"{path}: already exists; use --force to overwrite it")
    jid = validate_jid(args.jid, "--jid")
    device_name = validate_device_name(args.device_name or _hostname(), "--device-name")
    if args.server:
        parse_endpoint(args.server, 5222, "--server")
    state_dir = Path(args.state_dir or DEFAULT_STATE_DIR).expanduser().absolute()
    ca_file = Path(args.ca_file).expanduser().absolute() if args.ca_file else None
    password_file: Path | None = None
    if args.password_file:
        password_file = Path(args.password_file).expanduser().absolute()
    elif sys.stdin.isatty() and not os.environ.get("SOCIALVPN_PASSWORD"):
        password = getpass.getpass(f"Password for {jid}: ")
        if not password or password != getpass.getpass("Again: "):
            raise ConfigError("--password-file: the passwords were empty or did not match")
        password_file = path.absolute().parent / "password"
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
        atomic_write(password_file, password.encode() + b"\n")
    text = render_config(jid=jid, password_file=password_file, server=args.server,
                         ca_file=ca_file, allow_plaintext=args.allow_plaintext,
                         device_name=device_name, state_dir=state_dir)
    cfg = parse_config(text, path)  # what we write must load
    warnings = check_files(cfg) if password_file or os.environ.get("SOCIALVPN_PASSWORD") else []
    path.absolute().parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode())
    keys, created = StateDir(state_dir).load_or_create_keys()
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {path}")
    print(f"{'made' if created else 'kept the existing'} device keys in {state_dir}")
    print(f"device id    {keys.device_id}")
    print(f"fingerprint  {keys.fingerprint}")
    if password_file is None:
        print("password     from $SOCIALVPN_PASSWORD when the agent starts")
    print(f"next: {PROG} up{'' if path == default_config_path() else f' --config {path}'}")
    return 0


def _hostname() -> str:
    name = os.uname().nodename.split(".")[0]
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:32].lstrip("-_.")
    return cleaned or "device"


def cmd_up(args: argparse.Namespace) -> int:
    from .daemon import up  # the daemon pulls in slixmpp and aiohttp: only `up` pays for that

    return up(load_config(args.config), args.log_level)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from .daemon import cleanup

    if os.geteuid() != 0:
        raise SocialVPNError("cleanup changes network interfaces: run it as root")
    removed = cleanup()
    if args.json:
        _print_json({"removed": removed})
    elif removed:
        print("removed: " + ", ".join(removed))
    else:
        print("nothing to clean up")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from .service import install

    cfg = load_config(args.config)
    files = [(what, path) for what, path in (("the password file", cfg.account.password_file),
                                             ("the CA file", cfg.xmpp.ca_file)) if path]
    result = install(args.config, cfg.state_dir, unit_dir=args.unit_dir,
                     enable=not args.no_enable, now=args.now, force=args.force, files=files)
    if cfg.account.password_file is None:
        result.warnings.append("the config has no password_file and the service does not "
                               "see $SOCIALVPN_PASSWORD: set password_file (or Environment= "
                               "in a drop-in)")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        _print_json(result.to_json())
    else:
        print("\n".join(result.messages))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    warnings = check_files(cfg)
    state = StateDir(cfg.state_dir)
    if not state.has_keys():
        raise StateError(f"{cfg.state_dir}: no device keys; run `{PROG} init` first")
    keys = state.load_keys()
    if args.json:
        _print_json({"ok": True, "config": str(cfg.path), "warnings": warnings,
                     "device_id": keys.device_id})
    else:
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{cfg.path}: ok (account {cfg.account.jid}, device {cfg.device.name} "
              f"{keys.device_id})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = _listing(args, "status")
    if st is None:
        return 0
    import time

    now = time.time()
    x = st["xmpp"]
    line = f"{x['state']} - {x['reason']}"
    if x.get("next_attempt_in") is not None and x["state"] != "connected":
        line += f" (next attempt in {x['next_attempt_in']:.0f} s)"
    if x.get("tls"):
        line += f" [{x['tls']}]"
    dev = st["device"]
    print(f"agent        {st['agent']['state']} (pid {st['agent']['pid']}, "
          f"up {_ago(st['agent']['started_at'], now).removesuffix(' ago')})")
    print(f"account      {st['account']}")
    print(f"xmpp         {line}")
    print(f"device       {dev['name']} ({dev['id']})")
    print(f"fingerprint  {dev['fingerprint']}")
    groups = st.get("groups") or []
    print("groups       " + (", ".join(f"{g['name']} {g['ip4']} {g['ip6']} ({g['role']})"
                                         for g in groups) if groups else "none"))
    dropped = st.get("counters", {}).get("stanzas_dropped")
    if dropped:
        print("dropped      " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    return 0


def cmd_friends(args: argparse.Namespace) -> int:
    friends = _listing(args, "friends")
    if friends is None:
        return 0
    if not friends:
        print(f"no friends yet: `{PROG} friend add JID` sends a request")
        return 0
    rows = []
    for f in friends:
        sub = f["subscription"]
        if f["request_sent"]:
            sub += " (request sent)"
        if f["request_received"]:
            sub += " (asks you)"
        devices = ", ".join(f"{d['name']} {d['id']}" for d in f["devices"]) or "-"
        rows.append([f["jid"], sub, "online" if f["online"] else "offline", devices])
    _table(rows, ["JID", "SUBSCRIPTION", "PRESENCE", "DEVICES"])
    return 0


def cmd_friend(args: argparse.Namespace) -> int:
    result = _api(args).post("friends", {"op": args.friend_op, "jid": args.jid})
    return _report(args, result, f"{result['jid']}: {result['result']}")


def cmd_requests(args: argparse.Namespace) -> int:
    reqs = _listing(args, "requests")
    if reqs is None:
        return 0
    import time

    now = time.time()
    rows = [[r["jid"], "friend", "-", _ago(r["received_at"], now)] for r in reqs["friends"]]
    rows += [[r["jid"], f"join ({r['device']})", r["group"], _ago(r.get("received_at"), now)]
             for r in reqs.get("joins", [])]
    rows += [[r["jid"], f"invitation (owner key {r['owner_key_fingerprint']})", r["group"],
              _ago(r.get("received_at"), now)] for r in reqs.get("invitations", [])]
    if not rows:
        print("no pending requests")
        return 0
    _table(rows, ["FROM", "KIND", "GROUP", "RECEIVED"])
    return 0


def cmd_groups(args: argparse.Namespace) -> int:
    groups = _listing(args, "groups")
    if groups is None:
        return 0
    if not groups:
        print(f"no groups yet: `{PROG} group create NAME` makes one")
        return 0
    _table([[g["name"], g["role"], g["owner"], g["ip4"] or "-", g["subnet4"],
             str(g["devices"]), str(g["epoch"])] for g in groups],
           ["GROUP", "ROLE", "OWNER", "MY ADDRESS", "SUBNET", "DEVICES", "EPOCH"])
    return 0


def cmd_group(args: argparse.Namespace) -> int:
    client = _api(args)
    op = args.group_op
    if op == "show":
        g = client.get(f"groups/{quote(args.name, safe='')}")
        if args.json:
            _print_json(g)
            return 0
        print(f"group        {g['name']} ({g['role']}, epoch {g['epoch']})")
        print(f"owner        {g['owner']}  key {g['owner_key_fingerprint']}")
        print(f"subnets      {g['subnet4']}  {g['prefix6']}")
        print(f"my address   {g['ip4']}  {g['ip6']}")
        rows = [[m["jid"], d["name"], d["id"], d["ip4"], d["ip6"],
                 {True: "online", False: "offline", None: "- (not a friend)"}[d["online"]]]
                for m in g["member_list"] for d in m["devices"]]
        _table(rows, ["MEMBER", "DEVICE", "ID", "IPV4", "IPV6", "PRESENCE"])
        for j in g["join_requests"]:
            print(f"asks to join: {j['jid']} ({j['device']['name']})")
        return 0
    body: dict[str, Any] = {"op": op}
    if op == "create":
        body.update(name=args.name, subnet=args.subnet)
    elif op in ("invite", "remove"):
        body.update(name=args.name, jid=args.jid)
    elif op == "join":
        body.update(name=args.name, jid=args.owner)
    else:
        body.update(name=args.name)
    result = client.post("groups", {k: v for k, v in body.items() if v is not None})
    if op == "create":
        text = (f"created {result['name']}: subnet {result['subnet4']} {result['prefix6']}, "
                f"your address {result['ip4']}\nowner key fingerprint "
                f"{result['owner_key_fingerprint']} (members compare it)")
    else:
        text = f"{result.get('group', args.name)}: {result['result']}"
    return _report(args, result, text)


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _listing(args, "peers")
    if peers is None:
        return 0
    if not peers:
        print("no peers: join a group with other devices in it")
        return 0
    import time

    now = time.time()
    rows = []
    for p in peers:
        state = p.get("state") or p["signalling"]
        if p.get("failure") and state != "up":
            state += f" ({p['failure']})"
        rtt = f"{p['rtt'] * 1000:.1f} ms" if p.get("rtt") else "-"
        rows.append([p["group"], p["jid"], p["device"], p["ip4"], state, p.get("path") or "-",
                     p.get("endpoint") or "-", rtt, _ago(p.get("last_handshake"), now),
                     f"{p.get('rx_bytes', 0)}/{p.get('tx_bytes', 0)}"])
    _table(rows, ["GROUP", "JID", "DEVICE", "ADDRESS", "STATE", "PATH", "ENDPOINT", "RTT",
                  "HANDSHAKE", "RX/TX"])
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    login = _api(args).post("dashboard/login", {})
    if args.json:
        _print_json(login)
        return 0
    print(login["url"])
    print(f"Open this link in a browser on this computer; it works once, within "
          f"{login['expires_in'] // 60} minutes.", file=sys.stderr)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    import subprocess

    peers = _api(args).get("peers")
    target = args.peer
    match = [p for p in peers if target in (p["device"], p["jid"], p["id"], p["ip4"], p["ip6"])]
    if not match:
        raise SocialVPNError(f"no peer {target!r} (see `{PROG} peers`)")
    p = match[0]
    address = target if target in (p["ip4"], p["ip6"]) else p["ip4"]
    print(f"{p['device']} ({p['jid']}) at {address} in {p['group']}: path "
          f"{p.get('path') or 'not connected'}, endpoint {p.get('endpoint') or '-'}")
    result = subprocess.run(["ping", "-n", "-c", str(args.count), "-W", "2", address],
                            stdin=subprocess.DEVNULL, check=False)
    return result.returncode


def _decide(op: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        body = {"op": op, "jid": args.jid}
        if args.group:
            body["group"] = args.group
        result = _api(args).post("requests", body)
        return _report(args, result, f"{result['jid']}: {result['result']}")

    return run


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                        help="config file (default: $SOCIALVPN_CONFIG or "
                             "/etc/socialvpn/config.toml)")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="SocialVPN: a private network of your XMPP friends. Sign in with the XMPP "
                    "account you already have, make friends, and (soon) groups whose devices "
                    "reach each other by virtual IP address, end-to-end encrypted.",
        epilog=f"Start with `{PROG} init --jid you@example.org`, then `{PROG} up`. "
               f"`{PROG} COMMAND --help` explains each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help="config file (default: $SOCIALVPN_CONFIG or "
                             "/etc/socialvpn/config.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("init", parents=[common], help="write the config and make device keys",
                       description="Write the config file (mode 0600) and make this device's "
                                   "keys in the state directory. The password is read from "
                                   "--password-file, $SOCIALVPN_PASSWORD or a prompt; "
                                   "never from the command line.")
    p.add_argument("--jid", required=True, help="your XMPP account, e.g. alice@example.org")
    p.add_argument("--password-file", metavar="F", help="file holding the account password")
    p.add_argument("--server", metavar="HOST[:PORT]",
                   help="XMPP server to connect to (default: the JID's domain)")
    p.add_argument("--ca-file", metavar="F", help="extra CA certificate (PEM) to trust")
    p.add_argument("--allow-plaintext", action="store_true",
                   help="allow an unencrypted connection (only to a test server on loopback)")
    p.add_argument("--device-name", metavar="N", help="name of this device (default: hostname)")
    p.add_argument("--state-dir", metavar="D",
                   help="where keys and state live (default: /var/lib/socialvpn)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config file "
                   "(the device keys are kept)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("up", parents=[common], help="run the agent in the foreground",
                       description="Run the agent until SIGTERM or SIGINT (systemd runs this). "
                                   "Exits 3 if the server refuses the password.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("status", parents=[common, listing], help="agent and connection state")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("friends", parents=[common, listing],
                       help="your roster: subscription, presence and devices")
    p.set_defaults(func=cmd_friends)

    p = sub.add_parser("friend", parents=[common], help="send or withdraw a friend request")
    fsub = p.add_subparsers(dest="friend_op", metavar="add|remove")
    fsub.required = True
    for op, text in (("add", "send a friend request (or accept theirs)"),
                     ("remove", "remove a friend or withdraw a request")):
        fp = fsub.add_parser(op, parents=[common, listing], help=text, description=text)
        fp.add_argument("jid", metavar="JID")
        fp.set_defaults(func=cmd_friend)

    p = sub.add_parser("groups", parents=[common, listing], help="your groups and addresses")
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser("group", parents=[common], help="create, invite, join, remove, leave, show",
                       description="Groups are private networks of friends' devices. The owner "
                                   "accepts members; nothing is accepted automatically.")
    gsub = p.add_subparsers(dest="group_op", metavar="create|invite|join|remove|leave|show")
    gsub.required = True
    gp = gsub.add_parser("create", parents=[common, listing], help="create a group you own")
    gp.add_argument("name", metavar="NAME", help="1-11 of a-z 0-9 -, starting with a letter")
    gp.add_argument("--subnet", metavar="CIDR",
                    help="private IPv4 subnet, /16 to /29 (default: derived from the group id)")
    gp = gsub.add_parser("invite", parents=[common, listing], help="invite a friend (owner)")
    gp.add_argument("name", metavar="NAME")
    gp.add_argument("jid", metavar="JID")
    gp = gsub.add_parser("join", parents=[common, listing],
                         help="ask a friend to let you into their group")
    gp.add_argument("owner", metavar="OWNER_JID")
    gp.add_argument("name", metavar="NAME")
    gp = gsub.add_parser("remove", parents=[common, listing], help="remove a member (owner)")
    gp.add_argument("name", metavar="NAME")
    gp.add_argument("jid", metavar="JID")
    gp = gsub.add_parser("leave", parents=[common, listing], help="leave a group")
    gp.add_argument("name", metavar="NAME")
    gp = gsub.add_parser("show", parents=[common, listing], help="members, addresses, requests")
    gp.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_group)
    for gp in gsub.choices.values():
        gp.set_defaults(func=cmd_group)

    p = sub.add_parser("peers", parents=[common, listing],
                       help="member devices: state, path, endpoint, RTT, handshake, traffic")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("ping", parents=[common], help="ping a peer over the group network")
    p.add_argument("peer", metavar="PEER", help="device name, JID, device id or address")
    p.add_argument("-c", "--count", type=int, default=3, help="how many echo requests")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("dashboard", parents=[common, listing],
                       help="print a login URL for the local dashboard",
                       description="Print a one-time login URL for the dashboard the agent "
                                   "serves on [web] listen (default 127.0.0.1:7387). The URL "
                                   "works once, within two minutes, and logs the browser in.")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("requests", parents=[common, listing],
                       help="pending friend requests, join requests and invitations")
    p.set_defaults(func=cmd_requests)

    for op, text in (("accept", "accept a friend request, a join request or an invitation"),
                     ("reject", "reject a friend request, a join request or an invitation")):
        p = sub.add_parser(op, parents=[common, listing], help=text, description=text)
        p.add_argument("jid", metavar="JID")
        p.add_argument("--group", metavar="NAME",
                       help="decide the join request or invitation for this group")
        p.set_defaults(func=_decide(op))

    p = sub.add_parser("cleanup", parents=[common, listing],
                       help="remove every interface and route the agent made",
                       description="Remove every svpn-* interface, with its addresses and "
                                   "routes. Safe to run any time; the agent runs it when it "
                                   "stops, and systemd after a crash.")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("service", parents=[common], help="install the systemd service",
                       description="Run the agent as a systemd service that starts on boot.")
    ssub = p.add_subparsers(dest="service_op", metavar="install")
    ssub.required = True
    sp = ssub.add_parser(
        "install", parents=[common, listing], help="write and enable the systemd unit",
        description="Write socialvpn.service (mode 0644) for this installation and the config "
                    "file given with --config (it must exist: `socialvpn init` first), then "
                    "`systemctl daemon-reload` and `systemctl enable` it (and start it with "
                    "--now). The unit runs `socialvpn up` as a Type=notify service with only "
                    "CAP_NET_ADMIN, restarts it on failure and runs `socialvpn cleanup` after "
                    "it stops. Running it again is harmless; a unit edited by hand is kept "
                    "unless --force. Without systemd as PID 1 the unit is only written.")
    sp.add_argument("--unit-dir", type=Path, default=Path("/etc/systemd/system"), metavar="DIR",
                    help="where to write the unit (default: /etc/systemd/system)")
    sp.add_argument("--no-enable", action="store_true",
                    help="write the unit and reload systemd, but do not enable it")
    sp.add_argument("--now", action="store_true", help="also start (or restart) the service")
    sp.add_argument("--force", action="store_true",
                    help="replace a unit that was changed by hand")
    sp.set_defaults(func=cmd_service)

    p = sub.add_parser("check-config", parents=[common, listing],
                       help="validate the config file, password and keys")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        args.config = default_config_path()
    if not hasattr(args, "json"):
        args.json = False
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (AgentNotRunning, APIError, StateError, SocialVPNError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # never a traceback for a person; the agent's log has details
        if os.environ.get("SOCIALVPN_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} "
              "(set SOCIALVPN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
