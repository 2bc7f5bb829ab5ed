// SocialVPN dashboard: vanilla JS, no build step, nothing from the network.
// Data comes from the local API (/api/v1/...) the CLI uses; live updates from the
// server-sent event stream on /api/v1/events. Everything shown is set with textContent.
//
// Every request carries the session's origin key (X-SVPN-Key) next to the cookie: the login
// link lands on /#key=<key>; we keep the key in localStorage (readable by this origin only:
// scheme, host and port) and wipe it from the address bar. The cookie alone opens nothing
// (another local user's server on another port of 127.0.0.1 gets the cookie too). The CSRF
// token comes from GET /api/v1/session; the page's HTML carries no secret. The live stream is
// read with fetch(), since EventSource cannot send the key in a header.
"use strict";

const KEY_STORE = "svpn-key";
const KEY_HEADER = "X-SVPN-Key";
(function takeKey() {  // before anything reads location.hash as a page name
  const m = /^#key=([A-Za-z0-9_-]{16,256})$/.exec(location.hash);
  if (!m) return;
  try { localStorage.setItem(KEY_STORE, m[1]); } catch (e) { /* storage off: login fails */ }
  history.replaceState(null, "", location.pathname + location.search);
})();

function key() {
  try { return localStorage.getItem(KEY_STORE) || ""; } catch (e) { return ""; }
}

let leaving = false;
function toLogin() {  // not (or no longer) logged in in this browser: say so on the login page
  if (leaving) return;
  leaving = true;
  location.assign("/login?again");
}

let CSRF = null;  // from GET /api/v1/session, before the first change
const PAGES = ["overview", "friends", "groups", "peers", "events"];
const state = { status: null, friends: [], requests: null, groups: [], details: {},
                peers: [], events: [], dashboard: null };
const rendered = {};  // region id -> JSON last drawn there (skip redraws that change nothing)
const marked = {};  // regions drawn at least once

// --- small helpers ----------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Math.round(Date.now() / 1000 - ts));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min ago";
}

function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}

let flashTimer = null;
function flash(text, error) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.classList.toggle("error", !!error);
  clearTimeout(flashTimer);
  if (text && !error) flashTimer = setTimeout(() => { el.textContent = ""; }, 10000);
}

function dl(id, pairs) {
  const el = document.getElementById(id);
  el.replaceChildren(...pairs.flatMap(([k, v, cls]) =>
    [h("dt", { text: k }), h("dd", { class: cls || null, text: v === null || v === undefined || v === "" ? "–" : v })]));
}

function table(label, headers, rows, attrs) {
  if (!rows.length) return h("p", { class: "empty", text: "None." });
  return h("div", { class: "table-wrap", role: "region", "aria-label": label, tabindex: 0 },
    h("table", attrs || {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, rows.map((r) => {
        const tr = h("tr", r.attrs || {});
        r.cells.forEach((c, i) => {
          const td = c instanceof Node ? h("td", {}, c) : h("td", { text: c === null || c === undefined ? "–" : c });
          td.dataset.label = headers[i];
          if (r.classes && r.classes[i]) td.className = r.classes[i];
          if (r.fields && r.fields[i]) td.dataset.field = r.fields[i];
          if (r.values && typeof r.values[i] === "number") td.dataset.value = String(r.values[i]);
          tr.append(td);
        });
        return tr;
      }))));
}

// Redraw region `id` only when its data changed: forms keep their input, buttons their focus.
function region(id, data, draw) {
  const key = JSON.stringify(data);
  if (rendered[id] === key) return;
  rendered[id] = key;
  const el = document.getElementById(id);
  const focused = el.contains(document.activeElement) ? document.activeElement.id : null;
  el.replaceChildren(...[].concat(draw()));
  if (!marked[id] && !(Array.isArray(data) && !data.length)) {  // first real draw (bench)
    marked[id] = true;
    performance.mark("svpn:" + id);
  }
  if (focused) { const again = document.getElementById(focused); if (again) again.focus(); }
}

// --- the API ------------------------------------------------------------------------------

async function csrf() {
  if (!CSRF) {
    const s = await api("GET", "session");
    if (!s || !s.csrf) throw new Error("no session");
    CSRF = s.csrf;
  }
  return CSRF;
}

