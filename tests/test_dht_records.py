"""Signed peer records: what a reader accepts from the DHT, and every reason for refusal."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode import codec, signing
from p2pnode.dht.records import (
    DEFAULT_RECORD_LIFETIME_MS,
    DHT_KEY_PERSON,
    DHT_KEY_SIZE,
    MAX_ADDRESSES,
    MAX_RECORD_LIFETIME_MS,
    MAX_RECORD_SIZE,
    REPUBLISH_AFTER_MS,
    PeerRecord,
    RecordError,
    RecordRejection,
    SignedRecord,
    dht_key,
    verify_record,
)
from p2pnode.identity import ENCRYPTION_KEY_LIFETIME_MS, Identity

NOW = 1_800_000_000_000
ALICE = Identity.generate(NOW)
BOB = Identity.generate(NOW)
ADDRS = (("192.0.2.10", 4001), ("2001:db8::10", 4001))
VALID = PeerRecord.create(ALICE, ADDRS, seq=1, now_ms=NOW)


def fields_of(signed: SignedRecord) -> dict[str, Any]:
    body, _ = codec.decode_signed(signed.data, what="test", max_body=MAX_RECORD_SIZE)
    value: dict[str, Any] = codec.decode(body)
    return value


def sign_map(identity: Identity, rec: dict[str, Any]) -> bytes:
    """Publish an arbitrary record map, correctly signed by ``identity``."""
    body = codec.encode(rec)
    return codec.encode([body, signing.sign(identity.signing_key, signing.TAG_RECORD, body)])


def altered(**changes: Any) -> bytes:
    """ALICE's valid record with some fields changed, re-signed by ALICE."""
    return sign_map(ALICE, {**fields_of(VALID), **changes})


def reason_of(data: bytes, key: bytes = VALID.record.key, now: int = NOW) -> RecordRejection:
    with pytest.raises(RecordError) as info:
        verify_record(data, key=key, now_ms=now)
    return info.value.reason


def test_dht_key_is_personalised_blake2b_160_of_the_identity_key() -> None:
    key = dht_key(ALICE.public_key)
    assert len(key) == DHT_KEY_SIZE == 20
    assert len(DHT_KEY_PERSON) <= 16
    expected = hashlib.blake2b(ALICE.public_key, digest_size=20, person=DHT_KEY_PERSON).digest()
    assert key == expected
    assert key != hashlib.blake2b(ALICE.public_key, digest_size=20).digest()
    assert dht_key(BOB.public_key) != key


def test_round_trip_gives_back_the_published_record() -> None:
    signed = verify_record(VALID.data, key=dht_key(ALICE.public_key), now_ms=NOW)
    assert signed == VALID
    record = signed.record
    cert = ALICE.encryption_key.cert
    assert record.identity_key == ALICE.public_key
    assert record.encryption_key == bytes(ALICE.encryption_key.private_key.public_key)
    assert record.encryption_key_expires == cert.expires == NOW + ENCRYPTION_KEY_LIFETIME_MS
    assert record.encryption_key_signature == cert.signature
    assert record.encryption_key_cert == cert
    assert record.addresses == ADDRS
    assert record.seq == 1
    assert record.expires == NOW + DEFAULT_RECORD_LIFETIME_MS
    # Still valid until just before expiry, under its own key only.
    verify_record(VALID.data, key=record.key, now_ms=record.expires - 1)


def test_wire_form_is_the_documented_signed_pair() -> None:
    body, signature = codec.decode(VALID.data)
    assert signing.verify(ALICE.public_key, signing.TAG_RECORD, body, signature)
    assert set(codec.decode(body)) == {
        "v",
        "ik",
        "xk",
        "xk_expires",
        "xk_sig",
        "addrs",
        "seq",
        "expires",
    }
    assert codec.decode(body)["addrs"] == [["192.0.2.10", 4001], ["2001:db8::10", 4001]]


def test_lifetime_constants_are_consistent() -> None:
    assert REPUBLISH_AFTER_MS * 2 == DEFAULT_RECORD_LIFETIME_MS < MAX_RECORD_LIFETIME_MS


def test_largest_record_fits_the_size_limit() -> None:
    longest = [(f"2001:db8:aaaa:bbbb:cccc:dddd:eeee:{i:04x}", 65535) for i in range(MAX_ADDRESSES)]
    signed = PeerRecord.create(ALICE, longest, seq=2**63 - 1, now_ms=NOW)
    assert len(signed.data) < 800 < MAX_RECORD_SIZE
    assert verify_record(signed.data, key=signed.record.key, now_ms=NOW) == signed


