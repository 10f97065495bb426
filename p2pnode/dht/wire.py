"""The rpcudp datagram format spoken by the kademlia package, decoded defensively.

A datagram is one type byte (``0x00`` request, ``0x01`` response), a 20-byte message id, and a
msgpack body: ``[method, [args...]]`` for a request, the return value for a response. This is
what ``rpcudp 5.0.1`` sends (with u-msgpack-python; we use the C ``msgpack`` package, which
reads and writes the same bytes), so stock ``kademlia`` nodes are our peers.

Decoding never trusts the peer: sizes are bounded before parsing, the msgpack parser's every
failure becomes :class:`WireError`, and each method's arguments and each reply's shape are
checked field by field (:func:`parse_request`, :func:`parse_reply`).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Final

import msgpack

REQUEST: Final = 0x00
RESPONSE: Final = 0x01
MSG_ID_SIZE: Final = 20
NODE_ID_SIZE: Final = 20
HEADER_SIZE: Final = 1 + MSG_ID_SIZE

#: rpcudp refuses to send a request body over 8 KiB; we refuse to accept one either.
MAX_REQUEST_BODY: Final = 8192
#: Largest datagram accepted. A reply carries at most k=20 contacts (about 40 bytes each) or one
#: peer record (at most 1 KiB); 16 KiB leaves room for stock peers' larger values while keeping
#: each datagram's parse cheap.
MAX_DATAGRAM_SIZE: Final = 16 * 1024
#: A contact list in a reply longer than this is hostile (honest peers send at most k).
MAX_CONTACTS_PER_REPLY: Final = 32
#: Longest method name we look at; ours are at most 10 characters.
MAX_METHOD_NAME: Final = 32


class Method(enum.Enum):
    """The RPCs of the kademlia package's protocol, which p2pnode answers."""

    PING = "ping"
    STORE = "store"
    FIND_NODE = "find_node"
    FIND_VALUE = "find_value"
    STUN = "stun"