async function api(method, path, body) {
  const opts = { method, credentials: "same-origin", cache: "no-store",
                 headers: { Accept: "application/json", [KEY_HEADER]: key() } };
  if (method !== "GET") {
    opts.headers["Content-Type"] = "application/json";
    opts.headers["X-CSRF-Token"] = await csrf();
    opts.body = JSON.stringify(body || {});
  }
  const r = await fetch(path.startsWith("/") ? path : "/api/v1/" + path, opts);
  if (r.status === 401) { toLogin(); throw new Error("logged out"); }
  let data;
  try { data = await r.json(); } catch (e) { data = { error: "HTTP " + r.status }; }
  if (!r.ok || data.error) throw new Error(data.error || "HTTP " + r.status);
  return data.result;
}

async function act(button, method, path, body, done) {
  if (button) button.disabled = true;
  try {
    const result = await api(method, path, body);
    flash((result && result.result) || done || "Done.");
    return result;
  } catch (e) {
    flash(e.message, true);
    return null;
  } finally {
    if (button) button.disabled = false;
  }
}

async function load(what) {
  try {
    if (what === "friends") {
      [state.friends, state.requests] = await Promise.all([api("GET", "friends"), api("GET", "requests")]);
    } else if (what === "groups") {
      state.groups = await api("GET", "groups");
      const shown = await Promise.all(state.groups.map((g) =>
        api("GET", "groups/" + encodeURIComponent(g.name)).catch(() => null)));
      state.details = {};
      shown.forEach((d) => { if (d) state.details[d.name] = d; });
    } else if (what === "dashboard") {
      state.dashboard = await api("GET", "dashboard");
    } else {
      state[what] = await api("GET", what);
    }
  } catch (e) {
    flash("Could not load " + what + ": " + e.message, true);
  }
  draw();
}

let pending = {};
function reload(what) {  // coalesce bursts of events into one fetch per kind
  if (pending[what]) return;
  pending[what] = setTimeout(() => { pending[what] = null; load(what); }, 150);
}

// --- pages --------------------------------------------------------------------------------

function drawHeader() {
  const st = state.status;
  const conn = document.getElementById("conn");
  if (!st) return;
  const x = st.xmpp;
  conn.textContent = "XMPP " + x.state + (x.state === "connected" ? "" : " – " + x.reason);
  conn.className = "badge " + (x.state === "connected" ? "ok" : x.state === "offline" ? "bad" : "");
  const r = state.requests;
  const n = r ? r.friends.length + r.joins.length + r.invitations.length : 0;
  document.getElementById("req-count").textContent = n ? String(n) : "";
}

function drawOverview() {
  const st = state.status;
  if (!st) return;
  const x = st.xmpp;
  dl("ov-xmpp", [["State", x.state], ["Reason", x.reason], ["Account", st.account],
    ["Signed in as", x.jid], ["Server", x.server], ["TLS", x.tls],
    ["Next attempt", x.next_attempt_in !== null && x.state !== "connected" ? x.next_attempt_in + " s" : null]]);
  dl("ov-device", [["Name", st.device.name], ["Device id", st.device.id, "mono"],
    ["Fingerprint", st.device.fingerprint, "mono fp"], ["Agent", st.agent.state + ", version " + st.agent.version],
    ["Up since", clock(st.agent.started_at)]]);
  region("ov-groups", st.groups, () => table("Own addresses", ["Group", "Role", "IPv4", "IPv6"],
    st.groups.map((g) => ({ cells: [g.name, g.role, g.ip4, g.ip6], classes: [null, null, "mono", "mono"] }))));
  const peers = state.peers;
  const up = peers.filter((p) => p.state === "up");
  const types = {};
  up.forEach((p) => { const t = p.local_candidate_type || "?"; types[t] = (types[t] || 0) + 1; });
  const relayed = up.filter((p) => p.path === "turn").length;
  const nat = { peers: peers.length, up: up.length, relayed, types };
  region("ov-nat", nat, () => {
    if (!peers.length) return h("p", { class: "empty", text: "No peers yet: join or create a group." });
    const items = [h("li", { text: up.length + " of " + peers.length + " links up" }),
      h("li", { text: (up.length - relayed) + " direct, " + relayed + " relayed by TURN" })];
    for (const [t, n] of Object.entries(types)) {
      items.push(h("li", { text: n + " via our " + t + " candidate" +
        (t === "srflx" ? " (STUN: we are behind NAT and the mapping works)" :
         t === "relay" ? " (TURN relay: NAT too strict for a direct path)" :
         t === "host" ? " (our own address, no NAT in between)" : "") }));
    }
    return h("ul", {}, items);
  });
  const counters = Object.entries(st.counters || {}).flatMap(([name, by]) =>
    Object.entries(by).map(([label, n]) => [name + (label ? " (" + label + ")" : ""), n]));
  const d = state.dashboard;
  if (d) {
    Object.entries(d.refused || {}).forEach(([k, n]) => counters.push(["dashboard refused (" + k + ")", n]));
  }
  region("ov-counters", counters, () => counters.length
    ? h("dl", {}, counters.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]))
    : h("p", { class: "empty", text: "Nothing dropped." }));
}

