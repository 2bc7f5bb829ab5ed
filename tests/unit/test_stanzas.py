"""Unit tests for socialvpn/xmpp/stanzas.py: the <device/> element and IQ payload limits.

RELIABILITY row 7: every hostile variant is refused with ProtocolError and a counter reason;
a hypothesis run shows nothing else escapes parse_device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from xml.etree import ElementTree as ET

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from slixmpp.stanza import Presence

from socialvpn.errors import ProtocolError
from socialvpn.keys import DeviceKeys, b64
from socialvpn.xmpp.signal import CSUM_PARTIAL, MAX_FEATURE_CHARS, MAX_FEATURES, Kind, LinkMessage
from socialvpn.xmpp.stanzas import (
    GROUP_OPS,
    MAX_ATTR_CHARS,
    MAX_ELEMENT_BYTES,
    MAX_FEATURES_CHARS,
    MAX_IQ_PAYLOAD_BYTES,
    MAX_NAME_CHARS,
    NS,
    PROTOCOL_VERSION,
    DeviceElement,
    DeviceInfo,
    LinkSignal,
    _local,
    make_device,
    make_group_op,
    ours,
    parse_device,
    parse_group_op,
    parse_iq_payload,
    register_stanzas,
    serialized_size,
)

pytestmark = pytest.mark.unit

KEYS = DeviceKeys(bytes(range(1, 33)), bytes(range(40, 72)))
OTHER = DeviceKeys(bytes(range(2, 34)), bytes(range(41, 73)))
INFO = DeviceInfo(KEYS.device_id, "laptop", b64(KEYS.x25519_public), b64(KEYS.ed25519_public))
ATTRS = ("id", "name", "key", "sign", "ver")


def device_xml(info: DeviceInfo = INFO) -> ET.Element:
    return make_device(info).xml


def refused(xml: ET.Element) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_device(xml)
    return info.value


# --- valid elements ----------------------------------------------------------------------


def test_make_and_parse_round_trip() -> None:
    xml = device_xml()
    assert xml.tag == f"{{{NS}}}device"
    assert xml.get("ver") == PROTOCOL_VERSION == "0"
    assert {k: xml.get(k) for k in ATTRS} == {**INFO.to_json(), "ver": "0"}
    assert parse_device(xml) == INFO


def test_round_trip_with_generated_keys() -> None:
    for _ in range(5):
        keys = DeviceKeys.generate()
        info = DeviceInfo(keys.device_id, "d\u00e9vice \u2603", b64(keys.x25519_public),
                          b64(keys.ed25519_public))
        assert parse_device(device_xml(info)) == info


def test_round_trip_through_wire_text() -> None:
    text = ET.tostring(device_xml(), encoding="unicode")
    assert parse_device(ET.fromstring(text)) == INFO


def test_round_trip_inside_presence() -> None:
    register_stanzas()
    pres = Presence()
    pres.append(make_device(INFO))
    pres.xml.append(ET.Element("{jabber:client}priority"))
    found = ours(pres.xml)
    assert len(found) == 1
    assert parse_device(found[0]) == INFO
    again = ET.fromstring(str(pres))
    assert [parse_device(x) for x in ours(again)] == [INFO]


def test_plugin_attrib_registration() -> None:
    register_stanzas()
    pres = Presence()
    dev = pres["svpn_device"]
    assert isinstance(dev, DeviceElement)
    for k in ATTRS[:-1]:
        dev[k] = getattr(INFO, k)
    dev["ver"] = PROTOCOL_VERSION
    assert parse_device(ours(pres.xml)[0]) == INFO


def test_to_json() -> None:
    assert INFO.to_json() == {"id": INFO.id, "name": INFO.name, "key": INFO.key,
                              "sign": INFO.sign}


def test_name_limits() -> None:
    ok = DeviceInfo(INFO.id, "n" * MAX_NAME_CHARS, INFO.key, INFO.sign)
    assert parse_device(device_xml(ok)).name == "n" * MAX_NAME_CHARS
    # whitespace inside is fine; XML whitespace text between tags is fine too
    spaced = DeviceInfo(INFO.id, " my laptop ", INFO.key, INFO.sign)
    assert parse_device(device_xml(spaced)).name == " my laptop "
    xml = device_xml()
    xml.text = "\n  "
    assert parse_device(xml) == INFO


def test_ignores_tail_and_extra_attributes() -> None:
    xml = device_xml()
    xml.tail = "trailing text belongs to the parent"
    xml.set("extra", "x")
    assert parse_device(xml) == INFO


# --- hostile variants ----------------------------------------------------------------------


def test_oversize_element() -> None:
    xml = device_xml()
    xml.set("pad", "x" * MAX_ELEMENT_BYTES)
    assert serialized_size(xml) > MAX_ELEMENT_BYTES
    assert refused(xml).reason == "oversize"


def test_oversize_just_over_limit() -> None:
    xml = device_xml()
    xml.set("pad", "")
    pad = MAX_ELEMENT_BYTES - serialized_size(xml)
    xml.set("pad", "x" * pad)
    assert serialized_size(xml) == MAX_ELEMENT_BYTES
    assert parse_device(xml) == INFO
    xml.set("pad", "x" * (pad + 1))
    assert refused(xml).reason == "oversize"


def test_oversize_by_children() -> None:
    xml = device_xml()
    for _ in range(300):
        ET.SubElement(xml, "c")
    assert refused(xml).reason == "oversize"


@pytest.mark.parametrize(
    ("attr", "length"),
    [("id", 17), ("name", MAX_NAME_CHARS + 1), ("key", 45), ("sign", 45), ("ver", 9),
     ("name", MAX_ATTR_CHARS + 1)],
)
def test_long_attribute(attr: str, length: int) -> None:
    xml = device_xml()
    xml.set(attr, "A" * length)
    assert refused(xml).reason == "oversize"


@pytest.mark.parametrize("attr", ATTRS)
def test_missing_attribute(attr: str) -> None:
    xml = device_xml()
    del xml.attrib[attr]
    err = refused(xml)
    assert err.reason == "malformed"
    assert attr in str(err)


@pytest.mark.parametrize("ver", ["1", "", "00", " 0", "0 ", "v0", "0.0", "\u0660"])
def test_wrong_version(ver: str) -> None:
    xml = device_xml()
    xml.set("ver", ver)
    assert refused(xml).reason == "version"


def test_version_checked_before_other_fields() -> None:
    xml = ET.Element(f"{{{NS}}}device", {"ver": "1"})
    assert refused(xml).reason == "version"


def test_child_element() -> None:
    xml = device_xml()
    ET.SubElement(xml, f"{{{NS}}}candidate")
    assert refused(xml).reason == "malformed"


def test_child_in_foreign_namespace() -> None:
    xml = device_xml()
    ET.SubElement(xml, "{jabber:x:data}x")
    assert refused(xml).reason == "malformed"


@pytest.mark.parametrize("text", ["x", " hello ", "0", "\n<escaped/>\n"])
def test_text_content(text: str) -> None:
    xml = device_xml()
    xml.text = text
    assert refused(xml).reason == "malformed"


@pytest.mark.parametrize("attr", ATTRS)
@pytest.mark.parametrize("ch", ["\x00", "\x01", "\x1b", "\x7f", "\t", "\r", "\n"])
@pytest.mark.parametrize("where", ["start", "end"])
def test_control_characters(attr: str, ch: str, where: str) -> None:
    xml = device_xml()
    value = xml.get(attr) or ""
    # Same length as the valid value, so only the character itself is wrong.
    xml.set(attr, ch + value[1:] if where == "start" else value[:-1] + ch)
    if ch == "\n" and attr == "ver":
        # a one-character version is checked as a version first: any refusal is right
        assert refused(xml).reason in ("malformed", "version")
        return
    assert refused(xml).reason == "malformed"


@pytest.mark.parametrize(("attr", "value"), [("name", "laptop\n"), ("name", "a b\n"),
                                             ("ver", "\n"), ("ver", "0\n")])
def test_trailing_newline(attr: str, value: str) -> None:
    xml = device_xml()
    xml.set(attr, value)
    assert refused(xml).reason == "malformed"


@pytest.mark.parametrize("name", ["", " ", "   \u3000"])
def test_blank_name(name: str) -> None:
    xml = device_xml()
    xml.set("name", name)
    assert refused(xml).reason == "malformed"


def test_id_not_matching_key() -> None:
    xml = device_xml()
    xml.set("id", OTHER.device_id)
    err = refused(xml)
    assert err.reason == "malformed" and "match" in str(err)


def test_key_of_another_device() -> None:
    xml = device_xml()
    xml.set("key", b64(OTHER.x25519_public))
    assert refused(xml).reason == "malformed"


@pytest.mark.parametrize(
    "dev_id", ["", "ABCDEFGHIJKLMNOP", "abcdefghijklmno", "abcdefghijklmn01", "abcdefghijklmno8",
               "abcdefghijklmn\u00e9p"],
)
def test_bad_device_id(dev_id: str) -> None:
    xml = device_xml()
    xml.set("id", dev_id)
    assert refused(xml).reason == "malformed"


BAD_KEYS = [
    "",
    "A" * 43,
    "A" * 42 + "B=",  # non-canonical padding
    "A" * 42 + "==",  # 31 bytes
    "A" * 44,  # 33 bytes
    "!" * 43 + "=",
    "A" * 20 + " " + "A" * 22 + "=",
    b64(bytes(32)).replace("A", "-", 1),
]


@pytest.mark.parametrize("attr", ["key", "sign"])
@pytest.mark.parametrize("value", BAD_KEYS)
def test_bad_base64_keys(attr: str, value: str) -> None:
    xml = device_xml()
    xml.set(attr, value)
    assert refused(xml).reason == "malformed"


@pytest.mark.parametrize("tag", [f"{{{NS}}}devices", f"{{{NS}}}link", "device-x", f"{{{NS}}}x"])
def test_wrong_element_name(tag: str) -> None:
    xml = device_xml()
    xml.tag = tag
    assert refused(xml).reason == "unknown"


def test_unknown_checked_before_size() -> None:
    xml = ET.Element(f"{{{NS}}}bogus", {"pad": "x" * 5000})
    assert refused(xml).reason == "unknown"


def test_size_checked_before_content() -> None:
    xml = ET.Element(f"{{{NS}}}device", {"pad": "x" * 5000})  # no ver at all
    assert refused(xml).reason == "oversize"


def test_error_is_protocol_error_only() -> None:
    xml = device_xml()
    xml.set("key", "A" * 42 + "B=")
    err = refused(xml)
    assert type(err) is ProtocolError
    assert err.__cause__ is None and err.__suppress_context__


# --- IQ payloads ---------------------------------------------------------------------------

KNOWN = frozenset({"join", "invite", "membership", "leave", "link"})


def iq(op: str, ver: str | None = PROTOCOL_VERSION, **attrs: str) -> ET.Element:
    xml = ET.Element(f"{{{NS}}}{op}", attrs)
    if ver is not None:
        xml.set("ver", ver)
    return xml


@pytest.mark.parametrize("op", sorted(KNOWN))
def test_iq_payload_ok(op: str) -> None:
    xml = iq(op, gid="g")
    assert parse_iq_payload(xml, KNOWN) == (op, xml)


def test_iq_payload_with_children_under_limit() -> None:
    xml = iq("membership")
    doc = ET.SubElement(xml, f"{{{NS}}}document")
    doc.text = "x" * (MAX_IQ_PAYLOAD_BYTES - 200)
    assert serialized_size(xml) <= MAX_IQ_PAYLOAD_BYTES
    assert parse_iq_payload(xml, KNOWN)[0] == "membership"


def test_iq_payload_oversize() -> None:
    xml = iq("membership")
    ET.SubElement(xml, f"{{{NS}}}document").text = "x" * MAX_IQ_PAYLOAD_BYTES
    with pytest.raises(ProtocolError) as info:
        parse_iq_payload(xml, KNOWN)
    assert info.value.reason == "oversize"


def test_iq_payload_oversize_before_unknown() -> None:
    xml = iq("bogus", pad="x" * (MAX_IQ_PAYLOAD_BYTES + 1))
    with pytest.raises(ProtocolError) as info:
        parse_iq_payload(xml, KNOWN)
    assert info.value.reason == "oversize"


@pytest.mark.parametrize("op", ["bogus", "JOIN", "device", ""])
def test_iq_payload_unknown_op(op: str) -> None:
    xml = ET.Element(f"{{{NS}}}{op}", {"ver": "0"})
    with pytest.raises(ProtocolError) as info:
        parse_iq_payload(xml, KNOWN)
    assert info.value.reason == "unknown"


def test_iq_payload_version_checked_before_op() -> None:
    # a payload of another protocol version cannot be read any further, not even its name
    with pytest.raises(ProtocolError) as info:
        parse_iq_payload(iq("bogus", ver="1"), KNOWN)
    assert info.value.reason == "version"


def test_iq_payload_unknown_op_empty_known_set() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_iq_payload(iq("join"), frozenset())
    assert info.value.reason == "unknown"


@pytest.mark.parametrize(("ver", "reason"), [("1", "version"), ("", "version"),
                                             ("x" * 9, "oversize"), (None, "malformed"),
                                             ("\x01", "malformed")])
def test_iq_payload_bad_version(ver: str | None, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_iq_payload(iq("join", ver=ver), KNOWN)
    assert info.value.reason == reason


# --- ours() --------------------------------------------------------------------------------


def test_ours_finds_only_our_namespace() -> None:
    stanza = ET.Element("{jabber:client}presence")
    a = ET.SubElement(stanza, f"{{{NS}}}device")
    ET.SubElement(stanza, "{jabber:client}priority")
    ET.SubElement(stanza, "{urn:xmpp:socialvpn:00}device")  # look-alike namespace
    ET.SubElement(stanza, "{urn:xmpp:socialvpn:1}device")
    ET.SubElement(stanza, "device")  # no namespace
    stanza.append(ET.Comment(f"{{{NS}}}device"))
    stanza.append(ET.ProcessingInstruction("pi"))
    b = ET.SubElement(stanza, f"{{{NS}}}link")
    ET.SubElement(a, f"{{{NS}}}nested")  # not a direct child of the stanza
    assert ours(stanza) == [a, b]


def test_ours_empty() -> None:
    assert ours(ET.Element("{jabber:client}presence")) == []


def test_ours_from_parsed_text() -> None:
    text = (f"<presence xmlns='jabber:client'><show>away</show>"
            f"<d:device xmlns:d='{NS}' ver='0'/><x xmlns='{NS}'/></presence>")
    found = ours(ET.fromstring(text))
    assert [el.tag for el in found] == [f"{{{NS}}}device", f"{{{NS}}}x"]


# --- hypothesis: random <device/> elements ------------------------------------------------

VALID = INFO.to_json() | {"ver": PROTOCOL_VERSION}
_xml_name = st.sampled_from(["a", "x", "id2", "Name", "_p", "data-x", "v.1", "device",
                             "candidate", "sign", "key"])
_attr_name = st.one_of(
    st.sampled_from(ATTRS),
    _xml_name,
    st.sampled_from([f"{{{NS}}}{n}" for n in ATTRS] + ["{urn:other}id", "{urn:other}x"]),
)
_interesting = st.sampled_from([
    "", "0", "1", " ", "\n", "laptop\n", "\x00", "\x7f", "\t", KEYS.device_id,
    OTHER.device_id, INFO.key, INFO.sign, b64(OTHER.x25519_public), b64(OTHER.ed25519_public),
    "A" * 43 + "=", "A" * 42 + "B=", "A" * 44, "a" * 16, "x" * 65, "x" * 257, "x" * 2000,
    "\u2603" * 64, "\U0001f511", "laptop", "&<>\"'",
])
# Valid values with one character replaced (at the start, middle, padding or end).
_MUTATED = sorted({k[:i] + c + k[i + 1:] for k in (INFO.key, INFO.sign, INFO.id)
                   for i in (0, 7, 15, 42, 43) for c in "A/+=9z\x00 "})
_attr_value = st.one_of(_interesting, st.text(max_size=10), st.sampled_from(_MUTATED))
_tag = st.sampled_from([f"{{{NS}}}device"] * 8 + [
    f"{{{NS}}}link", f"{{{NS}}}Device", "device", "{urn:other}device", f"{{{NS}}}x",
])
_text = st.one_of(st.sampled_from([None, None, None, "", "  ", "\n\t", "x", "\x00"]),
                  st.text(max_size=6))
# One edit of the element: set (or add) an attribute, delete one, add text or a child.
_edit = st.tuples(st.sampled_from(["set", "set", "del", "text", "child", "comment"]),
                  _attr_name, _attr_value, _tag)


@st.composite
def device_elements(draw: Callable) -> ET.Element:
    """A <device/> (mostly valid to begin with) after up to four random edits."""
    start = draw(st.sampled_from(["valid", "valid", "valid", "bare"]))
    xml = ET.Element(draw(_tag), dict(VALID) if start == "valid" else {})
    for op, name, value, tag in draw(st.lists(_edit, max_size=4)):
        if op == "set":
            xml.set(name, value)
        elif op == "del":
            xml.attrib.pop(name, None)
        elif op == "text":
            xml.text = draw(_text)
        elif op == "child":
            child = ET.SubElement(xml, tag, {name: value} if name in ATTRS else {})
            child.tail = draw(_text)
        else:
            xml.append(ET.Comment(value.replace("-", "")))
    return xml


@settings(max_examples=10_000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(device_elements())
def test_parse_device_total(xml: ET.Element) -> None:
    before = ET.tostring(xml)
    try:
        info = parse_device(xml)
    except ProtocolError as exc:
        assert exc.reason in {"oversize", "malformed", "version", "unknown"}
        event(exc.reason)
    else:
        event("accepted")
        assert isinstance(info, DeviceInfo)
        assert info.id == xml.get("id") and info.key == xml.get("key")
        assert info.sign == xml.get("sign") and info.name == xml.get("name")
    assert ET.tostring(xml) == before  # the parser does not modify its input


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_parse_device_of_any_wire_text(text: str) -> None:
    """Whatever an XML parser makes of a peer's bytes, parse_device answers ProtocolError."""
    doc = f"<device xmlns='{NS}' ver='0' {text}/>"
    try:
        xml = ET.fromstring(doc)
    except ET.ParseError:
        return
    try:
        parse_device(copy.deepcopy(xml))
    except ProtocolError:
        pass


