"""Sign-then-seal envelopes and receipts: what arrives verified, and every reason for refusal."""

from __future__ import annotations

import nacl.bindings
import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode import codec, signing
from p2pnode.envelope import (
    DEFAULT_CLOCK_WINDOW_MS,
    MAX_BODY_SIZE,
    MAX_RECEIPT_IDS,
    MAX_RECEIPT_SIZE,
    MAX_WIRE_SIZE,
    EnvelopeError,
    Message,
    Rejection,
    make_receipt,
    open_message,
    open_receipt,
    seal_message,
)
from p2pnode.identity import Identity

NOW = 1_800_000_000_000
ALICE = Identity.generate(NOW)
BOB = Identity.generate(NOW)
CAROL = Identity.generate(NOW)


def seal(body: bytes = b"hello bob", sender: Identity = ALICE, to: Identity = BOB) -> bytes:
    _, wire = seal_message(
        sender.signing_key,
        to.public_key,
        bytes(to.encryption_key.private_key.public_key),
        body,
        now_ms=NOW,
    )
    return wire


def open_as(receiver: Identity, wire: bytes, now: int = NOW) -> Message:
    return open_message(
        wire,
        own_identity=receiver.public_key,
        decryption_keys=receiver.decryption_keys(now),
        now_ms=now,
    )


def reason_of(receiver: Identity, wire: bytes, now: int = NOW) -> Rejection:
    with pytest.raises(EnvelopeError) as info:
        open_as(receiver, wire, now)
    return info.value.reason


def test_recipient_opens_the_verified_message() -> None:
    message_id, wire = seal_message(
        ALICE.signing_key,
        BOB.public_key,
        bytes(BOB.encryption_key.private_key.public_key),
        b"hello bob",
        now_ms=NOW,
    )
    message = open_as(BOB, wire)
    assert message == Message(message_id, ALICE.public_key, BOB.public_key, NOW, b"hello bob")
    assert len(message_id) == 16


def test_message_ids_are_random_and_a_retry_can_reuse_one() -> None:
    ids = {seal_message(ALICE.signing_key, BOB.public_key, b"k" * 32, b"", now_ms=NOW)[0]}
    ids |= {seal_message(ALICE.signing_key, BOB.public_key, b"k" * 32, b"", now_ms=NOW)[0]}
    assert len(ids) == 2
    xk = bytes(BOB.encryption_key.private_key.public_key)
    fixed = b"\x07" * 16
    _, wire = seal_message(
        ALICE.signing_key, BOB.public_key, xk, b"x", now_ms=NOW, message_id=fixed
    )
    assert open_as(BOB, wire).id == fixed


def test_no_plaintext_or_sender_key_visible_in_the_sealed_bytes() -> None:
    wire = seal(b"CANARY-7f3a-distinctive")
    assert b"CANARY" not in wire
    assert ALICE.public_key not in wire
    assert BOB.public_key not in wire


@pytest.mark.parametrize(
    ("body_size", "wire_size"),
    [(0, 256), (10, 256), (40, 256), (100, 512), (1000, 2048), (MAX_BODY_SIZE, 65536)],
)
def test_padding_hides_the_exact_size(body_size: int, wire_size: int) -> None:
    overhead = nacl.bindings.crypto_box_SEALBYTES
    assert len(seal(b"b" * body_size)) == wire_size + overhead


def test_wire_size_depends_only_on_the_bucket() -> None:
    assert len({len(seal(b"x" * n)) for n in range(0, 40)}) == 1


def test_body_too_large_is_refused_when_sealing() -> None:
    with pytest.raises(EnvelopeError) as info:
        seal(b"x" * (MAX_BODY_SIZE + 1))
    assert info.value.reason is Rejection.BODY_TOO_LARGE


def test_message_for_someone_else_cannot_be_opened() -> None:
    assert reason_of(CAROL, seal()) is Rejection.NOT_FOR_US


def test_resealed_forward_is_detected() -> None:
    # Bob opens Alice's message and re-seals the signed inner part to Carol, hoping Carol
    # takes it as a message Alice sent her.
    padded = nacl.public.SealedBox(BOB.encryption_key.private_key).decrypt(seal(b"for bob only"))
    forwarded = nacl.public.SealedBox(CAROL.encryption_key.private_key.public_key).encrypt(padded)
    with pytest.raises(EnvelopeError) as info:
        open_as(CAROL, bytes(forwarded))
    assert info.value.reason is Rejection.FORWARDED
    assert "another recipient" in str(info.value)


