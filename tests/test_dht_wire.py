"""The rpcudp datagram format: what we send is what stock kademlia sends, and whatever a peer
sends, decoding fails only with WireError."""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any

import pytest
import umsgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.dht import wire
from p2pnode.dht.records import MAX_RECORD_SIZE
from p2pnode.dht.wire import (
    HEADER_SIZE,
    MAX_CONTACTS_PER_REPLY,
    MAX_DATAGRAM_SIZE,
    MAX_REQUEST_BODY,
    Contact,
    Method,
    Request,
    Response,
    WireError,
)

MSG_ID = bytes(range(20))
NODE = b"\x11" * 20
KEY = b"\x22" * 20


def rpcudp_request(method: str, *args: Any) -> bytes:
    """A request datagram built exactly as rpcudp 5.0.1 builds one."""
    msg_id = hashlib.sha1(os.urandom(32)).digest()
    return b"\x00" + msg_id + bytes(umsgpack.packb([method, args]))


def request(method: str, args: list[Any]) -> Request:
    decoded = wire.decode_datagram(b"\x00" + MSG_ID + umsgpack.packb([method, args]))
    assert isinstance(decoded, Request)
    return decoded


def parse(method: str, args: list[Any]) -> wire.ParsedRequest:
    return wire.parse_request(request(method, args), max_value_size=MAX_RECORD_SIZE)


def reason(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(WireError) as info:
        call(*args, **kwargs)
    return info.value.reason


# --- round trips and compatibility -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args"),
    [
        (Method.PING, [NODE]),
        (Method.STORE, [NODE, KEY, b"value"]),
        (Method.FIND_NODE, [NODE, KEY]),
        (Method.FIND_VALUE, [NODE, KEY]),
        (Method.STUN, []),
    ],
)
def test_request_round_trip(method: Method, args: list[Any]) -> None:
    decoded = wire.decode_datagram(wire.encode_request(MSG_ID, method, args))
    assert decoded == Request(MSG_ID, method.value, args)
    parsed = wire.parse_request(decoded, max_value_size=MAX_RECORD_SIZE)
    assert parsed.method is method


@given(
    st.binary(min_size=20, max_size=20),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.binary(max_size=40)
        | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        ),
        max_leaves=20,
    ),
)
def test_response_round_trip(msg_id: bytes, value: Any) -> None:
    assert wire.decode_datagram(wire.encode_response(msg_id, value)) == Response(msg_id, value)


def test_stock_rpcudp_requests_decode_and_parse() -> None:
    # rpcudp packs the argument tuple; msgpack has no tuples, so it arrives as a list.
    decoded = wire.decode_datagram(rpcudp_request("find_value", NODE, KEY))
    assert isinstance(decoded, Request)
    parsed = wire.parse_request(decoded, max_value_size=MAX_RECORD_SIZE)
    assert (parsed.method, parsed.sender_id, parsed.key) == (Method.FIND_VALUE, NODE, KEY)


def test_our_requests_use_the_rpcudp_framing() -> None:
    datagram = wire.encode_request(MSG_ID, Method.PING, [NODE])
    assert datagram[0] == 0x00
    assert datagram[1:HEADER_SIZE] == MSG_ID
    assert umsgpack.unpackb(datagram[HEADER_SIZE:]) == ["ping", [NODE]]
    assert wire.encode_response(MSG_ID, NODE) == b"\x01" + MSG_ID + umsgpack.packb(NODE)


def test_encode_request_refuses_what_rpcudp_would_refuse() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        wire.encode_request(MSG_ID, Method.STORE, [NODE, KEY, b"x" * MAX_REQUEST_BODY])


# --- framing limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "too-short"),
        (b"\x00" + MSG_ID, "too-short"),
        (b"\x01" + MSG_ID + b"\xc0" + b"\x00" * MAX_DATAGRAM_SIZE, "oversized"),
        (b"\x00" + MSG_ID + umsgpack.packb(["store", [b"x" * MAX_REQUEST_BODY]]), "oversized"),
        (b"\x02" + MSG_ID + umsgpack.packb(["ping", []]), "unknown-type"),
        (b"\x00" + MSG_ID + b"\xc1", "malformed-msgpack"),  # 0xc1 is never used
        (b"\x00" + MSG_ID + b"\x92\xa4ping", "malformed-msgpack"),  # truncated
        (b"\x00" + MSG_ID + umsgpack.packb({"ping": []}), "malformed-request"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping", [], 1]), "malformed-request"),
        (b"\x00" + MSG_ID + umsgpack.packb([1, []]), "malformed-request"),
        (b"\x00" + MSG_ID + umsgpack.packb(["p" * 33, []]), "malformed-request"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping", NODE]), "malformed-request"),
    ],
)
def test_decode_datagram_refuses_bad_framing(data: bytes, expected: str) -> None:
    assert reason(wire.decode_datagram, data) == expected