function decideButtons(label, body) {
  return h("div", { class: "actions" },
    h("button", { type: "button", "aria-label": "Accept " + label,
      onclick: (e) => act(e.currentTarget, "POST", "requests", { op: "accept", ...body }).then(() => { reload("friends"); reload("groups"); }) }, "Accept"),
    h("button", { type: "button", class: "danger", "aria-label": "Reject " + label,
      onclick: (e) => act(e.currentTarget, "POST", "requests", { op: "reject", ...body }).then(() => reload("friends")) }, "Reject"));
}

function drawFriends() {
  const r = state.requests;
  if (r) {
    region("requests", r, () => {
      const rows = [];
      r.friends.forEach((q) => rows.push({ attrs: { "data-request": q.jid },
        cells: ["friend request", q.jid, "–", ago(q.received_at), decideButtons("friend request from " + q.jid, { jid: q.jid })] }));
      r.joins.forEach((q) => rows.push({ attrs: { "data-request": q.jid },
        cells: ["join " + q.group, q.jid, "device " + q.device, ago(q.received_at),
          decideButtons(q.jid + " joining " + q.group, { jid: q.jid, group: q.group })] }));
      r.invitations.forEach((q) => rows.push({ attrs: { "data-request": q.jid },
        cells: ["invitation to " + q.group, q.jid, "owner key " + q.owner_key_fingerprint, ago(q.received_at),
          decideButtons("invitation to " + q.group + " from " + q.jid, { jid: q.jid, group: q.group })] }));
      return table("Requests", ["Kind", "From", "Details", "Received", "Decide"], rows);
    });
  }
  region("friends", state.friends, () => table("Friends", ["XMPP address", "Subscription", "Online", "Devices", ""],
    state.friends.map((f) => ({ attrs: { "data-friend": f.jid }, cells: [
      f.jid,
      f.subscription + (f.request_sent ? " (request sent)" : "") + (f.request_received ? " (asks you)" : ""),
      f.online ? "online" : "offline",
      f.devices.map((d) => d.name).join(", ") || "–",
      h("button", { type: "button", class: "danger", "aria-label": "Remove friend " + f.jid,
        onclick: (e) => { if (confirm("Remove " + f.jid + " from your friends?")) act(e.currentTarget, "POST", "friends", { op: "remove", jid: f.jid }).then(() => reload("friends")); } }, "Remove"),
    ] }))));
  region("friend-list", state.friends.map((f) => f.jid), () => state.friends.map((f) => h("option", { value: f.jid })));
}

