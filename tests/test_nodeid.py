"""Tests for p2pnode.nodeid: human-readable node IDs with check characters."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.nodeid import (
    ALPHABET,
    CHECK_GROUP_LENGTH,
    DISPLAY_GROUP_COUNT,
    DISPLAY_GROUP_LENGTH,
    ID_LENGTH,
    KEY_LENGTH,
    NodeId,
    NodeIdError,
    parse_node_id,
)

# ---------------------------------------------------------------------------
# Independent reference implementation (no code shared with the module):
# base32 data from the standard library, GF(2^5) multiplication by
# shift-and-reduce, and the check character found by trying all 32 values.
# ---------------------------------------------------------------------------

REF_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
REF_MODULUS = 0b100101  # x^5 + x^2 + 1


def ref_mul(a: int, b: int) -> int:
    result = 0
    while b:
        if b & 1:
            result ^= a
        b >>= 1
        a <<= 1
        if a & 0b100000:
            a ^= REF_MODULUS
    return result


def ref_alpha_pow(i: int) -> int:
    result = 1
    for _ in range(i):
        result = ref_mul(result, 0b10)
    return result


def ref_syndrome(chars: str) -> int:
    total = 0
    for i, ch in enumerate(chars):
        total ^= ref_mul(ref_alpha_pow(i), REF_ALPHABET.index(ch))
    return total


def ref_check_char(data13: str) -> str:
    matches = [c for c in REF_ALPHABET if ref_syndrome(data13 + c) == 0]
    assert len(matches) == 1
    return matches[0]


def ref_flat_id(key: bytes) -> str:
    data = base64.b32encode(key).decode("ascii").rstrip("=")
    assert len(data) == 52
    return "".join(data[i : i + 13] + ref_check_char(data[i : i + 13]) for i in range(0, 52, 13))


def ref_node_id(key: bytes) -> str:
    flat = ref_flat_id(key)
    return "-".join(flat[i : i + 7] for i in range(0, 56, 7))


def flat(node_id: NodeId) -> str:
    return str(node_id).replace("-", "")


def check_group_span(pos: int) -> tuple[int, int]:
    """1-based (first, last) character range of the check group holding ``pos``."""
    g = (pos - 1) // CHECK_GROUP_LENGTH
    return g * CHECK_GROUP_LENGTH + 1, (g + 1) * CHECK_GROUP_LENGTH


def contains(span: tuple[int, int] | None, pos: int) -> bool:
    assert span is not None
    return span[0] <= pos <= span[1]


keys = st.binary(min_size=KEY_LENGTH, max_size=KEY_LENGTH)

# ---------------------------------------------------------------------------
# Published test vectors
# ---------------------------------------------------------------------------

# Hand check of the all-0xff vector's first check character ('J' = 9 = x^3 + 1).
# With x^5 = x^2 + 1: alpha^0..alpha^12 = 00001 00010 00100 01000 10000 00101
# 01010 10100 01101 11010 10001 00111 01110, whose XOR is 01011 = x^3 + x + 1.
# Each data char is '7' = 31 = x^4+x^3+x^2+x+1, so sum_{i<13} alpha^i * 31 =
# (x^4+x^3+x^2+x+1)(x^3+x+1) = x^7+x^6+x^4+x^3+1 = x^2+x+1 after reduction.
# The check c must satisfy alpha^13 * c = x^2+x+1; alpha^13 = 11100 and
# alpha^13 * (x^3 + 1) = alpha^16 + alpha^13 = 11011 ^ 11100 = 00111. So c = 'J'.
# Groups 1-3 are identical ("7"*13 + "J"); group 4 ends in 'Q' (the 4 zero
# padding bits) and its check is '4'. The all-zero key trivially checks to 'A'.
VECTORS = [
    (bytes(32), "AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA"),
    (bytes(range(32)), "AAAQEAY-EAUDAOB-CAJBIFQ-YDIOB4I-IBCEQTC-QKRMFYL-YDENBWH-A5DYPQG"),
    (b"\xff" * 32, "7777777-777777J-7777777-777777J-7777777-777777J-7777777-77777Q4"),
]


@pytest.mark.parametrize(("key", "expected"), VECTORS)
def test_published_vectors(key: bytes, expected: str) -> None:
    assert ref_node_id(key) == expected
    node_id = NodeId.from_key(key)
    assert str(node_id) == expected
    assert NodeId.parse(expected) == node_id
    assert parse_node_id(expected).key == key
    assert node_id.short == expected[:7]


def test_reference_matches_module_arithmetic_for_all_check_values() -> None:
    # Every check value 0..31 is reachable; the reference agrees on each.
    seen: set[str] = set()
    for b in range(256):
        key = bytes([b]) * KEY_LENGTH
        assert str(NodeId.from_key(key)) == ref_node_id(key)
        seen.update(flat(NodeId.from_key(key))[13::14])
    assert len(seen) > 16


@given(keys)
def test_matches_reference(key: bytes) -> None:
    assert str(NodeId.from_key(key)) == ref_node_id(key)


# ---------------------------------------------------------------------------
# Format and API
# ---------------------------------------------------------------------------


@given(keys)
def test_format_shape(key: bytes) -> None:
    text = str(NodeId.from_key(key))
    groups = text.split("-")
    assert len(groups) == DISPLAY_GROUP_COUNT == 8
    assert all(len(g) == DISPLAY_GROUP_LENGTH == 7 for g in groups)
    assert set(text.replace("-", "")) <= set(ALPHABET)
    assert len(text.replace("-", "")) == ID_LENGTH == 56
    # The last data character carries the 4 zero padding bits.
    assert text.replace("-", "")[54] in "AQ"


def test_from_key_validates_length() -> None:
    for n in (0, 1, 31, 33, 64):
        with pytest.raises(NodeIdError, match=r"32 bytes"):
            NodeId.from_key(bytes(n))
    with pytest.raises(NodeIdError):
        NodeId(bytes(31))


def test_from_key_accepts_bytearray_and_rejects_str() -> None:
    key = bytes(range(32))
    assert NodeId.from_key(bytearray(key)) == NodeId.from_key(key)
    assert isinstance(NodeId.from_key(bytearray(key)).key, bytes)
    with pytest.raises(TypeError):
        NodeId(bytearray(key))  # type: ignore[arg-type]


def test_frozen_hashable_and_repr() -> None:
    a = NodeId.from_key(bytes(range(32)))
    b = NodeId.from_key(bytes(range(32)))
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.key = bytes(32)  # type: ignore[misc]
    assert str(a) in repr(a)
    assert NodeIdError("x").position is None
    assert issubclass(NodeIdError, ValueError)


# ---------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------


@given(keys)
def test_round_trip(key: bytes) -> None:
    node_id = NodeId.from_key(key)
    assert node_id.key == key
    assert NodeId.parse(str(node_id)) == node_id
    assert parse_node_id(str(node_id)) == node_id


@given(keys, st.data())
def test_round_trip_tolerant_input(key: bytes, data: st.DataObject) -> None:
    node_id = NodeId.from_key(key)
    text = str(node_id)
    bare = text.replace("-", "")
    assert NodeId.parse(text.lower()) == node_id
    assert NodeId.parse(bare) == node_id
    assert NodeId.parse(bare.lower()) == node_id
    assert NodeId.parse(text.replace("-", " ")) == node_id
    assert NodeId.parse(f"  --{text}--  ") == node_id
    assert NodeId.parse(" ".join(bare[i : i + 4] for i in range(0, 56, 4))) == node_id
    # Arbitrary separators and per-character case.
    pieces = []
    for ch in bare:
        pieces.append(data.draw(st.text(alphabet=" -", max_size=3)))
        pieces.append(ch.lower() if data.draw(st.booleans()) else ch)
    assert NodeId.parse("".join(pieces)) == node_id


# ---------------------------------------------------------------------------
# Error detection
# ---------------------------------------------------------------------------


def substitute(text: str, pos: int, ch: str) -> str:
    """Replace the 1-based character ``pos`` of a flat ID."""
    return text[: pos - 1] + ch + text[pos:]


def assert_substitution_detected(bare: str, pos: int, ch: str) -> None:
    with pytest.raises(NodeIdError, match="check failed") as info:
        NodeId.parse(substitute(bare, pos, ch))
    assert info.value.position == check_group_span(pos)


def assert_all_substitutions_detected(key: bytes) -> None:
    bare = flat(NodeId.from_key(key))
    for pos in range(1, ID_LENGTH + 1):
        for ch in ALPHABET:
            if ch != bare[pos - 1]:
                assert_substitution_detected(bare, pos, ch)


def assert_all_adjacent_swaps_detected(key: bytes) -> None:
    bare = flat(NodeId.from_key(key))
    for i in range(ID_LENGTH - 1):  # 55 adjacent pairs
        if bare[i] == bare[i + 1]:
            continue
        swapped = bare[:i] + bare[i + 1] + bare[i] + bare[i + 2 :]
        with pytest.raises(NodeIdError, match="check failed") as info:
            NodeId.parse(swapped)
        assert contains(info.value.position, i + 1)
        assert contains(info.value.position, i + 2)


FIXED_KEYS = [key for key, _ in VECTORS] + [bytes(range(255, 223, -1)), bytes([0x5A] * 32)]


@pytest.mark.parametrize("key", FIXED_KEYS)
def test_every_substitution_detected_exhaustive(key: bytes) -> None:
    assert_all_substitutions_detected(key)


@settings(max_examples=20, deadline=None)
@given(keys)
def test_every_substitution_detected_random_keys(key: bytes) -> None:
    assert_all_substitutions_detected(key)


@given(keys, st.integers(1, ID_LENGTH), st.sampled_from(ALPHABET))
def test_sampled_substitution_detected(key: bytes, pos: int, ch: str) -> None:
    bare = flat(NodeId.from_key(key))
    if ch != bare[pos - 1]:
        assert_substitution_detected(bare, pos, ch)
        # Also when typed in lower case with the display dashes.
        text = substitute(bare, pos, ch).lower()
        grouped = "-".join(text[i : i + 7] for i in range(0, 56, 7))
        with pytest.raises(NodeIdError) as info:
            NodeId.parse(grouped)
        assert info.value.position == check_group_span(pos)


@pytest.mark.parametrize("key", FIXED_KEYS)
def test_every_adjacent_swap_detected_fixed(key: bytes) -> None:
    assert_all_adjacent_swaps_detected(key)


@given(keys)
def test_every_adjacent_swap_detected(key: bytes) -> None:
    assert_all_adjacent_swaps_detected(key)


def test_swap_across_check_group_boundary_reports_both_groups() -> None:
    bare = flat(NodeId.from_key(bytes(range(32))))
    assert bare[13] != bare[14]
    swapped = bare[:13] + bare[14] + bare[13] + bare[15:]
    with pytest.raises(NodeIdError) as info:
        NodeId.parse(swapped)
    assert info.value.position == (1, 28)
    assert "characters 1-14 (groups 1-2)" in str(info.value)
    assert "characters 15-28 (groups 3-4)" in str(info.value)


def test_check_failure_message() -> None:
    bare = flat(NodeId.from_key(bytes(range(32))))
    wrong = "B" if bare[19] != "B" else "C"
    with pytest.raises(NodeIdError) as info:
        NodeId.parse(substitute(bare, 20, wrong))
    assert str(info.value) == (
        "check failed in characters 15-28 (groups 3-4): "
        "a character is mistyped or two neighbours are swapped"
    )
    assert info.value.position == (15, 28)


# ---------------------------------------------------------------------------
# Other errors
# ---------------------------------------------------------------------------

GOOD = VECTORS[1][1]


@pytest.mark.parametrize("n", [0, 1, 55, 57, 60, 112])
def test_wrong_length(n: int) -> None:
    bare = GOOD.replace("-", "")
    text = (bare * 2)[:n]
    with pytest.raises(NodeIdError) as info:
        NodeId.parse(text)
    message = str(info.value)
    assert "56 characters" in message
    assert f"but {n} were given" in message
    assert info.value.position is None


def test_wrong_length_ignores_separators_in_count() -> None:
    with pytest.raises(NodeIdError, match="but 55 were given"):
        NodeId.parse(GOOD[:-1])


@pytest.mark.parametrize("bad", ["0", "1", "8", "9", "!", "_", ".", "\t", "\n", "é", "Ä"])
def test_invalid_character_named_with_position(bad: str) -> None:
    # Position counts significant characters only: GOOD[10] is character 10.
    text = GOOD[:10] + bad + GOOD[11:]
    assert GOOD[7] == "-"
    with pytest.raises(NodeIdError) as info:
        NodeId.parse(text)
    assert info.value.position == (10, 10)
    message = str(info.value)
    assert repr(bad) in message
    assert "character 10 (group 2)" in message


def test_invalid_character_reported_before_length() -> None:
    with pytest.raises(NodeIdError) as info:
        NodeId.parse("AB1")
    assert info.value.position == (3, 3)
    assert "'1'" in str(info.value)


def test_unicode_case_folding_is_not_applied() -> None:
    # U+0131 (dotless i) upper-cases to 'I' and U+017F (long s) to 'S'; neither is accepted.
    for bad in ("\u0131", "\u017f"):
        text = "A" * 9 + bad + "A" * 46
        with pytest.raises(NodeIdError, match="invalid character") as info:
            NodeId.parse(text)
        assert info.value.position == (10, 10)


def make_unpadded(last_data_char: str) -> str:
    """A 56-char ID whose check characters are all valid but whose padding is not zero."""
    data = "A" * 51 + last_data_char
    return "".join(data[i : i + 13] + ref_check_char(data[i : i + 13]) for i in range(0, 52, 13))


@pytest.mark.parametrize("last", [c for c in ALPHABET if c not in "AQ"])
def test_nonzero_padding_bits_rejected(last: str) -> None:
    text = make_unpadded(last)
    assert ref_syndrome(text[42:56]) == 0
    with pytest.raises(NodeIdError, match="padding bits must be zero") as info:
        NodeId.parse(text)
    assert info.value.position == (55, 55)


@pytest.mark.parametrize("last", ["A", "Q"])
def test_zero_padding_bits_accepted(last: str) -> None:
    node_id = NodeId.parse(make_unpadded(last))
    assert flat(node_id) == make_unpadded(last)
    assert node_id.key == (b"\x00" * 31 + (b"\x01" if last == "Q" else b"\x00"))
