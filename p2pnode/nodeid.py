"""Human-readable node IDs for 32-byte Ed25519 identity public keys.

A node ID is the identity public key written so that people can read it aloud,
type it and compare it, and so that typing mistakes are caught instead of
silently naming a different node.

Format
------
1. The 32-byte key (256 bits) is written in RFC 4648 base32 with the alphabet
   ``ABCDEFGHIJKLMNOPQRSTUVWXYZ234567`` and no ``=`` padding: 52 characters,
   most significant bit first.  52 * 5 = 260 bits, so the last of these
   characters carries 4 padding bits, which must be zero; an ID whose padding
   bits are not zero is rejected as non-canonical (otherwise 16 different
   strings would name the same key).  That character is therefore always
   ``A`` or ``Q``.
2. The 52 data characters are split into 4 check groups of 13, and each group
   gets one check character appended, giving 4 codewords of 14 characters
   (56 characters in all; the check characters are characters 14, 28, 42, 56).
3. The 56 characters are displayed as 8 groups of 7 joined by ``-``, so each
   check group is exactly two display groups::

       AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA-AAAAAAA

Check character
---------------
Let ``v(c)`` be the index of character ``c`` in the alphabet (0..31), read as
an element of the field GF(2^5) = GF(2)[x]/(x^5 + x^2 + 1), and let
``alpha = x``.  Because x^5 + x^2 + 1 is primitive, ``alpha`` has
multiplicative order 31, so ``alpha^0, ..., alpha^30`` are nonzero and pairwise
distinct.  The check character ``c_13`` of a codeword ``c_0 .. c_13`` is the
unique character with::

    S = sum_{i=0}^{13} alpha^i * v(c_i) = 0        (addition is XOR)

i.e. ``v(c_13) = alpha^-13 * sum_{i=0}^{12} alpha^i * v(c_i)``.

Why this detects every single mistyped character and every swap of two
neighbours (within one codeword, positions ``i, j < 14 <= 31``):

* Single substitution: position ``j`` changes from ``a`` to ``b != a``.  The
  sum changes by ``alpha^j * (a + b)``.  Both factors are nonzero and a field
  has no zero divisors, so ``S != 0``: detected.
* Swap of neighbours ``j, j+1`` holding ``a != b``: the sum changes by
  ``alpha^j * (a + b) + alpha^(j+1) * (a + b) = alpha^j * (1 + alpha) * (a + b)``.
  ``1 + alpha != 0`` because ``alpha != 1`` (the weights are distinct), and
  ``a + b != 0``, so ``S != 0``: detected.  (The same argument covers any
  transposition inside a codeword, since all 14 weights are distinct.)
* Swap across a check-group boundary (characters 14/15, 28/29, 42/43): each of
  the two codewords changes in exactly one character, which is a single
  substitution in each, so both checks fail: detected.

The code does not detect everything: e.g. two substitutions in the same check
group slip through for about 1 in 32 random pairs.  It is an error-detecting
code against typing mistakes, not a security mechanism: anyone can produce a
well-formed ID, and it says nothing about who holds the private key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = [
    "ALPHABET",
    "CHECK_GROUP_COUNT",
    "CHECK_GROUP_DATA_LENGTH",
    "CHECK_GROUP_LENGTH",
    "DATA_LENGTH",
    "DISPLAY_GROUP_COUNT",
    "DISPLAY_GROUP_LENGTH",
    "GROUP_SEPARATOR",
    "ID_LENGTH",
    "KEY_LENGTH",
    "PADDING_BITS",
    "NodeId",
    "NodeIdError",
    "parse_node_id",
]

#: RFC 4648 base32 alphabet; a character's index is its 5-bit value.
ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
#: Length in bytes of an Ed25519 public key.
KEY_LENGTH: Final = 32
#: Bits per character.
BITS_PER_CHAR: Final = 5
#: Base32 characters needed for the key (ceil(256 / 5)).
DATA_LENGTH: Final = 52
#: Zero bits at the low end of the last data character (52 * 5 - 256).
PADDING_BITS: Final = 4
#: Data characters protected by one check character.
CHECK_GROUP_DATA_LENGTH: Final = 13
#: Characters in one codeword: 13 data characters + 1 check character.
CHECK_GROUP_LENGTH: Final = CHECK_GROUP_DATA_LENGTH + 1
#: Number of check groups (codewords).
CHECK_GROUP_COUNT: Final = DATA_LENGTH // CHECK_GROUP_DATA_LENGTH
#: Significant characters in a node ID.
ID_LENGTH: Final = CHECK_GROUP_COUNT * CHECK_GROUP_LENGTH
#: Characters per display group.
DISPLAY_GROUP_LENGTH: Final = 7
#: Number of display groups.
DISPLAY_GROUP_COUNT: Final = ID_LENGTH // DISPLAY_GROUP_LENGTH
#: Separator placed between display groups.
GROUP_SEPARATOR: Final = "-"

# Characters that parse() skips.  Deliberately only these two.
_IGNORED: Final = frozenset(" -")

# GF(2^5) with modulus x^5 + x^2 + 1 (0b100101); alpha = x has order 31.
_FIELD_ORDER: Final = 31
_MODULUS: Final = 0b100101

_DISPLAY_GROUPS_PER_CHECK_GROUP: Final = CHECK_GROUP_LENGTH // DISPLAY_GROUP_LENGTH

assert DATA_LENGTH * BITS_PER_CHAR == KEY_LENGTH * 8 + PADDING_BITS
assert CHECK_GROUP_COUNT * CHECK_GROUP_DATA_LENGTH == DATA_LENGTH
assert DISPLAY_GROUP_COUNT * DISPLAY_GROUP_LENGTH == ID_LENGTH
assert _DISPLAY_GROUPS_PER_CHECK_GROUP * DISPLAY_GROUP_LENGTH == CHECK_GROUP_LENGTH
assert CHECK_GROUP_LENGTH <= _FIELD_ORDER  # weights alpha^i must be pairwise distinct


def _build_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return (exp, log): exp[i] = alpha^i for i in 0..61, log[exp[i]] = i for i < 31."""
    exp: list[int] = []
    log = [0] * 32
    value = 1
    for i in range(_FIELD_ORDER):
        exp.append(value)
        log[value] = i
        value <<= 1
        if value & 0b100000:
            value ^= _MODULUS
    if value != 1 or len(set(exp)) != _FIELD_ORDER:  # pragma: no cover - static fact
        raise RuntimeError("x^5 + x^2 + 1 is not primitive")
    # Doubled so exp[log a + log b] needs no reduction modulo 31.
    return tuple(exp + exp), tuple(log)