def test_deeply_nested_msgpack_is_a_wire_error_not_a_recursion_error() -> None:
    nested = b"\x91" * (MAX_DATAGRAM_SIZE - HEADER_SIZE - 1) + b"\xc0"
    assert reason(wire.decode_datagram, b"\x01" + MSG_ID + nested) == "malformed-msgpack"


def test_huge_length_prefix_does_not_allocate_what_it_claims() -> None:
    # str32 / bin32 / array32 claiming 4 GiB in a 30-byte datagram.
    for prefix in (b"\xdb", b"\xc6", b"\xdd"):
        data = b"\x01" + MSG_ID + prefix + b"\xff\xff\xff\xff" + b"a" * 8
        assert reason(wire.decode_datagram, data) == "malformed-msgpack"


# --- hypothesis: nothing but WireError escapes ------------------------------------------------

VALID_DATAGRAMS = [
    wire.encode_request(MSG_ID, Method.PING, [NODE]),
    wire.encode_request(MSG_ID, Method.STORE, [NODE, KEY, b"v" * 100]),
    wire.encode_request(MSG_ID, Method.FIND_NODE, [NODE, KEY]),
    wire.encode_request(MSG_ID, Method.STUN, []),
    wire.encode_response(MSG_ID, [[NODE, "192.0.2.1", 4000], [KEY, "2001:db8::1", 4001]]),
    wire.encode_response(MSG_ID, {"value": b"v" * 100}),
    wire.encode_response(MSG_ID, ["192.0.2.1", 4000]),
]
METHODS = list(Method)


def decode_everything(data: bytes) -> None:
    """Decode and, if that succeeds, parse as every kind of request and reply."""
    try:
        decoded = wire.decode_datagram(data)
    except WireError:
        return
    if isinstance(decoded, Request):
        with contextlib.suppress(WireError):
            wire.parse_request(decoded, max_value_size=MAX_RECORD_SIZE)
        return
    for method in METHODS:
        with contextlib.suppress(WireError):
            wire.parse_reply(method, decoded.value, max_value_size=MAX_RECORD_SIZE)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    decode_everything(data)


@settings(max_examples=300)
@given(st.binary(max_size=60))
def test_random_bodies_behind_a_valid_header_raise_only_wire_error(body: bytes) -> None:
    decode_everything(b"\x00" + MSG_ID + body)
    decode_everything(b"\x01" + MSG_ID + body)


@settings(max_examples=500)
@given(st.sampled_from(VALID_DATAGRAMS), st.data())
def test_single_byte_mutations_raise_only_wire_error(datagram: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(datagram) - 1))
    mutation = data.draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
    byte = data.draw(st.integers(0, 255))
    if mutation == "replace":
        mutated = datagram[:position] + bytes([byte]) + datagram[position + 1 :]
    elif mutation == "delete":
        mutated = datagram[:position] + datagram[position + 1 :]
    elif mutation == "insert":
        mutated = datagram[:position] + bytes([byte]) + datagram[position:]
    else:
        mutated = datagram[:position]
    decode_everything(mutated)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=30)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    st.sampled_from([m.value for m in Method] + ["rpc_ping", ""]),
    st.lists(msgpack_values, max_size=4),
)
def test_arbitrary_arguments_raise_only_wire_error(method: str, args: list[Any]) -> None:
    decode_everything(b"\x00" + MSG_ID + umsgpack.packb([method, args]))


@settings(max_examples=300)
@given(msgpack_values)
def test_arbitrary_replies_raise_only_wire_error(value: Any) -> None:
    decode_everything(wire.encode_response(MSG_ID, value))


# --- parse_request: wrong types and lengths ---------------------------------------------------


@pytest.mark.parametrize(
    ("method", "args", "expected"),
    [
        ("pong", [NODE], "unknown-method"),
        ("rpc_ping", [NODE], "unknown-method"),
        ("ping", [], "bad-argument"),
        ("ping", [NODE, NODE], "bad-argument"),
        ("ping", [NODE[:19]], "bad-argument"),
        ("ping", [NODE + b"\x00"], "bad-argument"),
        ("ping", [NODE.hex()], "bad-argument"),
        ("ping", [int.from_bytes(NODE, "big") >> 100], "bad-argument"),
        ("ping", [None], "bad-argument"),
        ("store", [NODE, KEY], "bad-argument"),
        ("store", [NODE, KEY, "text, not bytes"], "bad-argument"),
        ("store", [NODE, KEY, 12345], "bad-argument"),
        ("store", [NODE, KEY, [b"list"]], "bad-argument"),
        ("store", [NODE, KEY, b"x" * (MAX_RECORD_SIZE + 1)], "bad-argument"),
        ("store", [NODE, KEY[:10], b"v"], "bad-argument"),
        ("find_node", [NODE], "bad-argument"),
        ("find_node", [NODE, KEY + b"\x00"], "bad-argument"),
        ("find_node", [NODE, {"key": KEY}], "bad-argument"),
        ("find_value", [NODE, True], "bad-argument"),
        ("find_value", [b"", KEY], "bad-argument"),
        ("stun", [NODE], "bad-argument"),
    ],
)
def test_parse_request_refuses_wrong_types_and_lengths(
    method: str, args: list[Any], expected: str
) -> None:
    assert reason(parse, method, args) == expected