# --- <link/> signalling and its features --------------------------------------------------


GID = "0123456789abcdef0123456789abcdef"
LINK_PWD = "A" * 22


def link_offer(**kw: object) -> LinkMessage:
    return LinkMessage(Kind.OFFER, "0123456789abcdef", 0, ufrag="abcd", pwd=LINK_PWD, **kw)  # type: ignore[arg-type]


def link_round_trip(msg: LinkMessage) -> tuple[ET.Element, LinkMessage]:
    """make → wire text → parse, as between two agents."""
    iq_type, el = make_group_op(LinkSignal(GID, msg))
    assert iq_type == "set"
    wire = ET.fromstring(ET.tostring(el, encoding="unicode"))
    _, payload = parse_iq_payload(wire, GROUP_OPS)
    op = parse_group_op(payload, "set")
    assert isinstance(op, LinkSignal) and op.gid == GID
    return el, op.msg


def link_refused(el: ET.Element) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_group_op(el, "set")
    return info.value


def test_link_features_round_trip_as_one_attribute() -> None:
    msg = link_offer(features=(CSUM_PARTIAL,),
                     candidates=("candidate:1 1 UDP 1 10.0.0.1 9 typ host",))
    el, back = link_round_trip(msg)
    assert el.get("features") == CSUM_PARTIAL and back == msg
    assert [_local(c.tag) for c in el] == ["candidate"]  # no new child: older builds read it
    two = link_offer(features=("a-1", CSUM_PARTIAL))
    el, back = link_round_trip(two)
    assert el.get("features") == f"a-1 {CSUM_PARTIAL}" and back.features == ("a-1", CSUM_PARTIAL)
    answer = LinkMessage(Kind.ANSWER, "0123456789abcdef", 1, ufrag="abcd", pwd=LINK_PWD,
                         features=(CSUM_PARTIAL,))
    assert link_round_trip(answer)[1] == answer


