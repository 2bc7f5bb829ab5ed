"""Our stanza classes in ``urn:xmpp:socialvpn:0`` and their hard limits.

Declarative: each element is a slixmpp ``ElementBase`` with its interfaces, and each has a
parser that turns the raw XML into a plain dataclass or raises :class:`ProtocolError` with a
counter reason (``oversize``, ``malformed``, ``version``, ``unknown``). Nothing else escapes a
parser: the caller drops the stanza and counts the reason.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from slixmpp.stanza import Presence
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from ..errors import ProtocolError
from ..groups import validate_group_name
from ..keys import device_id_of, unb64_key
from .signal import MAX_FEATURE_CHARS, MAX_FEATURES, Kind, LinkMessage, validate

NS = "urn:xmpp:socialvpn:0"
PROTOCOL_VERSION = "0"

# Hard limits on anything a peer or the server sends us in our namespace.
MAX_ELEMENT_BYTES = 1024  # a <device/> element, serialised
MAX_IQ_PAYLOAD_BYTES = 96 * 1024  # a membership document (60 KB) in base64, with room
MAX_NAME_CHARS = 64
MAX_ATTR_CHARS = 256
MAX_FEATURES_CHARS = MAX_FEATURES * (MAX_FEATURE_CHARS + 1) - 1  # the tokens, space-separated

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


# --- group operations (IQ payloads) ----------------------------------------------------------

GROUP_OPS = frozenset({"join", "invite", "membership", "leave", "link"})
_GID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class JoinRequest:
    """A device asks the owner to let it into a group (``gid`` set: answering an invitation)."""

    group: str
    gid: str
    device: DeviceInfo


@dataclass(frozen=True)
class Invitation:
    gid: str
    name: str
    owner_sign_key: str
    owner_device: str


@dataclass(frozen=True)
class MembershipPush:
    document: bytes  # a signed membership document, as groups.SignedDocument.to_wire()


@dataclass(frozen=True)
class MembershipFetch:
    gid: str


@dataclass(frozen=True)
class Leave:
    gid: str


@dataclass(frozen=True)
class LinkSignal:
    """Link signalling between two members, for the links of group ``gid``."""

    gid: str
    msg: LinkMessage


GroupOp = JoinRequest | Invitation | MembershipPush | MembershipFetch | Leave | LinkSignal


def _gid(xml: ET.Element, required: bool = True) -> str:
    value = xml.get("gid", "")
    if not value and not required:
        return ""
    if not _GID_RE.fullmatch(value):
        raise ProtocolError("gid is not 32 lowercase hex digits", "malformed")
    return value


def _group_name(value: str) -> str:
    try:
        return validate_group_name(value)
    except ValueError:
        raise ProtocolError("bad group name", "malformed") from None


def parse_group_op(xml: ET.Element, iq_type: str) -> GroupOp:
    """An IQ payload in our namespace (already size- and version-checked) → a GroupOp."""
    op = _local(xml.tag)
    if op == "membership":
        if iq_type == "get":
            return MembershipFetch(_gid(xml))
        text = (xml.text or "").strip()
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("membership document is not base64", "malformed") from None
        if not raw:
            raise ProtocolError("empty membership document", "malformed")
        return MembershipPush(raw)
    if iq_type != "set":
        raise ProtocolError(f"<{op}/> must be sent with type 'set'", "malformed")
    if op == "join":
        devices = [c for c in xml if _local(c.tag) == "device"]
        if len(devices) != 1 or len(xml) != 1:
            raise ProtocolError("join carries exactly one <device/>", "malformed")
        return JoinRequest(_group_name(_attr(xml, "group", 16)), _gid(xml, required=False),
                           parse_device(devices[0]))
    if op == "invite":
        try:
            unb64_key(_attr(xml, "owner-key", 44))
        except ValueError:
            raise ProtocolError("bad owner key", "malformed") from None
        owner = _attr(xml, "owner-device", 16)
        if not _DEVICE_ID_RE.fullmatch(owner):
            raise ProtocolError("bad owner device id", "malformed")
        return Invitation(_gid(xml), _group_name(_attr(xml, "name", 16)), xml.get("owner-key", ""),
                          owner)
    if op == "leave":
        return Leave(_gid(xml))
    if op == "link":
        return LinkSignal(_gid(xml), _parse_link(xml))
    raise ProtocolError(f"unknown operation <{op}/>", "unknown")


def _parse_link(xml: ET.Element) -> LinkMessage:
    """``<link sid seq kind [ufrag pwd end reason features]><candidate>...</candidate>*</link>``.
    Keys never travel here: they come from signed membership documents only.

    ``features`` (offer/answer) is a space-separated list of feature tokens
    (``features="csum-partial"``). An attribute, not a child element: older builds ignore
    attributes they do not know but refuse unknown children, so they still read our offers;
    a peer that sends none has none."""
    try:
        kind = Kind(_attr(xml, "kind", 16))
    except ValueError:
        raise ProtocolError("unknown link message kind", "malformed") from None
    seq_text = _attr(xml, "seq", 10)
    if not seq_text.isascii() or not seq_text.isdigit():
        raise ProtocolError("seq is not a number", "malformed")
    candidates = []
    for child in xml:
        if _local(child.tag) != "candidate" or len(child) or child.attrib:
            raise ProtocolError("unexpected element in <link/>", "malformed")
        candidates.append((child.text or "").strip())
    if (xml.text or "").strip():
        raise ProtocolError("text in <link/>", "malformed")
    features: tuple[str, ...] = ()
    if xml.get("features") is not None:
        text = _attr(xml, "features", MAX_FEATURES_CHARS)
        features = tuple(text.split(" ")) if text else ()
    return validate(LinkMessage(
        kind=kind, sid=_attr(xml, "sid", 16), seq=int(seq_text),
        ufrag=xml.get("ufrag", ""), pwd=xml.get("pwd", ""), candidates=tuple(candidates),
        end_of_candidates=xml.get("end") == "1", reason=xml.get("reason", ""),
        features=features))


def _element(op: str, **attrs: str) -> ET.Element:
    el = ET.Element(f"{{{NS}}}{op}", {"ver": PROTOCOL_VERSION, **attrs})
    return el


def make_group_op(op: GroupOp) -> tuple[str, ET.Element]:
    """(IQ type, payload element) for an outbound group operation."""
    if isinstance(op, JoinRequest):
        el = _element("join", group=op.group, **({"gid": op.gid} if op.gid else {}))
        el.append(ET.fromstring(str(make_device(op.device))))
        return "set", el
    if isinstance(op, Invitation):
        return "set", _element("invite", gid=op.gid, name=op.name,
                               **{"owner-key": op.owner_sign_key, "owner-device": op.owner_device})
    if isinstance(op, MembershipPush):
        el = _element("membership")
        el.text = base64.b64encode(op.document).decode("ascii")
        return "set", el
    if isinstance(op, MembershipFetch):
        return "get", _element("membership", gid=op.gid)
    if isinstance(op, LinkSignal):
        gid, op = op.gid, op.msg
        attrs = {"gid": gid, "sid": op.sid, "seq": str(op.seq), "kind": str(op.kind)}
        for key, value in (("ufrag", op.ufrag), ("pwd", op.pwd), ("reason", op.reason)):
            if value:
                attrs[key] = value
        if op.end_of_candidates:
            attrs["end"] = "1"
        if op.features:
            attrs["features"] = " ".join(op.features)
        el = _element("link", **attrs)
        for candidate in op.candidates:
            ET.SubElement(el, f"{{{NS}}}candidate").text = candidate
        return "set", el
    return "set", _element("leave", gid=op.gid)
