"""The sans-I/O link: SIGMA-I handshake, then secretstream frames, driven with plain bytes.

Two :class:`LinkConnection` objects talk through :func:`pump`; hand-built peers (using
``nacl.bindings`` directly, as GUIDE section 3a describes the wire) play the attacker where a
real connection would refuse to misbehave.
"""

from __future__ import annotations

import struct

import nacl.bindings as sodium
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode import codec, signing
from p2pnode.link.connection import (
    MAX_FRAME_PAYLOAD,
    MAX_RECORD,
    PROTOCOL_ID,
    Closed,
    Established,
    Event,
    FrameReceived,
    LinkConnection,
    LinkStateError,
    Role,
)

ALICE = nacl.signing.SigningKey.generate()
BOB = nacl.signing.SigningKey.generate()
MALLORY = nacl.signing.SigningKey.generate()
ALICE_IK = bytes(ALICE.verify_key)
BOB_IK = bytes(BOB.verify_key)
MALLORY_IK = bytes(MALLORY.verify_key)

_LEN = struct.Struct(">I")
_HEADER = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES


# --- helpers -------------------------------------------------------------------------------


def framed(body: bytes) -> bytes:
    """One wire record: u32 big-endian length, then the body."""
    return _LEN.pack(len(body)) + body


def records(data: bytes) -> list[bytes]:
    """Split a byte stream into its whole records (length prefix included)."""
    out = []
    while data:
        (length,) = _LEN.unpack_from(data)
        out.append(data[: _LEN.size + length])
        data = data[_LEN.size + length :]
    return out


def feed(conn: LinkConnection, data: bytes, chunk: int | None = None) -> list[Event]:
    """Deliver ``data`` (never as the EOF marker ``b""``), optionally in ``chunk``-byte pieces."""
    if not data:
        return []
    step = chunk or len(data)
    events: list[Event] = []
    for i in range(0, len(data), step):
        events.extend(conn.receive_data(data[i : i + step]))
    return events


def pump(
    a: LinkConnection,
    b: LinkConnection,
    *,
    chunk: int | None = None,
    wire: list[bytes] | None = None,
) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until both sides are quiet; return (events of a, events of b)."""
    events_a: list[Event] = []
    events_b: list[Event] = []
    while True:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        if not out_a and not out_b:
            return events_a, events_b
        if wire is not None:
            wire.extend(x for x in (out_a, out_b) if x)
        events_b += feed(b, out_a, chunk)
        events_a += feed(a, out_b, chunk)


def feed_and_take(conn: LinkConnection, data: bytes) -> bytes:
    assert feed(conn, data) == []
    return conn.data_to_send()


def new_pair(
    responder_key: nacl.signing.SigningKey = BOB, dialled: bytes = BOB_IK
) -> tuple[LinkConnection, LinkConnection]:
    initiator = LinkConnection(Role.INITIATOR, ALICE, expected_peer=dialled)
    responder = LinkConnection(Role.RESPONDER, responder_key)
    return initiator, responder


def established_pair() -> tuple[LinkConnection, LinkConnection]:
    initiator, responder = new_pair()
    ev_i, ev_r = pump(initiator, responder)
    assert ev_i == [Established(BOB_IK)]
    assert ev_r == [Established(ALICE_IK)]
    return initiator, responder


def one_frame(sender: LinkConnection, payload: bytes) -> bytes:
    """The wire record carrying ``payload``."""
    sender.send_frame(payload)
    out = sender.data_to_send()
    assert len(records(out)) == 1
    return out


def kinds(events: list[Event]) -> list[type]:
    return [type(e) for e in events]


def assert_closed_with_error(events: list[Event], conn: LinkConnection) -> Closed:
    """Exactly one event, an error close, and nothing was delivered."""
    assert len(events) == 1, events
    (event,) = events
    assert isinstance(event, Closed)
    assert event.error
    assert not conn.is_open
    return event


def greeting_key(greeting: bytes) -> bytes:
    """The initiator's ephemeral key from its first record."""
    (body,) = (r[_LEN.size :] for r in records(greeting))
    assert body.startswith(PROTOCOL_ID)
    return body[len(PROTOCOL_ID) :]


def open_push(key: bytes) -> tuple[sodium.crypto_secretstream_xchacha20poly1305_state, bytes]:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = sodium.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    return state, header


