"""One link between two nodes, sans-I/O: the SIGMA-I handshake, then secretstream frames.

Feed received bytes to :meth:`LinkConnection.receive_data`, send what
:meth:`LinkConnection.data_to_send` returns, and act on the events. Nothing here does I/O or
reads a clock; deadlines are the driver's (:mod:`p2pnode.link.driver`).

Records on the byte stream are ``u32 length || body``. The handshake (GUIDE section 3a)::

    1. I -> R: PROTOCOL_ID || e_I
    2. R -> I: e_R || header(R->I) || push({ik: IK_R, sig: S_R(resp-tag || e_I || e_R || IK_R)})
    3. I -> R: header(I->R) || push({ik: IK_I, sig: S_I(init-tag || e_I || e_R || IK_I || IK_R)})

Session keys come from ``crypto_kx`` over the ephemeral keys, one
``crypto_secretstream_xchacha20poly1305`` stream per direction; the identity proofs are the
first messages of each stream, so identities never cross in clear. The initiator aborts unless
the responder proves the identity it dialled. Signatures, not static Diffie-Hellman,
authenticate, so a stolen key does not let its thief impersonate others to its owner; the
ephemeral secrets are dropped once the keys are derived (forward secrecy).

After the handshake every record is one secretstream message: tampering, truncation, replay or
reordering makes ``pull`` fail, and the link closes with nothing of that record delivered. An
orderly close is a message tagged ``FINAL``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from p2pnode import codec, signing
from p2pnode.codec import DecodeError, Field

PROTOCOL_ID: Final = b"p2pnode-link/1\n"
KEY_SIZE: Final = 32
_LENGTH: Final = struct.Struct(">I")
_HEADER_SIZE: Final = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
_ABYTES: Final = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
_TAG_MESSAGE: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL: Final = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL

#: Largest frame payload. A sealed envelope is at most 64 KiB + 48 bytes; 80 KiB leaves room
#: for the frame's own encoding without letting a peer make us buffer more.
MAX_FRAME_PAYLOAD: Final = 80 * 1024
#: Largest record body on the wire: a payload plus the secretstream tag and MAC.
MAX_RECORD: Final = MAX_FRAME_PAYLOAD + _ABYTES
#: Largest identity proof (a 2-field map: 32-byte key, 64-byte signature).
_MAX_PROOF: Final = 160
_PROOF_SCHEMA: Final = {"ik": Field(bytes, KEY_SIZE, KEY_SIZE), "sig": Field(bytes, 64, 64)}


class Role(enum.Enum):
    """Who opened the TCP connection."""

    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    """Where the link is."""

    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True)
class Established:
    """The handshake completed; ``peer`` proved this identity key."""

    peer: bytes


@dataclass(frozen=True)
class FrameReceived:
    """An authenticated frame arrived, in order."""

    payload: bytes


@dataclass(frozen=True)
class Closed:
    """The link is over. ``error`` is False only for an orderly close by the peer or us."""

    reason: str
    error: bool


Event = Established | FrameReceived | Closed


class LinkStateError(RuntimeError):
    """A method was called in a state that does not allow it (our bug, not the peer's)."""


class LinkConnection:
    """The protocol state of one link.

    Args:
        role: whether we dialled (initiator) or accepted (responder).
        signing_key: our identity key.
        expected_peer: for an initiator, the identity key it dialled; the handshake fails
            unless the responder proves exactly this key. Ignored for a responder.
    """

    def __init__(
        self,
        role: Role,
        signing_key: nacl.signing.SigningKey,
        *,
        expected_peer: bytes | None = None,
    ) -> None:
        if role is Role.INITIATOR and (expected_peer is None or len(expected_peer) != KEY_SIZE):
            raise ValueError("an initiator must know the 32-byte identity key it dials")
        self.role = role
        self.state = State.HANDSHAKE
        self.peer: bytes | None = None
        self._key = signing_key
        self._own = bytes(signing_key.verify_key)
        self._expected = expected_peer
        self._buffer = bytearray()
        self._out = bytearray()
        self._eph_public, self._eph_secret = sodium.crypto_kx_keypair()
        self._peer_eph = b""
        self._push = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._pull = sodium.crypto_secretstream_xchacha20poly1305_state()
        self._step = 0  # handshake records processed
        self._pending_rx = b""  # the responder's receive key, until the initiator's header
        if role is Role.INITIATOR:
            self._record(PROTOCOL_ID + self._eph_public)

    @property
    def is_open(self) -> bool:
        """False once the link closed (either side, orderly or not)."""
        return self.state is not State.CLOSED

    # --- output -----------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer (the buffer is emptied)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_frame(self, payload: bytes) -> None:
        """Queue an encrypted frame.

        Raises:
            LinkStateError: unless the link is established.
            ValueError: if ``payload`` exceeds :data:`MAX_FRAME_PAYLOAD`.
        """
        if self.state is not State.ESTABLISHED:
            raise LinkStateError(f"cannot send a frame in state {self.state.value}")
        if len(payload) > MAX_FRAME_PAYLOAD:
            raise ValueError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_PAYLOAD}")
        self._record(sodium.crypto_secretstream_xchacha20poly1305_push(self._push, payload))

    def close(self) -> None:
        """Queue an orderly close (a FINAL frame when established) and stop accepting input."""
        if self.state is State.ESTABLISHED:
            self._record(
                sodium.crypto_secretstream_xchacha20poly1305_push(self._push, b"", tag=_TAG_FINAL)
            )
        self.state = State.CLOSED

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Process bytes from the peer; ``b""`` means the peer closed its side.

        Returns events in order. Any protocol violation ends with a :class:`Closed` event
        (``error=True``) and the state CLOSED; nothing after it is processed. Never raises for
        any input.
        """
        if self.state is State.CLOSED:
            return []
        if not data:
            self.state = State.CLOSED
            reason = "peer closed the connection" + (
                " mid-record" if self._buffer else " without an orderly close"
            )
            return [Closed(reason, error=True)]
        self._buffer += data
        events: list[Event] = []
        try:
            while self.is_open:
                body = self._next_record()
                if body is None:
                    break
                if self.state is State.ESTABLISHED:
                    events.extend(self._handle_frame(body))
                else:
                    events.extend(self._handle_handshake(body))
        except _Violation as exc:
            self.state = State.CLOSED
            self._buffer.clear()
            events.append(Closed(exc.reason, error=True))
        return events

    def _next_record(self) -> bytes | None:
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        limit = MAX_RECORD if self.state is State.ESTABLISHED else _HANDSHAKE_LIMIT
        if length > limit:
            # Refused before buffering: a peer cannot make us hold more than one record.
            raise _Violation(f"record of {length} bytes exceeds the limit of {limit}")
        if len(self._buffer) < _LENGTH.size + length:
            return None
        body = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
        del self._buffer[: _LENGTH.size + length]
        return body

    def _handle_frame(self, body: bytes) -> list[Event]:
        payload, tag = self._pull_message(body)
        if tag == _TAG_FINAL:
            self.state = State.CLOSED
            return [Closed("peer closed the link", error=False)]
        if tag != _TAG_MESSAGE:
            raise _Violation("unexpected stream tag")
        return [FrameReceived(payload)]

    def _pull_message(self, body: bytes) -> tuple[bytes, int]:
        try:
            payload, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._pull, body)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            raise _Violation(
                "a frame failed authentication (tampered, replayed or reordered)"
            ) from None
        return bytes(payload), tag

    # --- the handshake ------------------------------------------------------------------------

    def _handle_handshake(self, body: bytes) -> list[Event]:
        if self.role is Role.RESPONDER:
            if self._step == 0:
                self._responder_hello(body)
                self._step = 1
                return []
            return self._responder_finish(body)
        return self._initiator_finish(body)

    def _responder_hello(self, body: bytes) -> None:
        if len(body) != len(PROTOCOL_ID) + KEY_SIZE or not body.startswith(PROTOCOL_ID):
            raise _Violation("not a p2pnode link (bad protocol greeting)")
        self._peer_eph = body[len(PROTOCOL_ID) :]
        try:
            rx, tx = sodium.crypto_kx_server_session_keys(
                self._eph_public, self._eph_secret, self._peer_eph
            )
        except nacl.exceptions.CryptoError:
            raise _Violation("unusable ephemeral key") from None
        self._forget_ephemeral()
        header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._push, tx)
        self._pending_rx = rx
        transcript = self._peer_eph + self._eph_public + self._own
        proof = self._proof(signing.TAG_LINK_RESPONDER, transcript)
        sealed = sodium.crypto_secretstream_xchacha20poly1305_push(self._push, proof)
        self._record(self._eph_public + header + sealed)

    def _responder_finish(self, body: bytes) -> list[Event]:
        if len(body) <= _HEADER_SIZE:
            raise _Violation("handshake record too short")
        self._init_pull(body[:_HEADER_SIZE], self._pending_rx)
        proof, _ = self._pull_message(body[_HEADER_SIZE:])
        peer = self._check_proof(
            proof,
            signing.TAG_LINK_INITIATOR,
            lambda ik: self._peer_eph + self._eph_public + ik + self._own,
        )
        return self._establish(peer)

    def _initiator_finish(self, body: bytes) -> list[Event]:
        if len(body) <= KEY_SIZE + _HEADER_SIZE:
            raise _Violation("handshake record too short")
        self._peer_eph = body[:KEY_SIZE]
        header = body[KEY_SIZE : KEY_SIZE + _HEADER_SIZE]
        try:
            rx, tx = sodium.crypto_kx_client_session_keys(
                self._eph_public, self._eph_secret, self._peer_eph
            )
        except nacl.exceptions.CryptoError:
            raise _Violation("unusable ephemeral key") from None
        self._forget_ephemeral()
        self._init_pull(header, rx)
        proof, _ = self._pull_message(body[KEY_SIZE + _HEADER_SIZE :])
        peer = self._check_proof(
            proof,
            signing.TAG_LINK_RESPONDER,
            lambda ik: self._eph_public + self._peer_eph + ik,
        )
        if peer != self._expected:
            raise _Violation("the peer is not the node we dialled")
        own_header = sodium.crypto_secretstream_xchacha20poly1305_init_push(self._push, tx)
        transcript = self._eph_public + self._peer_eph + self._own + peer
        proof_out = self._proof(signing.TAG_LINK_INITIATOR, transcript)
        sealed = sodium.crypto_secretstream_xchacha20poly1305_push(self._push, proof_out)
        self._record(own_header + sealed)
        return self._establish(peer)

    def _establish(self, peer: bytes) -> list[Event]:
        self.peer = peer
        self.state = State.ESTABLISHED
        self._pending_rx = b""
        return [Established(peer)]

    def _init_pull(self, header: bytes, key: bytes) -> None:
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._pull, header, key)
        except (nacl.exceptions.CryptoError, ValueError):
            raise _Violation("bad stream header") from None

    def _proof(self, tag: bytes, transcript: bytes) -> bytes:
        return codec.encode({"ik": self._own, "sig": signing.sign(self._key, tag, transcript)})

    def _check_proof(
        self, proof: bytes, tag: bytes, transcript_for: Callable[[bytes], bytes]
    ) -> bytes:
        try:
            fields = codec.decode_map(
                proof, _PROOF_SCHEMA, what="identity proof", max_size=_MAX_PROOF
            )
        except DecodeError as exc:
            raise _Violation(exc.reason) from None
        peer: bytes = fields["ik"]
        if not signing.verify(peer, tag, transcript_for(peer), fields["sig"]):
            raise _Violation("the peer's identity proof does not verify")
        return peer

    def _forget_ephemeral(self) -> None:
        # The public half stays for the transcript; the secret goes (forward secrecy).
        self._eph_secret = b""

    def _record(self, body: bytes) -> None:
        self._out += _LENGTH.pack(len(body)) + body


#: Largest handshake record: e_R, a header and a sealed identity proof.
_HANDSHAKE_LIMIT: Final = KEY_SIZE + _HEADER_SIZE + _MAX_PROOF + _ABYTES


class _Violation(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