function drawGroups() {
  const own = state.status ? state.status.account : null;
  region("groups", [state.groups, state.details, own], () => {
    if (!state.groups.length) return h("p", { class: "empty", text: "You are in no group yet." });
    return state.groups.map((g, gi) => {
      const d = state.details[g.name];
      const owner = g.role === "owner";
      const rows = [];
      (d ? d.member_list : []).forEach((m) => m.devices.forEach((dev) => rows.push({
        attrs: { "data-member": m.jid + "/" + dev.name },
        cells: [m.jid, dev.name, dev.ip4, dev.ip6, dev.online === null ? "unknown" : dev.online ? "online" : "offline",
          owner && m.jid !== own ? h("button", { type: "button", class: "danger", "aria-label": "Remove " + m.jid + " from " + g.name,
            onclick: (e) => { if (confirm("Remove " + m.jid + " from " + g.name + "?")) act(e.currentTarget, "POST", "groups", { op: "remove", name: g.name, jid: m.jid }).then(() => reload("groups")); } }, "Remove") : ""],
        classes: [null, null, "mono", "mono", null, null] })));
      const inviteId = "invite-" + gi;
      const parts = [
        h("h3", { text: g.name + " (" + g.role + ")" }),
        h("dl", {},
          h("dt", { text: "Owner" }), h("dd", { text: g.owner }),
          h("dt", { text: "Owner key fingerprint" }), h("dd", { class: "mono fp", text: g.owner_key_fingerprint }),
          h("dt", { text: "Subnets" }), h("dd", { class: "mono", text: g.subnet4 + "  " + g.prefix6 }),
          h("dt", { text: "My addresses" }), h("dd", { class: "mono", text: (g.ip4 || "–") + "  " + (g.ip6 || "–") }),
          h("dt", { text: "Epoch" }), h("dd", { text: String(g.epoch) })),
        h("p", { class: "hint", text: "Compare the owner key fingerprint with the owner by another channel." }),
        table("Members of " + g.name, ["Member", "Device", "IPv4", "IPv6", "Presence", ""], rows),
      ];
      const joins = d && d.join_requests ? d.join_requests : [];
      if (owner && joins.length) {
        parts.push(h("h4", { text: "Asking to join" }), table("Join requests for " + g.name,
          ["From", "Device", "Received", "Decide"],
          joins.map((j) => ({ attrs: { "data-join": j.jid }, cells: [j.jid, j.device ? j.device.name : "–",
            ago(j.received_at), decideButtons(j.jid + " joining " + g.name, { jid: j.jid, group: g.name })] }))));
      }
      if (owner) {
        parts.push(h("form", { class: "inline", autocomplete: "off", "data-invite": g.name,
          onsubmit: (e) => {
            e.preventDefault();
            const input = e.currentTarget.elements.jid;
            act(e.currentTarget.querySelector("button"), "POST", "groups", { op: "invite", name: g.name, jid: input.value })
              .then((r) => { if (r) input.value = ""; reload("groups"); });
          } },
          h("label", { for: inviteId, text: "Invite a friend to " + g.name }),
          h("input", { id: inviteId, name: "jid", type: "text", required: true, list: "friend-list",
                       spellcheck: "false", placeholder: "bob@example.org" }),
          h("button", { type: "submit" }, "Invite")));
      } else {
        parts.push(h("button", { type: "button", class: "danger",
          onclick: (e) => { if (confirm("Leave " + g.name + "?")) act(e.currentTarget, "POST", "groups", { op: "leave", name: g.name }).then(() => reload("groups")); } },
          "Leave " + g.name));
      }
      return h("article", { class: "group", "data-group": g.name }, parts);
    });
  });
}

function drawPeers() {
  region("peers", state.peers, () => table("Peers", ["Group", "Friend", "Device", "Addresses", "State", "Path", "Endpoint",
    "RTT", "Last handshake", "Received", "Sent", "Fingerprint"],
    state.peers.map((p) => ({
      attrs: { "data-peer": p.device, "data-group": p.group },
      cells: [p.group, p.jid, p.device, (p.ip4 || "") + " " + (p.ip6 || ""),
        (p.state || p.signalling) + (p.failure ? " – " + p.failure : p.reason && p.state !== "up" ? " – " + p.reason : ""),
        p.path ? p.path + " (" + (p.local_candidate_type || "?") + " → " + (p.remote_candidate_type || "?") + ")" : "–",
        p.endpoint, typeof p.rtt === "number" ? (p.rtt * 1000).toFixed(1) + " ms" : "–",
        ago(p.last_handshake), bytes(p.rx_bytes), bytes(p.tx_bytes), p.fingerprint],
      classes: [null, null, null, "mono", p.state === "up" ? "state-up" : "state-down", null, "mono", "num", null, "num", "num", "mono fp"],
      fields: [null, null, null, null, "state", "path", "endpoint", "rtt", "handshake", "rx", "tx", "fingerprint"],
      values: [null, null, null, null, null, null, null, p.rtt, p.last_handshake, p.rx_bytes, p.tx_bytes, null],
    })), { "aria-describedby": "h-peers" }));
}

function drawEvents() {
  region("events", state.events.length ? state.events[state.events.length - 1].seq : 0, () =>
    state.events.slice().reverse().map((e) => h("li", {},
      h("time", { datetime: new Date(e.at * 1000).toISOString(), text: clock(e.at) }),
      h("strong", { text: e.kind }),
      h("span", { class: "mono", text: Object.entries(e.data).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(" ") }))));
}