def proof(signer: nacl.signing.SigningKey, tag: bytes, transcript: bytes, ik: bytes) -> bytes:
    return codec.encode({"ik": ik, "sig": signer.sign(tag + transcript).signature})


def hand_msg2(
    e_i: bytes,
    signer: nacl.signing.SigningKey = BOB,
    *,
    tag: bytes = signing.TAG_LINK_RESPONDER,
    ik: bytes | None = None,
    sealed_proof: bytes | None = None,
) -> tuple[bytes, bytes, bytes]:
    """Play the responder by hand: return (msg2 record, our e_R, our receive key).

    By default the proof is the honest one; ``tag``/``ik``/``sealed_proof`` forge it.
    """
    e_pk, e_sk = sodium.crypto_kx_keypair()
    rx, tx = sodium.crypto_kx_server_session_keys(e_pk, e_sk, e_i)
    state, header = open_push(tx)
    claimed = ik if ik is not None else bytes(signer.verify_key)
    if sealed_proof is None:
        sealed_proof = proof(signer, tag, e_i + e_pk + claimed, claimed)
    sealed = sodium.crypto_secretstream_xchacha20poly1305_push(state, sealed_proof)
    return framed(e_pk + header + sealed), e_pk, rx


def hand_dial(responder: LinkConnection) -> tuple[bytes, bytes, bytes, bytes]:
    """Play the initiator by hand against a real responder up to its msg2.

    Returns (e_I, e_R, our send key, the responder's decrypted identity proof).
    """
    e_pk, e_sk = sodium.crypto_kx_keypair()
    assert feed(responder, framed(PROTOCOL_ID + e_pk)) == []
    (msg2,) = records(responder.data_to_send())
    body = msg2[_LEN.size :]
    e_r, header, sealed = body[:32], body[32 : 32 + _HEADER], body[32 + _HEADER :]
    rx, tx = sodium.crypto_kx_client_session_keys(e_pk, e_sk, e_r)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, rx)
    responder_proof, _ = sodium.crypto_secretstream_xchacha20poly1305_pull(state, sealed)
    return e_pk, e_r, tx, responder_proof


# --- the happy path ------------------------------------------------------------------------


def test_handshake_authenticates_both_sides_and_frames_flow_both_ways_in_order() -> None:
    initiator, responder = new_pair()
    ev_i, ev_r = pump(initiator, responder)
    assert ev_i == [Established(BOB_IK)]
    assert ev_r == [Established(ALICE_IK)]
    assert (initiator.peer, responder.peer) == (BOB_IK, ALICE_IK)

    to_bob = [b"first", b"", b"third" * 100]
    to_alice = [b"one", b"two", b"three"]
    for payload in to_bob:
        initiator.send_frame(payload)
    for payload in to_alice:
        responder.send_frame(payload)
    ev_i, ev_r = pump(initiator, responder)
    assert ev_r == [FrameReceived(p) for p in to_bob]
    assert ev_i == [FrameReceived(p) for p in to_alice]

    initiator.send_frame(b"last words")
    initiator.close()
    ev_i, ev_r = pump(initiator, responder)
    assert ev_i == []
    assert len(ev_r) == 2
    assert ev_r[0] == FrameReceived(b"last words")
    assert isinstance(ev_r[1], Closed)
    assert ev_r[1].error is False
    assert not initiator.is_open
    assert not responder.is_open


def test_everything_in_one_read_is_processed_in_order() -> None:
    """A TCP read may carry msg3, frames and the close at once; all of it counts, in order."""
    initiator, responder = new_pair()
    feed(initiator, feed_and_take(responder, initiator.data_to_send()))
    initiator.send_frame(b"a")
    initiator.send_frame(b"b")
    initiator.close()
    events = responder.receive_data(initiator.data_to_send())
    assert events[:3] == [Established(ALICE_IK), FrameReceived(b"a"), FrameReceived(b"b")]
    assert kinds(events) == [Established, FrameReceived, FrameReceived, Closed]
    assert isinstance(events[3], Closed)
    assert events[3].error is False


def test_an_initiator_must_name_the_node_it_dials() -> None:
    with pytest.raises(ValueError):
        LinkConnection(Role.INITIATOR, ALICE)
    with pytest.raises(ValueError):
        LinkConnection(Role.INITIATOR, ALICE, expected_peer=b"short")