def build_wire(inner: dict[str, object], signer: Identity = ALICE, to: Identity = BOB) -> bytes:
    """Seal a hand-made inner structure, signed by ``signer`` (for refusal tests)."""
    body = codec.encode(inner)
    signed = codec.encode([body, signing.sign(signer.signing_key, signing.TAG_MESSAGE, body)])
    size = 256
    while size <= len(signed):
        size *= 2
    padded = nacl.bindings.sodium_pad(signed, size)
    box = nacl.public.SealedBox(to.encryption_key.private_key.public_key)
    return bytes(box.encrypt(padded))


def inner(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "v": 1,
        "kind": "msg",
        "id": b"\x01" * 16,
        "from": ALICE.public_key,
        "to": BOB.public_key,
        "ts": NOW,
        "body": b"hi",
    }
    return base | changes


def test_hand_built_envelope_matches_the_real_format() -> None:
    assert open_as(BOB, build_wire(inner())).body == b"hi"


def test_bad_signature_is_refused() -> None:
    # Signed by Carol, claiming to be from Alice.
    assert reason_of(BOB, build_wire(inner(), signer=CAROL)) is Rejection.BAD_SIGNATURE


def test_signature_from_another_domain_is_refused() -> None:
    body = codec.encode(inner())
    receipt_signature = signing.sign(ALICE.signing_key, signing.TAG_RECEIPT, body)
    signed = codec.encode([body, receipt_signature])
    padded = nacl.bindings.sodium_pad(signed, 512)
    wire = nacl.public.SealedBox(BOB.encryption_key.private_key.public_key).encrypt(padded)
    assert reason_of(BOB, bytes(wire)) is Rejection.BAD_SIGNATURE


@pytest.mark.parametrize("skew", [DEFAULT_CLOCK_WINDOW_MS + 1, -DEFAULT_CLOCK_WINDOW_MS - 1])
def test_timestamp_outside_the_window_is_refused(skew: int) -> None:
    assert reason_of(BOB, build_wire(inner(ts=NOW + skew))) is Rejection.CLOCK


@pytest.mark.parametrize("skew", [DEFAULT_CLOCK_WINDOW_MS, -DEFAULT_CLOCK_WINDOW_MS])
def test_timestamp_at_the_window_edge_is_accepted(skew: int) -> None:
    assert open_as(BOB, build_wire(inner(ts=NOW + skew))).timestamp == NOW + skew


def test_clock_window_is_configurable() -> None:
    wire = build_wire(inner(ts=NOW - 60_000))
    with pytest.raises(EnvelopeError) as info:
        open_message(
            wire,
            own_identity=BOB.public_key,
            decryption_keys=BOB.decryption_keys(NOW),
            now_ms=NOW,
            clock_window_ms=30_000,
        )
    assert info.value.reason is Rejection.CLOCK


def test_oversized_body_inside_a_valid_envelope_is_refused() -> None:
    wire = build_wire(inner(body=b"x" * (MAX_BODY_SIZE + 1)))
    assert reason_of(BOB, wire) is Rejection.BODY_TOO_LARGE


def test_oversized_envelope_is_refused_unopened() -> None:
    assert reason_of(BOB, b"\0" * (MAX_WIRE_SIZE + 1)) is Rejection.OVERSIZED


@pytest.mark.parametrize(
    "changes",
    [{"v": 2}, {"id": b"short"}, {"to": b"x"}, {"ts": -1}, {"body": "text"}, {"extra": 1}],
)
def test_malformed_inner_structures_are_refused(changes: dict[str, object]) -> None:
    assert reason_of(BOB, build_wire(inner(**changes))) is Rejection.MALFORMED


def test_receipt_sealed_as_message_is_wrong_kind() -> None:
    assert reason_of(BOB, build_wire(inner(kind="receipt"))) is Rejection.WRONG_KIND


def test_old_encryption_key_still_opens_during_grace() -> None:
    wire = seal()
    rotated = BOB.rotated(NOW + 1000)
    assert rotated.encryption_key != BOB.encryption_key
    assert open_as(rotated, wire, NOW + 1000).body == b"hello bob"


WIRE = seal(b"mutate me")


@settings(max_examples=300)
@given(st.data())
def test_every_mutation_of_a_sealed_envelope_is_rejected(data: st.DataObject) -> None:
    mutated = bytearray(WIRE)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del mutated[data.draw(st.integers(0, len(mutated) - 1)) :]
    else:
        mutated += data.draw(st.binary(min_size=1, max_size=64))
    with pytest.raises(EnvelopeError):
        open_as(BOB, bytes(mutated))


@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_envelope_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_as(BOB, data)


# --- receipts -----------------------------------------------------------------------------


def received() -> Message:
    return open_as(BOB, seal())