function current() {
  const page = location.hash.replace(/^#/, "");
  return PAGES.includes(page) ? page : "overview";
}

function draw() {
  drawHeader();
  const page = current();
  if (page === "overview") drawOverview();
  else if (page === "friends") drawFriends();
  else if (page === "groups") { drawGroups(); drawFriends(); }
  else if (page === "peers") drawPeers();
  else if (page === "events") drawEvents();
}

function show() {
  const page = current();
  for (const p of PAGES) document.getElementById("page-" + p).hidden = p !== page;
  document.querySelectorAll("[data-nav]").forEach((a) => {
    if (a.dataset.nav === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  document.title = "SocialVPN – " + page;
  if (page === "friends" || page === "groups") load("friends");
  if (page === "groups") load("groups");
  if (page === "overview") load("dashboard");
  draw();
}

// --- live updates -------------------------------------------------------------------------

const handlers = {
  status: (data) => { state.status = data; draw(); },
  peers: (data) => { state.peers = data; draw(); },
  agent: (ev) => {
    state.events.push(ev);
    if (state.events.length > 200) state.events.splice(0, state.events.length - 200);
    if (/^(friends|presence|request)\./.test(ev.kind)) reload("friends");
    if (/^(group|request)\./.test(ev.kind)) reload("groups");
    draw();
  },
  logout: () => toLogin(),
};

// One server-sent-events stream read with fetch (text/event-stream framing: "field: value"
// lines, a blank line ends an event). Resolves when the server ends the stream.
async function readStream(body, live) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", event = "message", data = [];
  for (;;) {
    const { value: chunk, done } = await reader.read();
    if (done) return;
    buffer += chunk;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (line === "") {
        if (data.length && Object.hasOwn(handlers, event)) handlers[event](JSON.parse(data.join("\n")));
        event = "message";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;  // keepalive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
      else if (field === "id") live.lastId = value;
      else if (field === "retry" && /^[0-9]+$/.test(value)) live.retry = Number(value);
    }
  }
}

async function connect() {
  const live = { lastId: null, retry: 2000 };
  const stop = new AbortController();
  window.addEventListener("pagehide", () => stop.abort());
  for (let failures = 0; !leaving && !stop.signal.aborted;) {
    try {
      const headers = { Accept: "text/event-stream", [KEY_HEADER]: key() };
      if (live.lastId !== null) headers["Last-Event-ID"] = live.lastId;
      const r = await fetch("/api/v1/events", { headers, credentials: "same-origin",
                                                 cache: "no-store", signal: stop.signal });
      if (r.status === 401) { toLogin(); return; }
      if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
      failures = 0;
      if (document.getElementById("flash").dataset.live) {
        delete document.getElementById("flash").dataset.live;
        flash("");
      }
      await readStream(r.body, live);
    } catch (e) {
      if (stop.signal.aborted || leaving) return;
      failures++;
    }
    if (leaving) return;
    const f = document.getElementById("flash");
    f.dataset.live = "1";
    flash("Live updates interrupted; reconnecting…", true);
    // the server's retry hint, longer while it keeps failing (at most 30 s)
    await new Promise((done) => setTimeout(done, Math.min(30000, live.retry * 2 ** Math.min(failures, 4))));
  }
}

function setup() {
  document.getElementById("form-friend-add").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = e.currentTarget.elements.jid;
    act(e.currentTarget.querySelector("button"), "POST", "friends", { op: "add", jid: input.value })
      .then((r) => { if (r) input.value = ""; reload("friends"); });
  });
  document.getElementById("form-group-create").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = e.currentTarget.elements;
    const body = { op: "create", name: f.name.value };
    if (f.subnet.value.trim()) body.subnet = f.subnet.value;
    act(e.currentTarget.querySelector("button"), "POST", "groups", body, "Group created.")
      .then((r) => { if (r) { f.name.value = ""; f.subnet.value = ""; } reload("groups"); });
  });
  document.getElementById("form-group-join").addEventListener("submit", (e) => {
    e.preventDefault();
    const f = e.currentTarget.elements;
    act(e.currentTarget.querySelector("button"), "POST", "groups", { op: "join", jid: f.jid.value, name: f.name.value })
      .then(() => reload("groups"));
  });
  document.getElementById("logout").addEventListener("click", (e) => {
    act(e.currentTarget, "POST", "/logout", {}).finally(() => {
      try { localStorage.removeItem(KEY_STORE); } catch (err) { /* nothing to remove */ }
      leaving = true;
      location.assign("/login");
    });
  });
  window.addEventListener("hashchange", () => { show(); document.getElementById("main").focus(); });
  setInterval(() => {  // "x s ago" grows older
    if (current() === "peers") { delete rendered.peers; drawPeers(); }
  }, 5000);
  if (!key()) { toLogin(); return; }  // opened without the login link's key: nothing to show
  show();
  csrf().catch(() => {});  // early, so the first click does not wait for it
  connect();  // the stream sends status and peers at once; fetch them only if it does not
  setTimeout(() => { if (!state.status) { load("status"); load("peers"); } }, 2000);
}

setup();
