"""Frames inside a link: one kind byte and the data; strict decoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pnode.codec import DecodeError
from p2pnode.link.frames import MAX_FRAME_DATA, Frame, FrameKind, decode_frame, encode_frame


@given(st.sampled_from(list(FrameKind)), st.binary(max_size=2048))
def test_frames_round_trip(kind: FrameKind, data: bytes) -> None:
    assert decode_frame(encode_frame(kind, data)) == Frame(kind, data)


@given(st.binary(max_size=64))
def test_random_frames_decode_or_raise_decode_error(payload: bytes) -> None:
    try:
        frame = decode_frame(payload)
    except DecodeError:
        return
    assert encode_frame(frame.kind, frame.data) == payload


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"", "empty"), (b"\x00x", "unknown kind 0"), (b"\xffx", "unknown kind 255")],
)
def test_malformed_frames_are_refused(payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_frame(payload)


def test_frame_size_limit() -> None:
    assert (
        decode_frame(encode_frame(FrameKind.ENVELOPE, b"x" * MAX_FRAME_DATA)).data
        == b"x" * MAX_FRAME_DATA
    )
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(FrameKind.ENVELOPE, b"x" * (MAX_FRAME_DATA + 1))
    with pytest.raises(DecodeError, match="exceeds"):
        decode_frame(b"\x01" + b"x" * (MAX_FRAME_DATA + 1))
