"""The exception types of the project.

Every parser of peer input raises exactly one type, :class:`ProtocolError`; callers drop the
input and count it under ``reason``. Operator mistakes raise :class:`ConfigError` or
:class:`StateError`, whose message is one line meant for a person.
"""

from __future__ import annotations


class SocialVPNError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(SocialVPNError):
    """The configuration is unusable. The message names the file and the key."""


class StateError(SocialVPNError):
    """The state directory or a file in it is missing, unreadable or corrupt."""


class ProtocolError(SocialVPNError):
    """A peer (or the server) sent something we do not accept.

    ``reason`` is a short stable token used as a counter label (``malformed``, ``oversize``,
    ``version``, ``auth``, ``replay``...).
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class APIError(SocialVPNError):
    """A local API call failed; ``status`` is the HTTP status the API answered with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class AgentNotRunning(SocialVPNError):
    """The CLI could not reach the local API socket."""
