"""Strict, canonical CBOR: the one way p2pnode encodes and decodes its own structures.

cbor2 on its own is lenient: it accepts trailing bytes (``loads(b"\\x01\\xff") == 1``), duplicate
map keys, indefinite-length items and non-minimal integer encodings, any of which lets two
different byte strings mean the same value (a problem for anything signed) or lets a peer smuggle
data past a check. :func:`decode` accepts an input only if it is *exactly* the canonical encoding
(RFC 8949 section 4.2.1, as produced by :func:`encode`) of a value built from the types in
:data:`ALLOWED_TYPES`, within the size and depth bounds below. Everything else raises
:class:`DecodeError` with a reason; no other exception escapes.

Structures are then checked field by field with :class:`Field` schemas (:func:`check_map`,
:func:`decode_map`), so a handler never sees a field of the wrong type or length.

Signed structures are signed over their canonical encoding (:func:`encode`), and since a decoded
input is canonical, the bytes received are the bytes that were signed.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2

#: Largest input :func:`decode` accepts unless a caller asks for less. Every structure we define
#: (the largest is a sealed message of at most 64 KiB of body) fits well within this; a caller
#: decoding small structures (records, receipts) passes its own tighter bound.
MAX_INPUT_SIZE: Final = 256 * 1024

#: Deepest nesting accepted. Our structures nest at most three levels (a record's address list
#: of [host, port] pairs inside the record map inside a signed pair); 8 leaves room without
#: letting a hostile input recurse deeply.
MAX_DEPTH: Final = 8

#: Python types a decoded value may be built from. No floats (nothing we define needs them and
#: they have several encodings), no tags (datetimes, bignums, ...), no undefined.
ALLOWED_TYPES: Final = (int, bytes, str, bool, type(None), list, dict)

_FLAT_TYPES: Final = (bytes, str, bool, type(None))

#: Integers must fit in CBOR's major types 0/1 (64-bit); larger ones would need bignum tags.
_INT_LIMIT: Final = 2**64


class DecodeError(ValueError):
    """Raised for any input that is not a well-formed, canonical, in-bounds p2pnode structure.

    ``reason`` is a short human-readable explanation suitable for logs and counters.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(value: Any) -> bytes:
    """Encode ``value`` canonically (sorted map keys, shortest forms, definite lengths).

    Args:
        value: a value built from :data:`ALLOWED_TYPES` (dict keys are usually ``str``).

    Returns:
        The canonical CBOR bytes; equal values always give equal bytes.

    Raises:
        TypeError: if ``value`` contains a type outside :data:`ALLOWED_TYPES` (a programming
            error, not a peer's).
    """
    if type(value) is not dict or any(type(v) in (list, dict) for v in value.values()):
        _check_types(value, 0, for_encode=True)
    else:
        # A flat map, the hot case (envelopes, receipts): one pass over its values.
        for key, item in value.items():
            kind = type(item)
            if type(key) is not str or (
                kind not in _FLAT_TYPES and not (kind is int and -_INT_LIMIT <= item < _INT_LIMIT)
            ):
                _check_types(value, 0, for_encode=True)
                break
    return cbor2.dumps(value, canonical=True)


def _reject_tag(decoder: object, tag: object) -> object:
    raise DecodeError("CBOR tags are not allowed")


