"""The strict CBOR codec: canonical round trips, and every kind of lenient input refused."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode import codec
from p2pnode.codec import DecodeError, Field

# Values built only from the allowed types, nested at most a few levels.
leaves = (
    st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=32)
    | st.booleans()
    | st.none()
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), children, max_size=5)
    ),
    max_leaves=20,
)


@given(values)
def test_every_value_round_trips(value: Any) -> None:
    assert codec.decode(codec.encode(value)) == value


@given(values)
def test_encoding_is_canonical_whatever_the_insertion_order(value: Any) -> None:
    if isinstance(value, dict):
        reordered = dict(reversed(list(value.items())))
        assert codec.encode(reordered) == codec.encode(value)


@given(st.binary(max_size=300))
def test_random_input_raises_only_decode_error(data: bytes) -> None:
    try:
        decoded = codec.decode(data)
    except DecodeError:
        return
    assert codec.encode(decoded) == data  # anything accepted is exactly canonical


@given(values, st.data())
def test_single_byte_mutations_raise_only_decode_error(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(codec.encode(value))
    index = data.draw(st.integers(0, len(encoded) - 1))
    encoded[index] = data.draw(st.integers(0, 255))
    try:
        decoded = codec.decode(bytes(encoded))
    except DecodeError:
        return
    # A mutation that still decodes must yield a value whose canonical form is the input.
    assert codec.encode(decoded) == bytes(encoded)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01\xff", "trailing bytes"),
        (bytes.fromhex("a2616101616102"), "Duplicate map key"),
        (bytes.fromhex("1801"), "non-canonical"),  # 1 encoded in two bytes
        (bytes.fromhex("190001"), "non-canonical"),  # 1 encoded in three bytes
        (bytes.fromhex("a2616201616101"), "non-canonical"),  # keys out of canonical order
        (bytes.fromhex("9f01ff"), "indefinite"),
        (bytes.fromhex("5f4101ff"), "indefinite"),
        (bytes.fromhex("c11a00000000"), "not allowed"),  # tag 1: a datetime
        (bytes.fromhex("d9d9f701"), "non-canonical"),  # self-describe tag around 1
        (bytes.fromhex("f93c00"), "float"),
        (bytes.fromhex("f7"), "not allowed"),  # undefined
        (bytes.fromhex("62fffe"), "malformed"),  # invalid UTF-8
        (b"\x81" * 20 + b"\x01", "depth"),
        (b"", "empty"),
        (bytes.fromhex("5affffffff"), "malformed"),  # claims a 4 GiB byte string
        (bytes.fromhex("9bffffffffffffffff"), "malformed"),  # claims 2**64-1 items
    ],
)
def test_lenient_encodings_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        codec.decode(data)


def test_cbor2_alone_accepts_what_we_refuse() -> None:
    # Documents why the strict decoder exists: plain cbor2 takes these without complaint.
    assert cbor2.loads(b"\x01\xff") == 1
    assert cbor2.loads(bytes.fromhex("1801")) == 1
    assert cbor2.loads(bytes.fromhex("a2616101616102")) == {"a": 2}


def test_oversized_input_is_refused_before_parsing() -> None:
    data = codec.encode(b"x" * 1000)
    with pytest.raises(DecodeError, match="exceeds the limit of 100"):
        codec.decode(data, max_size=100)
    assert codec.decode(data, max_size=len(data)) == b"x" * 1000


def test_encode_refuses_types_outside_the_format() -> None:
    with pytest.raises(TypeError):
        codec.encode({"x": 1.5})
    with pytest.raises(TypeError):
        codec.encode((1, 2))


SCHEMA = {
    "id": Field(bytes, 16, 16),
    "n": Field(int, min_value=0, max_value=10),
    "name": Field(str, 1, 5),
    "tags": Field(list, 0, 3, items=Field(str, 1, 4)),
    "opt": Field(bool, optional=True),
}
GOOD = {"id": b"i" * 16, "n": 3, "name": "ab", "tags": ["x"]}


def test_schema_accepts_a_conforming_map() -> None:
    assert codec.decode_map(codec.encode(GOOD), SCHEMA, what="thing") == GOOD
    with_opt = GOOD | {"opt": True}
    assert codec.decode_map(codec.encode(with_opt), SCHEMA, what="thing") == with_opt


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"id": b"short"}, "field 'id': length 5, expected exactly 16"),
        ({"n": True}, "field 'n': expected int, got bool"),
        ({"n": 11}, "field 'n': 11 is above 10"),
        ({"n": -1}, "field 'n': -1 is below 0"),
        ({"name": "toolong"}, "field 'name': length 7"),
        ({"name": b"ab"}, "expected str, got bytes"),
        ({"tags": ["x", "y", "z", "w"]}, "field 'tags': length 4"),
        ({"tags": [1]}, r"field 'tags\[0\]': expected str"),
        ({"extra": 1}, "unknown field 'extra'"),
        ({"opt": 1}, "field 'opt': expected bool"),
    ],
)
def test_schema_refusals_name_the_field(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        codec.decode_map(codec.encode(GOOD | change), SCHEMA, what="thing")


def test_missing_field_and_non_map_are_refused() -> None:
    partial = {k: v for k, v in GOOD.items() if k != "n"}
    with pytest.raises(DecodeError, match="thing: missing field 'n'"):
        codec.decode_map(codec.encode(partial), SCHEMA, what="thing")
    with pytest.raises(DecodeError, match="thing: expected a map, got list"):
        codec.decode_map(codec.encode([1]), SCHEMA, what="thing")


def test_signed_pair_framing() -> None:
    body, signature = b"b" * 10, b"s" * 64
    assert codec.decode_signed(codec.encode([body, signature]), what="x", max_body=10) == (
        body,
        signature,
    )
    for bad in ([body], [body, signature, b""], [body, b"s" * 63], ["b", signature], {}):
        with pytest.raises(DecodeError):
            codec.decode_signed(codec.encode(bad), what="x", max_body=10)
    with pytest.raises(DecodeError, match="x"):
        codec.decode_signed(codec.encode([b"b" * 11, signature]), what="x", max_body=10)