class WireError(ValueError):
    """A datagram, request or reply that does not follow the protocol; ``reason`` is a short
    stable label for drop counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


Address = tuple[str, int]


@dataclass(frozen=True)
class Contact:
    """A DHT node as peers describe it: its 20-byte ID and UDP address."""

    node_id: bytes
    host: str
    port: int

    @property
    def address(self) -> Address:
        """The ``(host, port)`` pair to send datagrams to."""
        return (self.host, self.port)


@dataclass(frozen=True)
class Request:
    """A decoded request datagram (method and arguments not yet checked)."""

    msg_id: bytes
    method: str
    args: list[Any]


@dataclass(frozen=True)
class Response:
    """A decoded response datagram (shape not yet checked against the request)."""

    msg_id: bytes
    value: Any


@dataclass(frozen=True)
class ParsedRequest:
    """A request whose arguments were checked: the sender's claimed ID, and the key (for
    store and the finds) and value (for store)."""

    method: Method
    sender_id: bytes | None
    key: bytes | None = None
    value: Any = None


def encode_request(msg_id: bytes, method: Method, args: list[Any]) -> bytes:
    """Encode a request datagram.

    Raises:
        ValueError: if the body would exceed :data:`MAX_REQUEST_BODY` (our own bug).
    """
    body = bytes(msgpack.packb([method.value, args], use_bin_type=True))
    if len(body) > MAX_REQUEST_BODY:
        raise ValueError(f"request body of {len(body)} bytes exceeds {MAX_REQUEST_BODY}")
    return bytes([REQUEST]) + msg_id + body


def encode_response(msg_id: bytes, value: Any) -> bytes:
    """Encode a response datagram."""
    return bytes([RESPONSE]) + msg_id + bytes(msgpack.packb(value, use_bin_type=True))


def decode_datagram(data: bytes) -> Request | Response:
    """Decode one datagram's framing and msgpack body.

    Raises:
        WireError: for a short, oversized, unknown-type or unparsable datagram, or a request
            that is not ``[method, args]``. Nothing else escapes.
    """
    if len(data) < HEADER_SIZE + 1:
        raise WireError("too-short", f"{len(data)} bytes")
    if len(data) > MAX_DATAGRAM_SIZE:
        raise WireError("oversized", f"{len(data)} bytes")
    kind, msg_id, body = data[0], bytes(data[1:HEADER_SIZE]), data[HEADER_SIZE:]
    if kind not in (REQUEST, RESPONSE):
        raise WireError("unknown-type", f"type byte {kind:#04x}")
    if kind == REQUEST and len(body) > MAX_REQUEST_BODY:
        raise WireError("oversized", f"request body of {len(body)} bytes")
    value = _unpack(body)
    if kind == RESPONSE:
        return Response(msg_id, value)
    if not isinstance(value, list) or len(value) != 2:
        raise WireError("malformed-request", "not a [method, args] pair")
    method, args = value
    if not isinstance(method, str) or len(method) > MAX_METHOD_NAME:
        raise WireError("malformed-request", "method is not a short string")
    if not isinstance(args, list):
        raise WireError("malformed-request", "arguments are not a list")
    return Request(msg_id, method, args)


def _unpack(body: bytes) -> Any:
    try:
        # Byte strings as bytes, text as str, arrays as lists: what rpcudp's u-msgpack-python
        # produces. Every length is bounded by the (already bounded) input.
        return msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    # msgpack is a C parser fed hostile bytes: besides its documented UnpackException it
    # raises ValueError, TypeError, StackError (deep nesting) and ExtraData.
    except Exception as exc:  # noqa: BLE001
        raise WireError("malformed-msgpack", type(exc).__name__) from None


def _node_id(value: Any, what: str, reason: str = "bad-argument") -> bytes:
    if not isinstance(value, bytes) or len(value) != NODE_ID_SIZE:
        raise WireError(reason, f"{what} is not a {NODE_ID_SIZE}-byte ID")
    return value


def parse_request(request: Request, *, max_value_size: int) -> ParsedRequest:
    """Check a request's method and arguments.

    Args:
        request: from :func:`decode_datagram`.
        max_value_size: largest value a store request may carry.

    Raises:
        WireError: ``unknown-method`` or ``bad-argument``, naming what is wrong.
    """
    try:
        method = Method(request.method)
    except ValueError:
        raise WireError("unknown-method", repr(request.method)[:40]) from None
    args = request.args
    expected = {Method.PING: 1, Method.STORE: 3, Method.FIND_NODE: 2, Method.FIND_VALUE: 2}
    if method is Method.STUN:
        if args:
            raise WireError("bad-argument", "stun takes no arguments")
        return ParsedRequest(method, None)
    if len(args) != expected[method]:
        raise WireError("bad-argument", f"{method.value} takes {expected[method]} arguments")
    sender_id = _node_id(args[0], "sender ID")
    if method is Method.PING:
        return ParsedRequest(method, sender_id)
    key = _node_id(args[1], "key")
    if method is Method.STORE:
        value = args[2]
        if not isinstance(value, bytes) or len(value) > max_value_size:
            raise WireError("bad-argument", f"stored value is not bytes of <= {max_value_size}")
        return ParsedRequest(method, sender_id, key, value)
    return ParsedRequest(method, sender_id, key)


def parse_contacts(value: Any) -> list[Contact]:
    """Check a find_node/find_value reply listing contacts ``[[id, host, port], ...]``.

    Raises:
        WireError: ``bad-reply`` if any entry is malformed or there are too many.
    """
    if not isinstance(value, list) or len(value) > MAX_CONTACTS_PER_REPLY:
        raise WireError("bad-reply", "contacts are not a list of at most 32")
    return [parse_contact(entry) for entry in value]


def parse_contact(entry: Any) -> Contact:
    """Check one ``[id, host, port]`` contact entry.

    Raises:
        WireError: ``bad-reply`` naming what is wrong.
    """
    if not isinstance(entry, list) or len(entry) != 3:
        raise WireError("bad-reply", "contact is not [id, host, port]")
    node_id, host, port = entry
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
        raise WireError("bad-reply", "contact ID is not 20 bytes")
    if not isinstance(host, str) or not _is_ip(host):
        raise WireError("bad-reply", "contact host is not an IP address")
    if type(port) is not int or not 1 <= port <= 65535:
        raise WireError("bad-reply", "contact port out of range")
    return Contact(node_id, host, port)


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    if len(host) > 45:  # the longest IPv6 text form
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_reply(method: Method, value: Any, *, max_value_size: int) -> Any:
    """Check a reply's shape against the method it answers.

    Returns:
        ``ping``: the responder's 20-byte ID. ``store``: a bool. ``find_node``: a list of
        :class:`Contact`. ``find_value``: either a list of :class:`Contact` or the found
        value as ``bytes``. ``stun``: the ``(host, port)`` the responder saw.

    Raises:
        WireError: ``bad-reply`` naming what is wrong.
    """
    if method is Method.PING:
        return _node_id(value, "ping reply", "bad-reply")
    if method is Method.STORE:
        if not isinstance(value, bool):
            raise WireError("bad-reply", "store reply is not a bool")
        return value
    if method is Method.FIND_VALUE and isinstance(value, dict):
        found = value.get("value")
        if len(value) != 1 or not isinstance(found, bytes) or len(found) > max_value_size:
            raise WireError("bad-reply", "find_value reply is not {'value': bytes}")
        return found
    if method in (Method.FIND_NODE, Method.FIND_VALUE):
        return parse_contacts(value)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or type(value[1]) is not int
    ):
        raise WireError("bad-reply", "stun reply is not [host, port]")
    return (value[0], value[1])