_EXP, _LOG = _build_tables()

_DECODE: Final[dict[str, int]] = {
    **{ch: i for i, ch in enumerate(ALPHABET)},
    **{ch.lower(): i for i, ch in enumerate(ALPHABET) if ch.isalpha()},
}

_LOOKALIKES: Final[dict[str, str]] = {"0": "O", "1": "I or L", "8": "B"}


def _syndrome(values: list[int]) -> int:
    """Return sum_i alpha^i * values[i] in GF(2^5)."""
    total = 0
    for i, v in enumerate(values):
        if v:
            total ^= _EXP[_LOG[v] + i]
    return total


def _check_value(data: list[int]) -> int:
    """Return the check value making ``data + [check]`` a codeword (len(data) == 13)."""
    s = _syndrome(data)
    if s == 0:
        return 0
    # v13 = s * alpha^-13 = alpha^(log s - 13)
    return _EXP[(_LOG[s] - CHECK_GROUP_DATA_LENGTH) % _FIELD_ORDER]


def _key_to_values(key: bytes) -> list[int]:
    """Split the key into 52 5-bit values, most significant first, low padding zero."""
    number = int.from_bytes(key, "big") << PADDING_BITS
    mask = (1 << BITS_PER_CHAR) - 1
    return [(number >> (BITS_PER_CHAR * (DATA_LENGTH - 1 - i))) & mask for i in range(DATA_LENGTH)]


def _groups_label(first_char: int, last_char: int) -> str:
    """Describe 1-based character positions as a display-group range, e.g. 'groups 3-4'."""
    first_group = (first_char - 1) // DISPLAY_GROUP_LENGTH + 1
    last_group = (last_char - 1) // DISPLAY_GROUP_LENGTH + 1
    if first_group == last_group:
        return f"group {first_group}"
    return f"groups {first_group}-{last_group}"


