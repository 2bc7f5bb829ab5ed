"""The dashboard's gatekeeping, without I/O: login tokens, sessions and the request checks.

How a browser gets in: ``socialvpn dashboard`` asks the agent over the Unix socket (only root
or the agent's user get there) for a one-time login token and prints
``http://127.0.0.1:7387/login?token=...``. ``GET /login?token=`` spends the token (single use,
valid for :data:`TOKEN_TTL` seconds) and makes a session with two secrets, random 32 bytes each:

- the session cookie (HttpOnly, SameSite=Strict), set by that response;
- the *origin key*, handed over in the redirect ``Location: /#key=<key>`` (:func:`landing`).
  A URL fragment never goes to a server, nor into ``Referer`` (we also send no-referrer). The
  page's script moves it into ``localStorage`` and wipes the fragment (``history.replaceState``),
  then sends it with every call in the :data:`KEY_HEADER` header.

Why two: cookies are not port-scoped (RFC 6265 §8.5). The browser also sends our cookie to any
other server on 127.0.0.1:<another port>, such as one run by another local user whose page the
person opens; that user then holds the cookie. ``localStorage`` is scoped to the origin
(scheme, host *and port*), so no page of another port can read the key, and a request carries
it only when our own script adds it. A session counts only with the cookie and its own key, so
a stolen cookie alone reads nothing and changes nothing. The sessions live in memory here, so
an agent restart logs everyone out.

What every request on the TCP listener must pass (see :mod:`socialvpn.web.app`):

- ``Host``: its host name must be 127.0.0.1, [::1], localhost or the configured listen host;
  any port (a forwarder may sit in between). This stops DNS rebinding.
- ``Sec-Fetch-Site`` (sent by browsers): API, event stream and metrics refuse ``cross-site``
  and ``same-site`` callers.
- API (``/api/v1/...``, the event stream included) and ``/metrics``: a valid session cookie
  *and* that session's key in :data:`KEY_HEADER` (:meth:`Sessions.admit`), else 401;
  ``/metrics`` also opens to ``Authorization: Bearer`` with the metrics token.
- Mutating requests (POST): ``Origin`` (or, without it, ``Referer``) must be the request's own
  origin, the session cookie and its key must be valid and ``X-CSRF-Token`` must equal the
  session's token. The page gets that token from ``GET /api/v1/session`` (so: cookie and key);
  no page HTML carries a secret.

Tokens, session ids and keys are kept as SHA-256 digests and compared with
:func:`hmac.compare_digest`, so checking them leaks nothing through timing, and a memory dump
shows no usable secret. Time comes in through ``clock``, randomness through ``token``: tests
drive both.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

TOKEN_TTL = 120.0  # a login URL works once, within two minutes
SESSION_TTL = 12 * 3600.0  # then `socialvpn dashboard` again
MAX_TOKENS = 16  # outstanding login tokens (oldest dropped)
MAX_SESSIONS = 64  # live sessions (oldest dropped)
COOKIE_PREFIX = "svpn_session_"
CSRF_HEADER = "X-CSRF-Token"
KEY_HEADER = "X-SVPN-Key"  # the session's origin key, sent by the page's script
KEY_FRAGMENT = "key"  # the landing URL's fragment: /#key=<origin key>
LOOPBACK_NAMES = frozenset({"127.0.0.1", "::1", "localhost"})
WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Session:
    cookie: bytes  # SHA-256 of the cookie value (the session's id)
    origin_key: bytes  # SHA-256 of the origin key
    csrf: str
    created: float
    expires: float


@dataclass(frozen=True)
class Login:
    """A spent login token: what goes to the browser (once) and the session kept here."""

    cookie: str  # for Set-Cookie
    key: str  # the origin key, for the landing URL's fragment only
    session: Session


class Sessions:
    """One-time login tokens and the sessions they become."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 token: Callable[[int], str] = secrets.token_urlsafe) -> None:
        self._clock = clock
        self._token = token
        self._tokens: dict[bytes, float] = {}  # digest -> expiry
        self._sessions: dict[bytes, Session] = {}

    def issue_token(self) -> str:
        now = self._clock()
        self._expire(now)
        while len(self._tokens) >= MAX_TOKENS:
            self._tokens.pop(next(iter(self._tokens)))
        token = self._token(32)
        self._tokens[_digest(token)] = now + TOKEN_TTL
        return token

    def redeem(self, token: str) -> Login | None:
        """Spend a login token: a new session with its cookie and origin key, or None."""
        now = self._clock()
        self._expire(now)
        expiry = self._tokens.pop(_digest(token), None)
        if expiry is None or expiry <= now:
            return None
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        cookie, key = self._token(32), self._token(32)
        session = Session(_digest(cookie), _digest(key), self._token(32), now,
                          now + SESSION_TTL)
        self._sessions[session.cookie] = session
        return Login(cookie, key, session)

    def get(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        session = self._sessions.get(_digest(cookie))
        if session is None:
            return None
        if session.expires <= self._clock():
            del self._sessions[session.cookie]
            return None
        return session

    def admit(self, cookie: str | None, key: str | None) -> tuple[Session | None, str]:
        """(session, "") when the cookie names a live session and ``key`` is its origin key;
        else (None, why): "session" (no such session) or "key" (key missing or not its)."""
        session = self.get(cookie)
        if session is None:
            return None, "session"
        if not key_ok(session, key):
            return None, "key"
        return session, ""

    def end(self, cookie: str | None) -> None:
        if cookie:
            self._sessions.pop(_digest(cookie), None)

    def _expire(self, now: float) -> None:
        for key in [k for k, exp in self._tokens.items() if exp <= now]:
            del self._tokens[key]
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]

    @property
    def counts(self) -> tuple[int, int]:
        """(outstanding tokens, live sessions)."""
        self._expire(self._clock())
        return len(self._tokens), len(self._sessions)