@pytest.mark.parametrize(
    ("host", "canonical"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("127.0.0.1", "127.0.0.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("::1", "::1"),
        ("::ffff:198.51.100.1", "198.51.100.1"),
    ],
)
def test_ip_literals_are_accepted_in_canonical_form(host: str, canonical: str) -> None:
    signed = PeerRecord.create(ALICE, [(host, 1)], seq=1, now_ms=NOW)
    assert signed.record.addresses == ((canonical, 1),)
    assert verify_record(signed.data, key=signed.record.key, now_ms=NOW) == signed


@pytest.mark.parametrize(
    "host",
    [
        "example.com",
        "localhost",
        "",
        " 192.0.2.1",
        "192.0.2.01",
        "fe80::1%eth0",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
    ],
)
def test_hostnames_and_undiallable_addresses_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="address"):
        PeerRecord.create(ALICE, [(host, 4001)], seq=1, now_ms=NOW)
    # A record carrying one anyway (signed, so only the address is wrong) is malformed.
    assert reason_of(altered(addrs=[[host, 4001]])) is RecordRejection.MALFORMED


def test_non_canonical_host_text_is_refused_on_the_wire() -> None:
    assert reason_of(altered(addrs=[["2001:DB8::1", 4001]])) is RecordRejection.MALFORMED
    assert reason_of(altered(addrs=[["::ffff:198.51.100.1", 1]])) is RecordRejection.MALFORMED


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_ports_outside_1_to_65535_are_refused(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        PeerRecord.create(ALICE, [("192.0.2.1", port)], seq=1, now_ms=NOW)
    assert reason_of(altered(addrs=[["192.0.2.1", port]])) is RecordRejection.MALFORMED


def test_too_many_no_or_duplicate_addresses_are_refused() -> None:
    many = [(f"192.0.2.{i}", 4001) for i in range(1, MAX_ADDRESSES + 2)]
    with pytest.raises(ValueError, match="addresses"):
        PeerRecord.create(ALICE, many, seq=1, now_ms=NOW)
    with pytest.raises(ValueError, match="addresses"):
        PeerRecord.create(ALICE, [], seq=1, now_ms=NOW)
    with pytest.raises(ValueError, match="duplicate"):
        PeerRecord.create(ALICE, [("192.0.2.1", 1), ("192.0.2.1", 1)], seq=1, now_ms=NOW)
    assert PeerRecord.create(ALICE, many[:MAX_ADDRESSES], seq=1, now_ms=NOW)
    wire_many = [[host, port] for host, port in many]
    assert reason_of(altered(addrs=wire_many)) is RecordRejection.MALFORMED
    assert reason_of(altered(addrs=[])) is RecordRejection.MALFORMED


def test_create_refuses_bad_lifetime_seq_and_expired_encryption_key() -> None:
    with pytest.raises(ValueError, match="lifetime"):
        PeerRecord.create(ALICE, ADDRS, seq=1, now_ms=NOW, lifetime_ms=MAX_RECORD_LIFETIME_MS + 1)
    with pytest.raises(ValueError, match="lifetime"):
        PeerRecord.create(ALICE, ADDRS, seq=1, now_ms=NOW, lifetime_ms=0)
    with pytest.raises(ValueError, match="seq"):
        PeerRecord.create(ALICE, ADDRS, seq=-1, now_ms=NOW)
    with pytest.raises(ValueError, match="rotate"):
        PeerRecord.create(ALICE, ADDRS, seq=1, now_ms=NOW + ENCRYPTION_KEY_LIFETIME_MS)


def test_create_uses_the_current_encryption_key_after_rotation() -> None:
    rotated = ALICE.rotated(NOW + 1)
    signed = PeerRecord.create(rotated, ADDRS, seq=2, now_ms=NOW + 1)
    assert signed.record.encryption_key_cert == rotated.encryption_key.cert
    assert signed.record.encryption_key != VALID.record.encryption_key
    assert verify_record(signed.data, key=VALID.record.key, now_ms=NOW + 1) == signed


# -- every reason for refusal ------------------------------------------------------------------


def test_oversized() -> None:
    assert reason_of(VALID.data + b"\x00" * (MAX_RECORD_SIZE + 1 - len(VALID.data))) is (
        RecordRejection.OVERSIZED
    )
    assert reason_of(b"\x00" * 100_000) is RecordRejection.OVERSIZED


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff",
        VALID.data + b"\x00",  # trailing byte
        codec.encode([codec.encode(1), b"\x00" * 64]),  # body is not a map
        codec.encode(fields_of(VALID)),  # an unsigned map
        "not bytes",
        None,
    ],
)
def test_malformed(data: Any) -> None:
    assert reason_of(data) is RecordRejection.MALFORMED


@pytest.mark.parametrize(
    "changes",
    [
        {"v": 2},
        {"extra": 1},
        {"seq": -1},
        {"seq": True},
        {"ik": b"\x01" * 31},
        {"xk_sig": b"\x00" * 63},
        {"addrs": [["192.0.2.1", "4001"]]},
        {"addrs": [["192.0.2.1"]]},
        {"addrs": [["192.0.2.1", 4001, 1]]},
        {"addrs": "192.0.2.1:4001"},
    ],
)
def test_malformed_fields_even_when_signed(changes: dict[str, Any]) -> None:
    assert reason_of(altered(**changes)) is RecordRejection.MALFORMED