class NodeIdError(ValueError):
    """A node ID (or key) is malformed.

    ``str(error)`` is a message meant for the person who typed the ID.
    ``position`` is ``(first, last)``, the 1-based range of significant
    characters (spaces and dashes not counted, so 1..56) where the problem was
    found, or ``None`` when it is not tied to a position (e.g. wrong length).
    """

    def __init__(self, message: str, position: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.position: tuple[int, int] | None = position


@dataclass(frozen=True, slots=True, repr=False)
class NodeId:
    """The identity of a node: a 32-byte Ed25519 public key and its printed form.

    Instances are immutable, hashable and compare equal exactly when the keys
    are equal.  ``str(node_id)`` is the canonical 56-character ID in 8 groups of
    7 separated by ``-``; :meth:`parse` accepts it back.

    Raises:
        TypeError: ``key`` is not ``bytes``.
        NodeIdError: ``key`` is not exactly 32 bytes long.
    """

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes):
            raise TypeError(f"node key must be bytes, not {type(self.key).__name__}")
        if len(self.key) != KEY_LENGTH:
            raise NodeIdError(
                f"node key must be {KEY_LENGTH} bytes (Ed25519 public key), got {len(self.key)}"
            )

    @classmethod
    def from_key(cls, key: bytes | bytearray | memoryview) -> NodeId:
        """Return the node ID of a 32-byte Ed25519 public key.

        ``bytearray`` and ``memoryview`` are copied into ``bytes``.

        Raises:
            NodeIdError: the key is not exactly 32 bytes long.
        """
        return cls(bytes(key))

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse a node ID as written by ``str(NodeId)``.

        Letters may be in either case; spaces and dashes anywhere are ignored
        (so grouping does not matter).  Every other character is rejected.
        After removing them exactly 56 characters must remain, all four check
        characters must match and the padding bits must be zero.

        Raises:
            NodeIdError: with a message naming the problem and, where it has
                one, ``position`` = 1-based (first, last) significant-character
                range.  Checked in this order: invalid character, length,
                check characters, padding bits.
        """
        values: list[int] = []
        for ch in text:
            if ch in _IGNORED:
                continue
            value = _DECODE.get(ch)
            if value is None:
                pos = len(values) + 1
                hint = _LOOKALIKES.get(ch)
                hint_text = f" (did you mean {hint}?)" if hint else ""
                raise NodeIdError(
                    f"invalid character {ch!r} at character {pos}"
                    f" ({_groups_label(pos, pos)}){hint_text}: node IDs use only"
                    " letters A-Z and digits 2-7 (spaces and dashes are ignored)",
                    (pos, pos),
                )
            values.append(value)

        if len(values) != ID_LENGTH:
            raise NodeIdError(
                f"a node ID has {ID_LENGTH} characters (not counting spaces and dashes),"
                f" but {len(values)} were given"
            )

        failed: list[tuple[int, int]] = []
        data: list[int] = []
        for g in range(CHECK_GROUP_COUNT):
            start = g * CHECK_GROUP_LENGTH
            codeword = values[start : start + CHECK_GROUP_LENGTH]
            if _syndrome(codeword) != 0:
                failed.append((start + 1, start + CHECK_GROUP_LENGTH))
            data.extend(codeword[:CHECK_GROUP_DATA_LENGTH])
        if failed:
            where = " and ".join(f"characters {a}-{b} ({_groups_label(a, b)})" for a, b in failed)
            raise NodeIdError(
                f"check failed in {where}: a character is mistyped or two neighbours are swapped",
                (failed[0][0], failed[-1][1]),
            )

        if data[-1] & ((1 << PADDING_BITS) - 1):
            pos = ID_LENGTH - 1  # the last data character sits just before the last check
            raise NodeIdError(
                f"character {pos} ({_groups_label(pos, pos)}) is not canonical: its low"
                f" {PADDING_BITS} padding bits must be zero, so it can only be"
                f" {ALPHABET[0]} or {ALPHABET[1 << PADDING_BITS]}",
                (pos, pos),
            )

        number = 0
        for v in data:
            number = (number << BITS_PER_CHAR) | v
        return cls((number >> PADDING_BITS).to_bytes(KEY_LENGTH, "big"))

    def __str__(self) -> str:
        """Return the canonical ID: 56 characters in 8 groups of 7 joined by '-'."""
        data = _key_to_values(self.key)
        chars: list[str] = []
        for g in range(CHECK_GROUP_COUNT):
            group = data[g * CHECK_GROUP_DATA_LENGTH : (g + 1) * CHECK_GROUP_DATA_LENGTH]
            chars.extend(ALPHABET[v] for v in group)
            chars.append(ALPHABET[_check_value(group)])
        flat = "".join(chars)
        return GROUP_SEPARATOR.join(
            flat[i : i + DISPLAY_GROUP_LENGTH] for i in range(0, ID_LENGTH, DISPLAY_GROUP_LENGTH)
        )

    def __repr__(self) -> str:
        return f"NodeId({str(self)!r})"

    @property
    def short(self) -> str:
        """The first display group (7 characters, 35 bits), for log lines.

        Convenient for telling nodes apart in logs; not unique and not to be
        used to identify or authenticate a node.
        """
        return str(self)[:DISPLAY_GROUP_LENGTH]


def parse_node_id(text: str) -> NodeId:
    """Parse a node ID; same contract as :meth:`NodeId.parse`."""
    return NodeId.parse(text)