def key_ok(session: Session, key: str | None) -> bool:
    """The origin key against the session's digest (compared digest to digest)."""
    if not key:
        return False
    return hmac.compare_digest(session.origin_key, _digest(key))


def landing(key: str) -> str:
    """Where a spent login token sends the browser: the key travels in the fragment only."""
    return f"/#{KEY_FRAGMENT}={key}"


def csrf_ok(session: Session, header: str | None) -> bool:
    if not header:
        return False
    return hmac.compare_digest(session.csrf.encode(), header.encode("utf-8", "surrogatepass"))


def bearer_ok(expected: str | None, header: str | None) -> bool:
    """``Authorization: Bearer <token>`` against the metrics token file's content."""
    if not expected or not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(expected.encode(), header[7:].strip().encode("utf-8",
                                                                            "surrogatepass"))


def split_host(host: str) -> tuple[str, str] | None:
    """``Host`` header → (host name, port text); None when it is not a host[:port]."""
    host = host.strip()
    if not host or any(c.isspace() or c in "/\\@?#" for c in host):
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[1:end], host[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        port = rest[1:]
    elif host.count(":") > 1:
        return None  # a bare IPv6 address must be bracketed in Host
    else:
        name, _, port = host.partition(":")
    if port and not (port.isascii() and port.isdigit() and len(port) <= 5):
        return None
    return name.lower(), port


def allowed_hosts(listen_host: str) -> frozenset[str]:
    host = listen_host.strip("[]").lower()
    if host in WILDCARDS:
        return LOOPBACK_NAMES
    return LOOPBACK_NAMES | {host}


def host_ok(host_header: str | None, allowed: frozenset[str]) -> bool:
    if host_header is None:
        return False
    parts = split_host(host_header)
    return parts is not None and parts[0] in allowed


def origin_ok(origin: str | None, referer: str | None, host_header: str) -> bool:
    """A mutating request must come from a page of this very origin (scheme + Host)."""
    own = f"http://{host_header.strip().lower()}"
    if origin is not None:
        return origin.strip().lower() == own
    if referer:
        try:
            parts = urlsplit(referer.strip())
        except ValueError:
            return False
        return f"{parts.scheme}://{parts.netloc}".lower() == own
    return False


def fetch_site_ok(sec_fetch_site: str | None) -> bool:
    """Browsers say where a request comes from; a script on another site may not call us."""
    return sec_fetch_site is None or sec_fetch_site.lower() in ("same-origin", "none")


def login_url(listen_host: str, port: int, token: str) -> str:
    host = listen_host.strip("[]")
    if host in WILDCARDS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/login?token={token}"
