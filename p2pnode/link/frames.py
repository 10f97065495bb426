"""What travels inside an established link: small typed frames, ``[kind, data]`` in CBOR.

Pure encoding and strict decoding; the meaning of each kind is the node service's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from p2pnode import codec
from p2pnode.codec import DecodeError
from p2pnode.link.connection import MAX_FRAME_PAYLOAD

#: Overhead of the ``[kind, data]`` wrapping: array, small int and a byte-string header.
_OVERHEAD: Final = 8
#: Largest data a frame can carry.
MAX_FRAME_DATA: Final = MAX_FRAME_PAYLOAD - _OVERHEAD


class FrameKind(enum.IntEnum):
    """The kinds of frame."""

    ENVELOPE = 1  # a sealed message envelope
    RECEIPT = 2  # a signed receipt for a message we received
    PING = 3  # keepalive; answered with PONG
    PONG = 4


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    kind: FrameKind
    data: bytes


def encode_frame(kind: FrameKind, data: bytes = b"") -> bytes:
    """Encode a frame.

    Raises:
        ValueError: if ``data`` exceeds :data:`MAX_FRAME_DATA`.
    """
    if len(data) > MAX_FRAME_DATA:
        raise ValueError(f"frame data of {len(data)} bytes exceeds {MAX_FRAME_DATA}")
    return codec.encode([int(kind), data])


def decode_frame(payload: bytes) -> Frame:
    """Decode a frame strictly.

    Raises:
        DecodeError: for anything but ``[known kind, bytes]`` within the size limit.
    """
    value = codec.decode(payload, max_size=MAX_FRAME_PAYLOAD)
    if type(value) is not list or len(value) != 2:
        raise DecodeError("frame: expected [kind, data]")
    kind, data = value
    if type(kind) is not int or kind not in FrameKind._value2member_map_:
        raise DecodeError(f"frame: unknown kind {kind!r}")
    if type(data) is not bytes:
        raise DecodeError("frame: data is not a byte string")
    return Frame(FrameKind(kind), data)