def test_byte_at_a_time_delivery_still_works() -> None:
    initiator, responder = new_pair()
    ev_i, ev_r = pump(initiator, responder, chunk=1)
    assert ev_i == [Established(BOB_IK)]
    assert ev_r == [Established(ALICE_IK)]
    payloads = [b"x", bytes(range(256)) * 4, b""]
    for payload in payloads:
        initiator.send_frame(payload)
        responder.send_frame(payload[::-1])
    ev_i, ev_r = pump(initiator, responder, chunk=1)
    assert ev_r == [FrameReceived(p) for p in payloads]
    assert ev_i == [FrameReceived(p[::-1]) for p in payloads]
    responder.close()
    ev_i, _ = pump(initiator, responder, chunk=1)
    assert len(ev_i) == 1
    assert isinstance(ev_i[-1], Closed)
    assert ev_i[-1].error is False


# --- who is on the other end ---------------------------------------------------------------


def test_initiator_aborts_unless_the_responder_is_the_node_it_dialled() -> None:
    initiator, mallory = new_pair(responder_key=MALLORY, dialled=BOB_IK)
    wire: list[bytes] = []
    ev_i, ev_m = pump(initiator, mallory, wire=wire)
    event = assert_closed_with_error(ev_i, initiator)
    assert "not the node we dialled" in event.reason
    assert initiator.peer is None
    # The initiator never sent its own proof: Mallory learns nothing and is never established.
    assert ev_m == []
    assert len(wire) == 2  # greeting, Mallory's msg2; no msg3
    assert ALICE_IK not in b"".join(wire)
    with pytest.raises(LinkStateError):
        initiator.send_frame(b"for bob only")


def test_responder_claiming_the_dialled_identity_without_its_key_is_refused() -> None:
    initiator = LinkConnection(Role.INITIATOR, ALICE, expected_peer=BOB_IK)
    msg2, _, _ = hand_msg2(greeting_key(initiator.data_to_send()), MALLORY, ik=BOB_IK)
    event = assert_closed_with_error(initiator.receive_data(msg2), initiator)
    assert "does not verify" in event.reason
    assert initiator.data_to_send() == b""


def test_hand_built_responder_follows_the_guide_and_gets_the_initiators_proof() -> None:
    """Control for the forgeries below: an honest hand-built msg2 is accepted, and the
    initiator's reply is the proof GUIDE section 3a specifies."""
    initiator = LinkConnection(Role.INITIATOR, ALICE, expected_peer=BOB_IK)
    e_i = greeting_key(initiator.data_to_send())
    msg2, e_r, rx = hand_msg2(e_i)
    assert initiator.receive_data(msg2) == [Established(BOB_IK)]
    (msg3,) = records(initiator.data_to_send())
    body = msg3[_LEN.size :]
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, body[:_HEADER], rx)
    sealed = body[_HEADER:]
    their_proof, _ = sodium.crypto_secretstream_xchacha20poly1305_pull(state, sealed)
    fields = codec.decode(their_proof)
    assert fields["ik"] == ALICE_IK
    transcript = e_i + e_r + ALICE_IK + BOB_IK
    assert signing.verify(ALICE_IK, signing.TAG_LINK_INITIATOR, transcript, fields["sig"])
    assert not signing.verify(ALICE_IK, signing.TAG_LINK_RESPONDER, transcript, fields["sig"])


@pytest.mark.parametrize("tag", signing.ALL_TAGS)
def test_responder_proof_only_counts_under_the_responder_domain_tag(tag: bytes) -> None:
    """Bob's genuine signature over the right transcript, but made under another domain tag
    (e.g. the initiator's), is not a responder proof."""
    initiator = LinkConnection(Role.INITIATOR, ALICE, expected_peer=BOB_IK)
    msg2, _, _ = hand_msg2(greeting_key(initiator.data_to_send()), BOB, tag=tag)
    events = initiator.receive_data(msg2)
    if tag == signing.TAG_LINK_RESPONDER:
        assert events == [Established(BOB_IK)]
    else:
        assert "does not verify" in assert_closed_with_error(events, initiator).reason