def test_parse_request_accepts_the_stock_argument_lists() -> None:
    assert parse("ping", [NODE]) == wire.ParsedRequest(Method.PING, NODE)
    assert parse("stun", []) == wire.ParsedRequest(Method.STUN, None)
    assert parse("store", [NODE, KEY, b"v"]) == wire.ParsedRequest(Method.STORE, NODE, KEY, b"v")
    assert parse("find_node", [NODE, KEY]) == wire.ParsedRequest(Method.FIND_NODE, NODE, KEY)
    biggest = b"x" * MAX_RECORD_SIZE
    assert parse("store", [NODE, KEY, biggest]).value == biggest


# --- parse_reply ------------------------------------------------------------------------------


def parse_reply(method: Method, value: Any) -> Any:
    return wire.parse_reply(method, value, max_value_size=MAX_RECORD_SIZE)


def test_parse_reply_accepts_what_stock_nodes_send() -> None:
    assert parse_reply(Method.PING, NODE) == NODE
    assert parse_reply(Method.STORE, True) is True
    assert parse_reply(Method.STORE, False) is False
    # Stock kademlia returns list(map(tuple, neighbors)): [id, ip, port] triples on the wire.
    contacts = parse_reply(Method.FIND_NODE, [[NODE, "192.0.2.1", 4000], [KEY, "::1", 1]])
    assert contacts == [Contact(NODE, "192.0.2.1", 4000), Contact(KEY, "::1", 1)]
    assert parse_reply(Method.FIND_VALUE, {"value": b"record"}) == b"record"
    assert parse_reply(Method.FIND_VALUE, []) == []
    assert parse_reply(Method.STUN, ["192.0.2.1", 4000]) == ("192.0.2.1", 4000)


@pytest.mark.parametrize(
    ("method", "value"),
    [
        (Method.PING, NODE[:19]),
        (Method.PING, None),
        (Method.PING, NODE.hex()),
        (Method.STORE, 1),  # not a bool: a stock (True, ...) tuple must never count as success
        (Method.STORE, [True, None]),
        (Method.STORE, None),
        (Method.FIND_NODE, None),
        (Method.FIND_NODE, {"value": b"x"}),
        (Method.FIND_NODE, [[NODE, "192.0.2.1"]]),
        (Method.FIND_NODE, [[NODE, "192.0.2.1", 4000, "extra"]]),
        (Method.FIND_NODE, [[NODE[:5], "192.0.2.1", 4000]]),
        (Method.FIND_NODE, [[NODE, "example.com", 4000]]),
        (Method.FIND_NODE, [[NODE, "192.0.2.1", 0]]),
        (Method.FIND_NODE, [[NODE, "192.0.2.1", 65536]]),
        (Method.FIND_NODE, [[NODE, "192.0.2.1", True]]),
        (Method.FIND_NODE, [[NODE, "192.0.2.1", "4000"]]),
        (Method.FIND_NODE, [[NODE, b"192.0.2.1", 4000]]),
        (Method.FIND_NODE, [NODE]),
        (Method.FIND_NODE, [[NODE, "192.0.2.1", 4000]] * (MAX_CONTACTS_PER_REPLY + 1)),
        (Method.FIND_VALUE, {"value": "text"}),
        (Method.FIND_VALUE, {"value": b"v", "extra": 1}),
        (Method.FIND_VALUE, {"val": b"v"}),
        (Method.FIND_VALUE, {"value": b"v" * (MAX_RECORD_SIZE + 1)}),
        (Method.FIND_VALUE, [[1, 2, 3]]),
        (Method.STUN, ["192.0.2.1"]),
        (Method.STUN, [4000, "192.0.2.1"]),
        (Method.STUN, None),
    ],
)
def test_parse_reply_refuses_malformed_replies(method: Method, value: Any) -> None:
    assert reason(parse_reply, method, value) == "bad-reply"


contacts_strategy = st.lists(
    st.builds(
        Contact,
        st.binary(min_size=20, max_size=20),
        st.ip_addresses().map(str),
        st.integers(1, 65535),
    ),
    max_size=MAX_CONTACTS_PER_REPLY,
)


@given(contacts_strategy)
def test_contact_lists_round_trip(contacts: list[Contact]) -> None:
    value = [[c.node_id, c.host, c.port] for c in contacts]
    datagram = wire.decode_datagram(wire.encode_response(MSG_ID, value))
    assert isinstance(datagram, Response)
    assert parse_reply(Method.FIND_NODE, datagram.value) == contacts
