"""Can this machine run the integration test bed, and must it?

Pure functions (no pytest), so fixtures and the demo script share them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable

BED_TOOLS: tuple[str, ...] = ("prosody", "prosodyctl", "ip", "nft")
"""Programs every integration test may use (Debian packages prosody, iproute2, nftables)."""

REQUIRE_ENV = "SOCIALVPN_REQUIRE_INTEGRATION"


def integration_required() -> bool:
    """True when missing prerequisites must fail the run instead of skipping it
    (``CI=true`` or ``SOCIALVPN_REQUIRE_INTEGRATION=1``)."""
    return (
        os.environ.get("CI", "").strip().lower() == "true"
        or os.environ.get(REQUIRE_ENV, "").strip() == "1"
    )


def integration_unavailable_reason(tools: Iterable[str] = BED_TOOLS) -> str | None:
    """Why integration tests cannot run here, or None when they can."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("not running as root (network namespaces and Prosody need root)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        problems.append(
            "missing programs: " + ", ".join(missing) + " (Debian packages prosody, iproute2, "
            "nftables)"
        )
    return "; ".join(problems) or None