@pytest.mark.parametrize("tag", signing.ALL_TAGS)
def test_initiator_proof_only_counts_under_the_initiator_domain_tag(tag: bytes) -> None:
    responder = LinkConnection(Role.RESPONDER, BOB)
    e_i, e_r, tx, _ = hand_dial(responder)
    state, header = open_push(tx)
    signed = proof(ALICE, tag, e_i + e_r + ALICE_IK + BOB_IK, ALICE_IK)
    sealed = sodium.crypto_secretstream_xchacha20poly1305_push(state, signed)
    events = responder.receive_data(framed(header + sealed))
    if tag == signing.TAG_LINK_INITIATOR:
        assert events == [Established(ALICE_IK)]
    else:
        assert "does not verify" in assert_closed_with_error(events, responder).reason


def test_recorded_msg2_replayed_into_a_new_session_fails() -> None:
    initiator1, responder = new_pair()
    msg2 = feed_and_take(responder, initiator1.data_to_send())
    assert feed(initiator1, msg2) == [Established(BOB_IK)]  # it was genuine

    initiator2 = LinkConnection(Role.INITIATOR, ALICE, expected_peer=BOB_IK)
    initiator2.data_to_send()  # the greeting, intercepted: the real Bob never sees it
    assert_closed_with_error(initiator2.receive_data(msg2), initiator2)
    assert initiator2.peer is None
    assert initiator2.data_to_send() == b""


def test_genuine_responder_proof_resealed_for_a_new_session_fails() -> None:
    """The transcript binds both ephemeral keys: Mallory holds a real proof by Bob from an
    earlier session and seals it under keys she shares with Alice; it must not pass as Bob."""
    responder = LinkConnection(Role.RESPONDER, BOB)
    _, _, _, bobs_proof = hand_dial(responder)
    assert codec.decode(bobs_proof)["ik"] == BOB_IK

    initiator = LinkConnection(Role.INITIATOR, ALICE, expected_peer=BOB_IK)
    e_i = greeting_key(initiator.data_to_send())
    msg2, _, _ = hand_msg2(e_i, MALLORY, sealed_proof=bobs_proof)
    event = assert_closed_with_error(initiator.receive_data(msg2), initiator)
    assert "does not verify" in event.reason


# --- confidentiality and forward secrecy -----------------------------------------------------


def test_identities_and_payloads_never_cross_in_clear() -> None:
    initiator, responder = new_pair()
    handshake: list[bytes] = []
    pump(initiator, responder, wire=handshake)
    raw = b"".join(handshake)
    assert ALICE_IK not in raw
    assert BOB_IK not in raw

    canary = b"CANARY-attack-at-dawn-0123456789"
    initiator.send_frame(canary)
    responder.send_frame(canary)
    frames: list[bytes] = []
    ev_i, ev_r = pump(initiator, responder, wire=frames)
    assert ev_i == ev_r == [FrameReceived(canary)]
    assert canary not in b"".join(frames)
    assert canary[:8] not in b"".join(frames)


def test_ephemeral_secrets_are_dropped_after_key_derivation() -> None:
    """White-box: reads private attributes, since forgetting a secret has no wire-visible
    effect. After the handshake neither side still holds its ephemeral X25519 secret nor the
    pending handshake receive key."""
    initiator, responder = new_pair()
    assert len(initiator._eph_secret) == 32
    pump(initiator, responder)
    assert initiator.peer == BOB_IK
    assert responder.peer == ALICE_IK
    for side in (initiator, responder):
        assert side._eph_secret == b""
        assert side._pending_rx == b""


# --- tampering, truncation, replay, reordering ---------------------------------------------


@settings(deadline=None)
@given(data=st.data())
def test_any_tampered_byte_of_a_frame_closes_the_link_and_delivers_nothing(
    data: st.DataObject,
) -> None:
    initiator, responder = established_pair()
    record = one_frame(initiator, b"pay bob 10 coins")
    position = data.draw(st.integers(0, len(record) - 1), label="position")
    xor = data.draw(st.integers(1, 255), label="xor")
    tampered = bytearray(record)
    tampered[position] ^= xor
    # The EOF matters only when a flipped length prefix leaves the record incomplete.
    events = responder.receive_data(bytes(tampered)) + responder.receive_data(b"")
    assert_closed_with_error(events, responder)


def test_truncated_frame_then_eof_closes_with_error_and_delivers_nothing() -> None:
    size = len(one_frame(established_pair()[0], b"x" * 40))
    for cut in range(1, size):
        initiator, responder = established_pair()
        record = one_frame(initiator, b"x" * 40)
        assert responder.receive_data(record[:cut]) == []
        event = assert_closed_with_error(responder.receive_data(b""), responder)
        assert "mid-record" in event.reason


