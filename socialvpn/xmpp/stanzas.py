"""Our stanza classes in ``urn:xmpp:socialvpn:0`` and their hard limits.

Declarative: each element is a slixmpp ``ElementBase`` with its interfaces, and each has a
parser that turns the raw XML into a plain dataclass or raises :class:`ProtocolError` with a
counter reason (``oversize``, ``malformed``, ``version``, ``unknown``). Nothing else escapes a
parser: the caller drops the stanza and counts the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from slixmpp.stanza import Presence
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from ..errors import ProtocolError
from ..keys import device_id_of, unb64_key

NS = "urn:xmpp:socialvpn:0"
PROTOCOL_VERSION = "0"

# Hard limits on anything a peer or the server sends us in our namespace.
MAX_ELEMENT_BYTES = 1024  # a <device/> element, serialised
MAX_IQ_PAYLOAD_BYTES = 64 * 1024  # later: membership documents, candidate lists
MAX_NAME_CHARS = 64
MAX_ATTR_CHARS = 256

_DEVICE_ID_RE = re.compile(r"[a-z2-7]{16}")
_PRINTABLE_RE = re.compile(r"[^\x00-\x1f\x7f]*")


class DeviceElement(ElementBase):
    """``<device xmlns='urn:xmpp:socialvpn:0' id= name= key= sign= ver='0'/>`` in presence."""

    name = "device"
    namespace = NS
    plugin_attrib = "svpn_device"
    interfaces = {"id", "name", "key", "sign", "ver"}


def register_stanzas() -> None:
    register_stanza_plugin(Presence, DeviceElement)


@dataclass(frozen=True)
class DeviceInfo:
    """A device as announced in presence. The keys are hints until a signed document says so."""

    id: str
    name: str
    key: str  # X25519 public key, base64
    sign: str  # Ed25519 public key, base64

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "key": self.key, "sign": self.sign}


def ours(xml: ET.Element) -> list[ET.Element]:
    """The direct children of a stanza that are in our namespace."""
    prefix = "{" + NS + "}"
    return [child for child in xml if isinstance(child.tag, str) and child.tag.startswith(prefix)]


def serialized_size(xml: ET.Element) -> int:
    return len(ET.tostring(xml, encoding="utf-8"))


def _attr(xml: ET.Element, name: str, limit: int = MAX_ATTR_CHARS) -> str:
    value = xml.get(name)
    if value is None:
        raise ProtocolError(f"<{_local(xml.tag)}/> lacks attribute {name!r}", "malformed")
    if len(value) > limit:
        raise ProtocolError(f"attribute {name!r} longer than {limit}", "oversize")
    if not _PRINTABLE_RE.fullmatch(value):
        raise ProtocolError(f"attribute {name!r} has control characters", "malformed")
    return value


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def check_version(xml: ET.Element) -> None:
    ver = _attr(xml, "ver", 8)
    if ver != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown protocol version {ver!r}", "version")


def parse_device(xml: ET.Element) -> DeviceInfo:
    """Validate a ``<device/>`` element. Raises ProtocolError, nothing else."""
    if _local(xml.tag) != "device":
        raise ProtocolError(f"unexpected element <{_local(xml.tag)}/>", "unknown")
    if serialized_size(xml) > MAX_ELEMENT_BYTES:
        raise ProtocolError("device element too large", "oversize")
    check_version(xml)
    if len(xml) or (xml.text or "").strip():
        raise ProtocolError("device element must be empty", "malformed")
    dev_id = _attr(xml, "id", 16)
    name = _attr(xml, "name", MAX_NAME_CHARS)
    key = _attr(xml, "key", 44)
    sign = _attr(xml, "sign", 44)
    if not _DEVICE_ID_RE.fullmatch(dev_id):
        raise ProtocolError("device id is not 16 base32 characters", "malformed")
    if not name.strip():
        raise ProtocolError("empty device name", "malformed")
    try:
        raw_key = unb64_key(key)
        unb64_key(sign)
    except ValueError as exc:
        raise ProtocolError(f"bad key: {exc}", "malformed") from None
    if device_id_of(raw_key) != dev_id:
        raise ProtocolError("device id does not match its key", "malformed")
    return DeviceInfo(dev_id, name, key, sign)


def make_device(info: DeviceInfo) -> DeviceElement:
    el = DeviceElement()
    el["id"] = info.id
    el["name"] = info.name
    el["key"] = info.key
    el["sign"] = info.sign
    el["ver"] = PROTOCOL_VERSION
    return el


def parse_iq_payload(xml: ET.Element, known: frozenset[str]) -> tuple[str, ET.Element]:
    """Check an IQ payload in our namespace: size, version and a known operation name."""
    if serialized_size(xml) > MAX_IQ_PAYLOAD_BYTES:
        raise ProtocolError("payload too large", "oversize")
    check_version(xml)  # a message of another version cannot be read any further
    op = _local(xml.tag)
    if op not in known:
        raise ProtocolError(f"unknown operation <{op}/>", "unknown")
    return op, xml