def decode(data: bytes, *, max_size: int = MAX_INPUT_SIZE) -> Any:
    """Decode one canonical CBOR item that makes up the whole of ``data``.

    Args:
        data: the untrusted input.
        max_size: inputs longer than this are rejected before any parsing.

    Returns:
        The decoded value, built only from :data:`ALLOWED_TYPES`.

    Raises:
        DecodeError: for oversized input, malformed CBOR, trailing bytes, duplicate map keys,
            indefinite-length items, tags, floats, nesting deeper than :data:`MAX_DEPTH`, or any
            non-canonical encoding. Nothing else escapes, whatever the input.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"input of {len(data)} bytes exceeds the limit of {max_size}")
    if not data:
        raise DecodeError("empty input")
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_reject_tag,
            max_depth=MAX_DEPTH + 1,
            allow_indefinite=False,
            allow_duplicate_keys=False,
        )
        value = decoder.decode()
    except DecodeError:
        raise
    except cbor2.CBORDecodeError as exc:
        raise DecodeError(f"malformed CBOR: {_first_line(exc)}") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError, EOFError) as exc:
        raise DecodeError(f"malformed CBOR: {type(exc).__name__}: {_first_line(exc)}") from None
    if stream.tell() != len(data):
        raise DecodeError(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    try:
        _check_types(value, 0, for_encode=False)
    except TypeError as exc:
        raise DecodeError(str(exc)) from None
    if cbor2.dumps(value, canonical=True) != data:
        raise DecodeError("non-canonical CBOR encoding")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _check_types(value: Any, depth: int, *, for_encode: bool) -> None:
    if depth > MAX_DEPTH:
        if for_encode:
            raise TypeError(f"structure nests deeper than {MAX_DEPTH} levels")
        raise DecodeError(f"structure nests deeper than {MAX_DEPTH} levels")
    # bool is a subclass of int, and both are allowed; exact type checks keep out subclasses
    # such as IntEnum whose encoding would surprise a reader.
    kind = type(value)
    if kind is int:
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise TypeError("integer outside the 64-bit range")
        return
    if kind in (bytes, str, bool, type(None)):
        return
    if kind is list:
        for item in value:
            _check_types(item, depth + 1, for_encode=for_encode)
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(f"map key of type {type(key).__name__} is not allowed")
            _check_types(item, depth + 1, for_encode=for_encode)
        return
    raise TypeError(f"value of type {kind.__name__} is not allowed")


@dataclass(frozen=True)
class Field:
    """Schema of one field of a decoded map or array.

    ``kind`` is the exact Python type required (``int``, ``bytes``, ``str``, ``bool``,
    ``list``, ``dict``). For ``bytes``, ``str`` and ``list``, the length must lie within
    ``[min_len, max_len]`` (for ``str``, in UTF-8 bytes); for ``int``, the value must lie within
    ``[min_value, max_value]``. A list's items are checked against ``items`` when given.
    """

    kind: type
    min_len: int = 0
    max_len: int | None = None
    min_value: int | None = None
    max_value: int | None = None
    items: Field | None = None
    optional: bool = False

    def check(self, name: str, value: Any) -> None:
        """Raise :class:`DecodeError` naming ``name`` unless ``value`` matches this field."""
        actual: type = type(value)  # exact type: bool must not pass as int, nor int as bool
        if actual is not self.kind:
            raise DecodeError(
                f"field {name!r}: expected {self.kind.__name__}, got {actual.__name__}"
            )
        if self.kind in (bytes, str, list):
            size = len(value.encode()) if self.kind is str else len(value)
            if size < self.min_len or (self.max_len is not None and size > self.max_len):
                bound = (
                    f"exactly {self.min_len}"
                    if self.min_len == self.max_len
                    else f"between {self.min_len} and {self.max_len}"
                )
                raise DecodeError(f"field {name!r}: length {size}, expected {bound}")
        if self.kind is int:
            if self.min_value is not None and value < self.min_value:
                raise DecodeError(f"field {name!r}: {value} is below {self.min_value}")
            if self.max_value is not None and value > self.max_value:
                raise DecodeError(f"field {name!r}: {value} is above {self.max_value}")
        if self.items is not None:
            for index, item in enumerate(value):
                self.items.check(f"{name}[{index}]", item)


def check_map(value: Any, schema: Mapping[str, Field], *, what: str) -> dict[str, Any]:
    """Check that ``value`` is a map with exactly the fields of ``schema``.

    Unknown fields are rejected (a signed structure must mean exactly what was signed); missing
    fields are rejected unless marked ``optional``.

    Returns:
        ``value`` itself, typed as a ``dict[str, Any]``.

    Raises:
        DecodeError: naming ``what`` and the offending field.
    """
    if type(value) is not dict:
        raise DecodeError(f"{what}: expected a map, got {type(value).__name__}")
    unknown = [key for key in value if key not in schema]
    if unknown:
        raise DecodeError(f"{what}: unknown field {unknown[0]!r}")
    for name, field in schema.items():
        if name not in value:
            if field.optional:
                continue
            raise DecodeError(f"{what}: missing field {name!r}")
        try:
            field.check(name, value[name])
        except DecodeError as exc:
            raise DecodeError(f"{what}: {exc.reason}") from None
    return value


def decode_map(
    data: bytes, schema: Mapping[str, Field], *, what: str, max_size: int = MAX_INPUT_SIZE
) -> dict[str, Any]:
    """Strictly decode ``data`` (see :func:`decode`) and check it against ``schema``.

    Raises:
        DecodeError: for any failure, with ``what`` in the reason.
    """
    try:
        value = decode(data, max_size=max_size)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc.reason}") from None
    return check_map(value, schema, what=what)


def decode_signed(
    data: bytes, *, what: str, max_body: int, signature_size: int = 64
) -> tuple[bytes, bytes]:
    """Decode a signed pair ``[body, signature]`` where ``body`` is canonical CBOR bytes.

    Only the framing is checked here; the caller verifies the signature over its domain tag and
    ``body`` and then decodes ``body`` with its own schema.

    Returns:
        ``(body, signature)``.

    Raises:
        DecodeError: if ``data`` is not exactly a two-element array of a byte string of at most
            ``max_body`` bytes and a byte string of ``signature_size`` bytes.
    """
    try:
        value = decode(data, max_size=max_body + signature_size + 16)
    except DecodeError as exc:
        raise DecodeError(f"{what}: {exc.reason}") from None
    if type(value) is not list or len(value) != 2:
        raise DecodeError(f"{what}: expected a [body, signature] pair")
    body, signature = value
    Field(bytes, 1, max_body).check(f"{what} body", body)
    Field(bytes, signature_size, signature_size).check(f"{what} signature", signature)
    return body, signature