def test_replayed_frame_closes_the_link() -> None:
    initiator, responder = established_pair()
    record = one_frame(initiator, b"pay bob 10 coins")
    assert responder.receive_data(record) == [FrameReceived(b"pay bob 10 coins")]
    assert_closed_with_error(responder.receive_data(record), responder)

    # Also when the copy arrives in the same read.
    initiator, responder = established_pair()
    record = one_frame(initiator, b"pay bob 10 coins")
    events = responder.receive_data(record + record)
    assert kinds(events) == [FrameReceived, Closed]
    assert isinstance(events[1], Closed)
    assert events[1].error


def test_reflected_frame_is_refused() -> None:
    """Each direction has its own key: a frame bounced back to its sender does not verify."""
    initiator, _ = established_pair()
    record = one_frame(initiator, b"hello")
    assert_closed_with_error(initiator.receive_data(record), initiator)


def test_reordered_frames_close_the_link_before_anything_out_of_order_is_delivered() -> None:
    initiator, responder = established_pair()
    first = one_frame(initiator, b"first")
    second = one_frame(initiator, b"second")
    assert_closed_with_error(responder.receive_data(second + first), responder)

    # Dropping a frame is reordering too: the next one must not be accepted in its place.
    initiator, responder = established_pair()
    one_frame(initiator, b"dropped")
    after = one_frame(initiator, b"after")
    assert_closed_with_error(responder.receive_data(after), responder)


# --- size limits and garbage -----------------------------------------------------------------


def test_announced_record_over_max_record_closes_at_once_without_buffering() -> None:
    _, responder = established_pair()
    events = responder.receive_data(_LEN.pack(MAX_RECORD + 1))
    event = assert_closed_with_error(events, responder)
    assert "exceeds" in event.reason
    assert len(responder._buffer) == 0  # white-box: nothing is held for the announced body
    assert responder.receive_data(b"\x00" * 100_000) == []
    assert len(responder._buffer) == 0


def test_a_record_of_exactly_max_record_is_awaited_not_refused() -> None:
    _, responder = established_pair()
    assert responder.receive_data(_LEN.pack(MAX_RECORD) + b"\x00" * 10) == []
    assert responder.is_open