def test_receipt_round_trip() -> None:
    message = received()
    receipt = open_receipt(
        make_receipt(BOB.signing_key, message.sender, [message.id], now_ms=NOW + 5),
        own_identity=ALICE.public_key,
        peer_identity=BOB.public_key,
        message_id=message.id,
    )
    assert (receipt.ids, receipt.sender, receipt.recipient) == (
        (message.id,),
        BOB.public_key,
        ALICE.public_key,
    )
    assert receipt.timestamp == NOW + 5


def test_one_receipt_names_many_messages_in_order() -> None:
    ids = [i.to_bytes(2, "big") * 8 for i in range(MAX_RECEIPT_IDS)]
    data = make_receipt(BOB.signing_key, ALICE.public_key, ids, now_ms=NOW)
    assert len(data) <= MAX_RECEIPT_SIZE
    receipt = open_receipt(data, own_identity=ALICE.public_key, peer_identity=BOB.public_key)
    assert receipt.ids == tuple(ids)


@pytest.mark.parametrize(
    "ids",
    [[], [b"\x01" * 16] * 2, [bytes([i % 256, i // 256]) * 8 for i in range(MAX_RECEIPT_IDS + 1)]],
    ids=["none", "repeated", "too-many"],
)
def test_a_receipt_must_name_distinct_ids_within_the_limit(ids: list[bytes]) -> None:
    with pytest.raises(ValueError, match="receipt"):
        make_receipt(BOB.signing_key, ALICE.public_key, ids, now_ms=NOW)


def test_a_receipt_naming_an_id_twice_is_malformed() -> None:
    body = codec.encode(
        {
            "v": 1,
            "kind": "receipt",
            "ids": [b"\x01" * 16, b"\x01" * 16],
            "from": BOB.public_key,
            "to": ALICE.public_key,
            "ts": NOW,
        }
    )
    data = codec.encode([body, signing.sign(BOB.signing_key, signing.TAG_RECEIPT, body)])
    with pytest.raises(EnvelopeError) as info:
        open_receipt(data, own_identity=ALICE.public_key, peer_identity=BOB.public_key)
    assert info.value.reason is Rejection.MALFORMED


@pytest.mark.parametrize(
    ("own", "peer", "other_id"),
    [
        (ALICE.public_key, CAROL.public_key, False),  # claims to be from Carol
        (CAROL.public_key, BOB.public_key, False),  # we are not the sender it names
        (ALICE.public_key, BOB.public_key, True),  # for another message
    ],
)
def test_receipt_mismatch_is_refused(own: bytes, peer: bytes, other_id: bool) -> None:
    message = received()
    data = make_receipt(BOB.signing_key, message.sender, [message.id], now_ms=NOW)
    with pytest.raises(EnvelopeError) as info:
        open_receipt(
            data,
            own_identity=own,
            peer_identity=peer,
            message_id=b"\x09" * 16 if other_id else message.id,
        )
    assert info.value.reason is Rejection.RECEIPT_MISMATCH


def test_forged_receipt_is_refused() -> None:
    message = received()
    forged = bytearray(make_receipt(CAROL.signing_key, message.sender, [message.id], now_ms=NOW))
    # Carol's signature with Bob's key substituted in the body no longer verifies.
    body, signature = codec.decode_signed(bytes(forged), what="r", max_body=MAX_RECEIPT_SIZE)
    fields = codec.decode(body)
    fields["from"] = BOB.public_key
    tampered = codec.encode([codec.encode(fields), signature])
    with pytest.raises(EnvelopeError) as info:
        open_receipt(
            tampered,
            own_identity=ALICE.public_key,
            peer_identity=BOB.public_key,
            message_id=message.id,
        )
    assert info.value.reason is Rejection.BAD_SIGNATURE


@given(st.binary(max_size=MAX_RECEIPT_SIZE + 100))
def test_random_receipts_raise_only_envelope_error(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_receipt(
            data,
            own_identity=ALICE.public_key,
            peer_identity=BOB.public_key,
            message_id=b"\x01" * 16,
        )


@given(st.data())
def test_every_mutation_of_a_receipt_is_rejected(data: st.DataObject) -> None:
    message = Message(b"\x01" * 16, ALICE.public_key, BOB.public_key, NOW, b"")
    receipt = bytearray(make_receipt(BOB.signing_key, message.sender, [message.id], now_ms=NOW))
    index = data.draw(st.integers(0, len(receipt) - 1))
    receipt[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(EnvelopeError):
        open_receipt(
            bytes(receipt),
            own_identity=ALICE.public_key,
            peer_identity=BOB.public_key,
            message_id=message.id,
        )