def test_link_without_features_means_none() -> None:
    el, back = link_round_trip(link_offer())
    assert "features" not in el.attrib and back.features == ()
    el.set("features", "")  # an empty list is no features either
    assert parse_group_op(el, "set").msg.features == ()  # type: ignore[union-attr]


def test_link_unknown_feature_tokens_pass_the_parser() -> None:
    """The parser keeps well-formed tokens it does not know; the state machine ignores them."""
    _, el = make_group_op(LinkSignal(GID, link_offer()))
    el.set("features", f"zz-future {CSUM_PARTIAL}")
    assert parse_group_op(el, "set").msg.features == ("zz-future", CSUM_PARTIAL)  # type: ignore[union-attr]


@pytest.mark.parametrize(("value", "reason"), [
    ("Csum-Partial", "malformed"),
    ("csum-partial  x", "malformed"),  # an empty token
    (" csum-partial", "malformed"),
    ("csum-partial csum-partial", "malformed"),
    ("a\tb", "malformed"),
    ("a\x01", "malformed"),
    ("<x/>", "malformed"),
    ("f" * (MAX_FEATURE_CHARS + 1), "oversize"),
    (" ".join(f"f{i}" for i in range(MAX_FEATURES + 1)), "oversize"),
    ("x" * (MAX_FEATURES_CHARS + 1), "oversize"),
    ("x " * 50_000, "oversize"),
])
def test_link_hostile_features_are_refused(value: str, reason: str) -> None:
    _, el = make_group_op(LinkSignal(GID, link_offer()))
    el.set("features", value)
    err = link_refused(el)
    assert err.reason == reason, err