def test_frame_payload_limit() -> None:
    initiator, responder = established_pair()
    with pytest.raises(ValueError):
        initiator.send_frame(b"\x00" * (MAX_FRAME_PAYLOAD + 1))
    assert initiator.data_to_send() == b""  # nothing half-queued
    biggest = bytes(range(256)) * (MAX_FRAME_PAYLOAD // 256)
    assert len(biggest) == MAX_FRAME_PAYLOAD
    initiator.send_frame(biggest)
    assert pump(initiator, responder) == ([], [FrameReceived(biggest)])
    assert initiator.is_open
    assert responder.is_open


@pytest.mark.parametrize(
    "greeting",
    [
        framed(b"p2pnode-link/2\n" + bytes(32)),
        framed(PROTOCOL_ID + bytes(31)),
        framed(PROTOCOL_ID + bytes(33)),
        framed(b"SSH-2.0-OpenSSH_9.6\r\n" + bytes(26)),
    ],
)
def test_garbage_greeting_is_not_a_p2pnode_link(greeting: bytes) -> None:
    responder = LinkConnection(Role.RESPONDER, BOB)
    event = assert_closed_with_error(responder.receive_data(greeting), responder)
    assert "not a p2pnode link" in event.reason
    assert responder.data_to_send() == b""  # no key agreement, no signature for a stranger


def test_http_request_to_a_link_port_closes() -> None:
    responder = LinkConnection(Role.RESPONDER, BOB)
    assert_closed_with_error(responder.receive_data(b"GET / HTTP/1.1\r\n\r\n"), responder)
    assert responder.data_to_send() == b""


def test_oversized_handshake_records_are_refused_on_the_length_alone() -> None:
    """A frame-sized record is legal after the handshake, not during it: an unauthenticated
    peer cannot make either side buffer 80 KiB."""
    responder = LinkConnection(Role.RESPONDER, BOB)
    assert_closed_with_error(responder.receive_data(_LEN.pack(MAX_RECORD)), responder)

    initiator = LinkConnection(Role.INITIATOR, ALICE, expected_peer=BOB_IK)
    initiator.data_to_send()
    assert_closed_with_error(initiator.receive_data(_LEN.pack(MAX_RECORD)), initiator)

    responder = LinkConnection(Role.RESPONDER, BOB)
    feed_and_take(responder, framed(PROTOCOL_ID + sodium.crypto_kx_keypair()[0]))
    assert_closed_with_error(responder.receive_data(_LEN.pack(1024)), responder)


# --- closing -------------------------------------------------------------------------------


def test_eof_without_final_is_an_error_and_final_is_orderly() -> None:
    initiator, responder = established_pair()
    event = assert_closed_with_error(responder.receive_data(b""), responder)
    assert "without an orderly close" in event.reason

    initiator, responder = established_pair()
    initiator.close()
    events = responder.receive_data(initiator.data_to_send())
    assert len(events) == 1
    assert isinstance(events[0], Closed)
    assert events[0].error is False
    assert responder.receive_data(b"") == []  # the EOF that follows changes nothing


def test_eof_during_handshake_is_an_error() -> None:
    initiator, responder = new_pair()
    assert feed(responder, initiator.data_to_send()) == []
    assert_closed_with_error(initiator.receive_data(b""), initiator)
    assert_closed_with_error(responder.receive_data(b""), responder)


@pytest.mark.parametrize("how", ["error", "peer-final", "own-close"])
def test_after_closed_input_is_ignored_and_sending_is_refused(how: str) -> None:
    initiator, responder = established_pair()
    if how == "error":
        responder.receive_data(b"\xff" * 8)
    elif how == "peer-final":
        initiator.close()
        feed(responder, initiator.data_to_send())
    else:
        responder.close()
    assert not responder.is_open
    late = one_frame(initiator, b"too late") if initiator.is_open else b"\x00" * 40
    assert responder.receive_data(late) == []
    assert responder.receive_data(b"") == []
    with pytest.raises(LinkStateError):
        responder.send_frame(b"anything")


def test_sending_before_the_handshake_is_refused() -> None:
    initiator, responder = new_pair()
    with pytest.raises(LinkStateError):
        initiator.send_frame(b"early")
    with pytest.raises(LinkStateError):
        responder.send_frame(b"early")


# --- fuzzing -------------------------------------------------------------------------------

_chunks = st.lists(
    st.one_of(st.binary(min_size=1, max_size=300), st.binary(max_size=300).map(framed)),
    max_size=5,
)


def assert_only_refusals(events: list[Event], conn: LinkConnection) -> None:
    assert all(isinstance(e, Closed) and e.error for e in events), events
    assert len(events) <= 1
    if events:
        assert not conn.is_open
    assert conn.peer is None


@settings(deadline=None)
@given(chunks=_chunks, valid_greeting=st.booleans(), eof=st.booleans())
def test_random_bytes_never_crash_or_establish_a_responder(
    chunks: list[bytes], valid_greeting: bool, eof: bool
) -> None:
    responder = LinkConnection(Role.RESPONDER, BOB)
    events: list[Event] = []
    if valid_greeting:  # then the random bytes hit the msg3 parser
        events += responder.receive_data(framed(PROTOCOL_ID + sodium.crypto_kx_keypair()[0]))
    for chunk in chunks + ([b""] if eof else []):
        events += responder.receive_data(chunk)
    assert_only_refusals(events, responder)


@settings(deadline=None)
@given(chunks=_chunks, eof=st.booleans())
def test_random_bytes_never_crash_or_establish_an_initiator(chunks: list[bytes], eof: bool) -> None:
    initiator = LinkConnection(Role.INITIATOR, ALICE, expected_peer=BOB_IK)
    initiator.data_to_send()
    events: list[Event] = []
    for chunk in chunks + ([b""] if eof else []):
        events += initiator.receive_data(chunk)
    assert_only_refusals(events, initiator)
    assert initiator.data_to_send() == b""  # never revealed its identity proof


@settings(deadline=None)
@given(chunks=_chunks)
def test_random_bytes_after_the_handshake_never_deliver_a_frame(chunks: list[bytes]) -> None:
    _, responder = established_pair()
    events: list[Event] = []
    for chunk in chunks:
        events += responder.receive_data(chunk)
    assert all(isinstance(e, Closed) and e.error for e in events), events
    assert len(events) <= 1
