"""What travels inside an established link: small typed frames, ``kind byte || data``.

The link already authenticates, orders and bounds every frame, and each kind's data is itself
a strictly decoded structure (a sealed envelope, a signed receipt), so the frame needs no more
than one byte to say which. Pure encoding and strict decoding; the meaning of each kind is the
node service's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from p2pnode.codec import DecodeError
from p2pnode.link.connection import MAX_FRAME_PAYLOAD

#: Overhead of the wrapping: the kind byte.
_OVERHEAD: Final = 1
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
    return bytes((kind,)) + data


def decode_frame(payload: bytes) -> Frame:
    """Decode a frame strictly.

    Raises:
        DecodeError: for an empty or oversized frame, or an unknown kind.
    """
    if not payload:
        raise DecodeError("frame: empty")
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise DecodeError(f"frame: {len(payload)} bytes exceeds {MAX_FRAME_PAYLOAD}")
    kind = payload[0]
    if kind not in _KINDS:
        raise DecodeError(f"frame: unknown kind {kind}")
    return Frame(FrameKind(kind), bytes(payload[1:]))


_KINDS: Final = frozenset(int(kind) for kind in FrameKind)