@pytest.mark.parametrize("kind", [Kind.CANDIDATES, Kind.END, Kind.BYE])
def test_link_features_only_on_offer_and_answer(kind: Kind) -> None:
    msg = LinkMessage(kind, "0123456789abcdef", 1, end_of_candidates=kind is Kind.CANDIDATES)
    _, el = make_group_op(LinkSignal(GID, msg))
    assert "features" not in el.attrib
    el.set("features", CSUM_PARTIAL)
    assert link_refused(el).reason == "malformed"


def test_link_feature_child_element_is_refused_as_before() -> None:
    """Features travel as an attribute; an unknown child stays malformed (as in older builds)."""
    _, el = make_group_op(LinkSignal(GID, link_offer()))
    ET.SubElement(el, f"{{{NS}}}feature").text = CSUM_PARTIAL
    assert link_refused(el).reason == "malformed"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_link_features_parse_total(value: str) -> None:
    """Whatever the attribute holds: a LinkMessage or ProtocolError, nothing else."""
    _, el = make_group_op(LinkSignal(GID, link_offer()))
    el.set("features", value)
    try:
        msg = parse_group_op(el, "set").msg  # type: ignore[union-attr]
    except ProtocolError as exc:
        assert exc.reason in ("malformed", "oversize")
    else:
        assert len(msg.features) <= MAX_FEATURES