def test_missing_field_is_malformed() -> None:
    rec = fields_of(VALID)
    del rec["seq"]
    assert reason_of(sign_map(ALICE, rec)) is RecordRejection.MALFORMED


def test_bad_signature() -> None:
    data = bytearray(VALID.data)
    data[-1] ^= 0x01  # last byte of the signature
    assert reason_of(bytes(data)) is RecordRejection.BAD_SIGNATURE
    # A field changed without re-signing.
    body, signature = codec.decode(VALID.data)
    rec = codec.decode(body)
    rec["seq"] = 2
    assert reason_of(codec.encode([codec.encode(rec), signature])) is (
        RecordRejection.BAD_SIGNATURE
    )


def test_record_signed_by_a_claiming_ik_b_is_refused() -> None:
    # Alice forges a record for Bob, pointing Bob's contacts at her address and her key.
    forged = sign_map(ALICE, {**fields_of(VALID), "ik": BOB.public_key})
    assert reason_of(forged, key=dht_key(BOB.public_key)) is RecordRejection.BAD_SIGNATURE
    assert reason_of(forged, key=dht_key(ALICE.public_key)) is RecordRejection.BAD_SIGNATURE


def test_record_stored_under_another_nodes_key_is_refused() -> None:
    with pytest.raises(RecordError, match="wrong key") as info:
        verify_record(VALID.data, key=dht_key(BOB.public_key), now_ms=NOW)
    assert info.value.reason is RecordRejection.WRONG_KEY
    assert reason_of(VALID.data, key=ALICE.public_key) is RecordRejection.WRONG_KEY
    assert reason_of(VALID.data, key=b"") is RecordRejection.WRONG_KEY


def test_expired() -> None:
    assert reason_of(VALID.data, now=VALID.record.expires) is RecordRejection.EXPIRED
    assert reason_of(VALID.data, now=VALID.record.expires + 10**9) is RecordRejection.EXPIRED


def test_too_far_future() -> None:
    far = altered(expires=NOW + MAX_RECORD_LIFETIME_MS + 1)
    assert reason_of(far) is RecordRejection.TOO_FAR_FUTURE
    assert reason_of(altered(expires=2**63 - 1)) is RecordRejection.TOO_FAR_FUTURE
    # The limit itself is still accepted.
    verify_record(altered(expires=NOW + MAX_RECORD_LIFETIME_MS), key=VALID.record.key, now_ms=NOW)
    # A verifier whose clock is behind by more than the slack refuses a fresh record.
    assert reason_of(VALID.data, now=NOW - MAX_RECORD_LIFETIME_MS) is (
        RecordRejection.TOO_FAR_FUTURE
    )


def test_bad_encryption_key_signature() -> None:
    bad_sig = bytes(64)
    assert reason_of(altered(xk_sig=bad_sig)) is RecordRejection.BAD_ENCRYPTION_KEY
    # The certificate must cover exactly xk and xk_expires.
    assert reason_of(altered(xk=b"\x05" * 32)) is RecordRejection.BAD_ENCRYPTION_KEY
    later = VALID.record.encryption_key_expires + 1
    assert reason_of(altered(xk_expires=later)) is RecordRejection.BAD_ENCRYPTION_KEY


def test_encryption_key_certified_by_another_identity_is_refused() -> None:
    bob_cert = BOB.encryption_key.cert
    stolen = altered(xk=bob_cert.public_key, xk_expires=bob_cert.expires, xk_sig=bob_cert.signature)
    assert reason_of(stolen) is RecordRejection.BAD_ENCRYPTION_KEY


def test_expired_encryption_key_is_refused_even_in_an_unexpired_record() -> None:
    # Alice's key expired; her record (re-signed with the old cert) claims a fresh expiry.
    later = ALICE.encryption_key.cert.expires + 1
    stale_key = altered(expires=later + DEFAULT_RECORD_LIFETIME_MS)
    assert reason_of(stale_key, now=later) is RecordRejection.BAD_ENCRYPTION_KEY


# -- hostile input -----------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.binary(max_size=1200))
def test_random_bytes_raise_only_record_error(data: bytes) -> None:
    with pytest.raises(RecordError):
        verify_record(data, key=VALID.record.key, now_ms=NOW)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_single_byte_mutations_raise_only_record_error(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(VALID.data) - 1))
    original = VALID.data[position]
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original))
    mutated = VALID.data[:position] + bytes([byte]) + VALID.data[position + 1 :]
    with pytest.raises(RecordError):
        verify_record(mutated, key=VALID.record.key, now_ms=NOW)


@settings(max_examples=200)
@given(st.integers(0, len(VALID.data) - 1), st.binary(min_size=1, max_size=8))
def test_truncations_and_insertions_raise_only_record_error(cut: int, extra: bytes) -> None:
    for data in (VALID.data[:cut], VALID.data[:cut] + extra + VALID.data[cut:]):
        with pytest.raises(RecordError):
            verify_record(data, key=VALID.record.key, now_ms=NOW)
