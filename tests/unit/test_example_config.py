"""The documented example config is a valid config (and documents every key)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from socialvpn.config import Config, parse_config

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "config.example.toml"


def test_example_config_parses() -> None:
    cfg = parse_config(EXAMPLE.read_text(), EXAMPLE)
    assert cfg.account.jid == "alice@example.org"
    assert cfg.ice.turn[0].username == "u"


def test_example_config_mentions_every_key() -> None:
    text = EXAMPLE.read_text()
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        if section.name in ("path", "version"):
            continue
        assert f"[{section.name}]" in text
        for field in dataclasses.fields(hints[section.name]):
            assert f"\n{field.name} = " in text, f"[{section.name}] {field.name} undocumented"
