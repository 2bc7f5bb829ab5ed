"""``/metrics``: the agent's state in the Prometheus text exposition format (version 0.0.4).

Written by hand (no runtime dependency): :func:`render` takes what the API's ``status`` and
``peers`` handlers return, so the numbers are the ones the CLI and the dashboard show.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_]")


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def metric_name(text: str) -> str:
    name = _NAME_BAD.sub("_", text)
    return name if name and not name[0].isdigit() else f"_{name}"


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return "NaN"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], Any]]) -> None:
        rows = list(samples)
        if not rows:
            return
        sample = f"{name}_total" if kind == "counter" else name  # as prometheus_client does
        self.lines.append(f"# HELP {sample} {_escape_help(help_text)}")
        self.lines.append(f"# TYPE {sample} {kind}")
        for labels, value in rows:
            text = ",".join(f'{metric_name(k)}="{escape_label(str(v))}"'
                            for k, v in labels.items())
            self.lines.append(f"{sample}{{{text}}} {_number(value)}" if text
                              else f"{sample} {_number(value)}")


def render(status: dict[str, Any], peers: list[dict[str, Any]],
           web: dict[str, Any] | None = None) -> str:
    out = _Writer()
    agent = status.get("agent") or {}
    xmpp = status.get("xmpp") or {}
    device = status.get("device") or {}
    out.family("socialvpn_up", "gauge", "1 while the agent runs", [({}, 1)])
    out.family("socialvpn_info", "gauge", "the agent's version and this device",
               [({"version": str(agent.get("version", "")),
                  "device": str(device.get("name", "")),
                  "device_id": str(device.get("id", "")),
                  "account": str(status.get("account", ""))}, 1)])
    if isinstance(agent.get("started_at"), int | float):
        out.family("socialvpn_start_time_seconds", "gauge", "when the agent started (Unix time)",
                   [({}, float(agent["started_at"]))])
    out.family("socialvpn_xmpp_connected", "gauge", "1 while signed in to the XMPP server",
               [({}, 1 if xmpp.get("state") == "connected" else 0)])
    groups = status.get("groups")
    if isinstance(groups, list):
        out.family("socialvpn_groups", "gauge", "groups this device is in",
                   [({}, len(groups))])
    counters = status.get("counters") or {}
    for name, by_label in sorted(counters.items()):
        if not isinstance(by_label, dict):
            continue
        out.family(f"socialvpn_{metric_name(name)}", "counter",
                   f"agent counter {name}, by reason",
                   [({"reason": label} if label else {}, n)
                    for label, n in sorted(by_label.items()) if isinstance(n, int)])
    if web is not None:
        out.family("socialvpn_dashboard_listening", "gauge",
                   "1 while the dashboard's TCP listener is bound",
                   [({"listen": str(web.get("listen", ""))}, bool(web.get("listening")))])
        refused = web.get("refused") or {}
        out.family("socialvpn_dashboard_refused", "counter",
                   "requests the dashboard refused, by reason",
                   [({"reason": k}, v) for k, v in sorted(refused.items())])

    def labels(p: dict[str, Any]) -> dict[str, str]:
        return {"group": str(p.get("group") or ""), "jid": str(p.get("jid") or ""),
                "device": str(p.get("device") or ""), "path": str(p.get("path") or "none")}

    states: dict[str, int] = {}
    for p in peers:
        state = str(p.get("state") or p.get("signalling") or "unknown")
        states[state] = states.get(state, 0) + 1
    out.family("socialvpn_peers", "gauge", "member devices of our groups, by link state",
               [({"state": s}, n) for s, n in sorted(states.items())])
    out.family("socialvpn_peer_up", "gauge", "1 while the link to the peer device is up",
               [(labels(p), 1 if p.get("state") == "up" else 0) for p in peers])
    for key, what in (("rx_bytes", "bytes received from"), ("tx_bytes", "bytes sent to"),
                      ("rx_packets", "packets received from"), ("tx_packets", "packets sent to")):
        out.family(f"socialvpn_peer_{key}", "counter", f"{what} the peer device over the link",
                   [(labels(p), p[key]) for p in peers if isinstance(p.get(key), int)])
    out.family("socialvpn_peer_rtt_seconds", "gauge", "round-trip time measured by ICE",
               [(labels(p), float(p["rtt"])) for p in peers
                if isinstance(p.get("rtt"), int | float)])
    out.family("socialvpn_peer_last_handshake_seconds", "gauge",
               "time of the last completed handshake (Unix time)",
               [(labels(p), float(p["last_handshake"])) for p in peers
                if isinstance(p.get("last_handshake"), int | float) and p["last_handshake"]])
    return "\n".join(out.lines) + "\n"
