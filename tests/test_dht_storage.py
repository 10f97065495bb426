"""RecordStorage: what a DHT node agrees to hold for others, for how long, and within what."""

from __future__ import annotations

import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.node import Node
from kademlia.storage import IStorage

from p2pnode import codec, signing
from p2pnode.dht.records import (
    MAX_RECORD_SIZE,
    PeerRecord,
    RecordRejection,
    SignedRecord,
    dht_key,
)
from p2pnode.dht.storage import (
    MAX_OWN_RECORDS,
    MAX_RECORDS_PER_SOURCE,
    RecordStorage,
    StoreOutcome,
    quota_source,
)
from p2pnode.identity import Identity

NOW = 1_800_000_000_000
SECOND = 1000
ADDRS = [("192.0.2.10", 4001)]


class FakeClock:
    def __init__(self, now: int = NOW) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@functools.cache
def identity(index: int) -> Identity:
    return Identity.generate(NOW)


def record(
    index: int = 0, seq: int = 1, lifetime_ms: int = 3_600_000, port: int = 4001
) -> SignedRecord:
    return PeerRecord.create(
        identity(index), [("192.0.2.10", port)], seq=seq, now_ms=NOW, lifetime_ms=lifetime_ms
    )


def offer(
    storage: RecordStorage,
    signed: SignedRecord,
    source: str | None = "198.51.100.1",
    now: int = NOW,
) -> StoreOutcome:
    return storage.offer(signed.record.key, signed.data, source_ip=source, now_ms=now)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def storage(clock: FakeClock) -> RecordStorage:
    return RecordStorage(clock=clock)


def test_implements_the_kademlia_storage_interface(storage: RecordStorage) -> None:
    assert isinstance(storage, IStorage)


def test_store_then_get(storage: RecordStorage) -> None:
    signed = record()
    assert offer(storage, signed) is StoreOutcome.STORED
    key = signed.record.key
    assert storage.get(key) == storage[key] == signed.data
    assert storage.get_record(key) == signed
    assert list(storage) == [(key, signed.data)]
    assert key in storage
    assert len(storage) == 1
    missing = dht_key(identity(1).public_key)
    assert storage.get(missing) is None
    assert storage.get(missing, b"default") == b"default"
    assert storage.get_record(missing) is None
    with pytest.raises(KeyError):
        storage[missing]


def test_offer_returns_the_outcome_and_offer_result_the_reason(storage: RecordStorage) -> None:
    signed = record()
    assert storage.offer(signed.record.key, b"\x00", source_ip=None, now_ms=NOW) is (
        StoreOutcome.INVALID
    )
    result = storage.offer_result(signed.record.key, b"\x00", source_ip=None, now_ms=NOW)
    assert result.outcome is StoreOutcome.INVALID
    assert result.rejection is RecordRejection.MALFORMED
    assert not result.accepted
    assert storage.offer(signed.record.key, signed.data, source_ip=None, now_ms=NOW) is (
        StoreOutcome.STORED
    )


@pytest.mark.parametrize("key", [["a"], {"k": 1}, 3, None])
def test_reads_with_keys_of_another_type_do_not_raise(storage: RecordStorage, key: object) -> None:
    assert storage.get(key) is None  # type: ignore[arg-type]
    assert storage.get_record(key) is None  # type: ignore[arg-type]
    assert key not in storage


def test_higher_seq_replaces(storage: RecordStorage) -> None:
    assert offer(storage, record(seq=1)) is StoreOutcome.STORED
    newer = record(seq=5, port=5000)
    assert offer(storage, newer) is StoreOutcome.STORED
    assert storage.get_record(newer.record.key) == newer


def test_lower_or_equal_seq_is_stale(storage: RecordStorage) -> None:
    current = record(seq=5)
    assert offer(storage, current) is StoreOutcome.STORED
    for stale in (record(seq=4, port=1), record(seq=5, port=2), record(seq=0)):
        result = storage.offer_result(
            stale.record.key, stale.data, source_ip="203.0.113.9", now_ms=NOW
        )
        assert result.outcome is StoreOutcome.STALE
        assert not result.accepted
    assert storage.get(current.record.key) == current.data


def test_same_bytes_again_is_unchanged(storage: RecordStorage) -> None:
    signed = record()
    assert offer(storage, signed) is StoreOutcome.STORED
    result = storage.offer_result(
        signed.record.key, signed.data, source_ip="203.0.113.9", now_ms=NOW
    )
    assert result.outcome is StoreOutcome.UNCHANGED
    assert result.accepted
    assert storage.get(signed.record.key) == signed.data


def test_invalid_record_is_refused_with_its_reason(storage: RecordStorage) -> None:
    signed = record()
    key = signed.record.key
    cases = [
        (b"\x00", RecordRejection.MALFORMED),
        (b"\x00" * (MAX_RECORD_SIZE + 1), RecordRejection.OVERSIZED),
        (signed.data[:-1] + bytes([signed.data[-1] ^ 1]), RecordRejection.BAD_SIGNATURE),
    ]
    for value, reason in cases:
        result = storage.offer_result(key, value, source_ip="198.51.100.1", now_ms=NOW)
        assert result.outcome is StoreOutcome.INVALID
        assert result.rejection is reason
        assert result.detail
    expired = storage.offer_result(
        key, signed.data, source_ip="198.51.100.1", now_ms=NOW + 3_600_000
    )
    assert expired.rejection is RecordRejection.EXPIRED
    assert storage.get(key) is None
    assert storage.quota_used("198.51.100.1") == 0


@pytest.mark.parametrize("key", [b"", b"\x00" * 32, "a" * 20, 7, None])
def test_keys_that_are_not_20_bytes_are_refused(storage: RecordStorage, key: object) -> None:
    result = storage.offer_result(key, record().data, source_ip="198.51.100.1", now_ms=NOW)  # type: ignore[arg-type]
    assert result.outcome is StoreOutcome.INVALID
    assert result.rejection is RecordRejection.WRONG_KEY


def test_forged_record_is_never_stored(storage: RecordStorage) -> None:
    alice, bob = identity(0), identity(1)
    genuine = record(0)
    # Alice's genuine record offered under Bob's key.
    result = storage.offer_result(
        dht_key(bob.public_key), genuine.data, source_ip="198.51.100.1", now_ms=NOW
    )
    assert result.rejection is RecordRejection.WRONG_KEY
    # A record claiming Bob's identity key, signed by Alice.
    body, _ = codec.decode(genuine.data)
    rec = codec.decode(body)
    rec["ik"] = bob.public_key
    rec["seq"] = 99
    forged_body = codec.encode(rec)
    forged = codec.encode(
        [forged_body, signing.sign(alice.signing_key, signing.TAG_RECORD, forged_body)]
    )
    bob_key = dht_key(bob.public_key)
    result = storage.offer_result(bob_key, forged, source_ip="198.51.100.1", now_ms=NOW)
    assert result.rejection is RecordRejection.BAD_SIGNATURE
    # Nor can a forgery displace Bob's genuine record.
    assert offer(storage, record(1)) is StoreOutcome.STORED
    result = storage.offer_result(bob_key, forged, source_ip="198.51.100.1", now_ms=NOW)
    assert result.rejection is RecordRejection.BAD_SIGNATURE
    assert storage.get(bob_key) == record(1).data
    assert storage.get(dht_key(alice.public_key)) is None


def test_quota_per_ipv4_address(storage: RecordStorage) -> None:
    for index in range(MAX_RECORDS_PER_SOURCE):
        assert offer(storage, record(index), "198.51.100.1") is StoreOutcome.STORED
    assert storage.quota_used("198.51.100.1") == MAX_RECORDS_PER_SOURCE
    extra = record(MAX_RECORDS_PER_SOURCE)
    result = storage.offer_result(
        extra.record.key, extra.data, source_ip="198.51.100.1", now_ms=NOW
    )
    assert result.outcome is StoreOutcome.OVER_QUOTA
    assert storage.get(extra.record.key) is None
    # The same address through a dual-stack socket shares the quota...
    assert offer(storage, extra, "::ffff:198.51.100.1") is StoreOutcome.OVER_QUOTA
    # ...while a neighbouring address has its own.
    assert offer(storage, extra, "198.51.100.2") is StoreOutcome.STORED
    assert len(storage) == MAX_RECORDS_PER_SOURCE + 1


def test_ipv6_addresses_in_one_slash_64_share_a_quota(storage: RecordStorage) -> None:
    for index in range(MAX_RECORDS_PER_SOURCE):
        source = f"2001:db8:1:2:{index:x}::{index + 1:x}"
        assert offer(storage, record(index), source) is StoreOutcome.STORED
    extra = record(MAX_RECORDS_PER_SOURCE)
    assert offer(storage, extra, "2001:db8:1:2:ffff:ffff:ffff:ffff") is StoreOutcome.OVER_QUOTA
    assert offer(storage, extra, "2001:db8:1:3::1") is StoreOutcome.STORED
    assert quota_source("2001:db8:1:2:abcd::1") == "2001:db8:1:2::/64"
    assert quota_source("::ffff:192.0.2.1") == "192.0.2.1"


def test_updates_do_not_consume_quota(storage: RecordStorage) -> None:
    for index in range(MAX_RECORDS_PER_SOURCE):
        assert offer(storage, record(index), "198.51.100.1") is StoreOutcome.STORED
    # The owner republishes with a higher seq, from the same full source and from another.
    assert offer(storage, record(0, seq=2), "198.51.100.1") is StoreOutcome.STORED
    assert offer(storage, record(1, seq=2), "203.0.113.5") is StoreOutcome.STORED
    assert offer(storage, record(2), "198.51.100.1") is StoreOutcome.UNCHANGED
    assert storage.quota_used("198.51.100.1") == MAX_RECORDS_PER_SOURCE
    assert storage.quota_used("203.0.113.5") == 0


def test_total_cap_refuses_new_keys_but_not_updates(clock: FakeClock) -> None:
    storage = RecordStorage(clock=clock, max_records=3)
    for index in range(3):
        assert offer(storage, record(index), f"198.51.100.{index + 1}") is StoreOutcome.STORED
    assert offer(storage, record(3), "203.0.113.1") is StoreOutcome.FULL
    assert offer(storage, record(0, seq=2), "203.0.113.1") is StoreOutcome.STORED
    assert len(storage) == 3
    # The node's own record is exempt from the total.
    own = record(4)
    storage[own.record.key] = own.data
    assert storage[own.record.key] == own.data
    assert offer(storage, record(3), "203.0.113.1") is StoreOutcome.FULL
    # Removing one frees a place and its source's quota.
    assert storage.remove(record(1).record.key)
    assert not storage.remove(record(1).record.key)
    assert storage.quota_used("198.51.100.2") == 0
    assert offer(storage, record(3), "203.0.113.1") is StoreOutcome.STORED


def test_own_records_skip_quota_but_are_verified_and_bounded(clock: FakeClock) -> None:
    storage = RecordStorage(clock=clock, max_records=1, max_records_per_source=1)
    for index in range(MAX_OWN_RECORDS):
        storage[record(index).record.key] = record(index).data
    assert len(storage) == MAX_OWN_RECORDS
    extra = record(MAX_OWN_RECORDS)
    with pytest.raises(ValueError, match="full"):
        storage[extra.record.key] = extra.data
    with pytest.raises(ValueError, match="wrong-key"):
        storage[record(0).record.key] = record(1, seq=2).data
    with pytest.raises(ValueError, match="stale"):
        storage[record(0).record.key] = record(0, seq=0).data
    # Peers can still fill their own share alongside.
    assert offer(storage, extra, "198.51.100.1") is StoreOutcome.STORED


def test_own_update_releases_the_peer_quota_it_was_charged_to(storage: RecordStorage) -> None:
    assert offer(storage, record(0), "198.51.100.1") is StoreOutcome.STORED
    storage[record(0).record.key] = record(0, seq=2).data
    assert storage.quota_used("198.51.100.1") == 0


def test_peer_update_of_an_own_record_keeps_it_exempt(storage: RecordStorage) -> None:
    storage[record(0).record.key] = record(0).data
    assert offer(storage, record(0, seq=2), "198.51.100.1") is StoreOutcome.STORED
    assert storage.quota_used("198.51.100.1") == 0


def test_expired_records_vanish_and_release_quota(clock: FakeClock) -> None:
    storage = RecordStorage(clock=clock, max_records_per_source=2)
    short, long_lived = record(0, lifetime_ms=10 * SECOND), record(1, lifetime_ms=60 * SECOND)
    assert offer(storage, short) is StoreOutcome.STORED
    assert offer(storage, long_lived) is StoreOutcome.STORED
    assert offer(storage, record(2)) is StoreOutcome.OVER_QUOTA
    clock.now = NOW + 10 * SECOND
    assert storage.get(short.record.key) is None
    assert short.record.key not in storage
    with pytest.raises(KeyError):
        storage[short.record.key]
    assert list(storage) == [(long_lived.record.key, long_lived.data)]
    assert storage.quota_used("198.51.100.1") == 1
    assert offer(storage, record(2), now=clock.now) is StoreOutcome.STORED


def test_expire_counts_what_it_drops(clock: FakeClock) -> None:
    storage = RecordStorage(clock=clock)
    for index in range(5):
        assert offer(storage, record(index, lifetime_ms=(index + 1) * SECOND)) is (
            StoreOutcome.STORED
        )
    # An update moves key 0's expiry later; its old heap item must not drop it.
    assert offer(storage, record(0, seq=2, lifetime_ms=100 * SECOND)) is StoreOutcome.STORED
    assert storage.expire(NOW) == 0
    assert storage.expire(NOW + 2 * SECOND) == 1  # index 1
    assert storage.expire(NOW + 2 * SECOND) == 0
    assert storage.expire(NOW + 5 * SECOND) == 3  # indices 2, 3, 4
    assert len(storage) == 1
    assert storage.expire(NOW + 100 * SECOND) == 1
    assert len(storage) == 0


def test_record_is_dropped_when_its_encryption_key_expires(clock: FakeClock) -> None:
    ident = identity(0)
    key_expires = ident.encryption_key.cert.expires
    # Published shortly before the encryption key's expiry, with a longer life of its own.
    signed = PeerRecord.create(ident, ADDRS, seq=1, now_ms=key_expires - SECOND)
    storage = RecordStorage(clock=clock)
    result = storage.offer_result(
        signed.record.key, signed.data, source_ip=None, now_ms=key_expires - SECOND
    )
    assert result.outcome is StoreOutcome.STORED
    clock.now = key_expires
    assert storage.get(signed.record.key) is None


def test_iter_older_than_reports_records_due_for_republishing(clock: FakeClock) -> None:
    storage = RecordStorage(clock=clock)
    old, refreshed, new = record(0), record(1), record(2)
    assert offer(storage, old) is StoreOutcome.STORED
    assert offer(storage, refreshed) is StoreOutcome.STORED
    assert offer(storage, new, now=NOW + 50 * SECOND) is StoreOutcome.STORED
    # Offered again unchanged: someone else just republished it.
    assert offer(storage, refreshed, now=NOW + 40 * SECOND) is StoreOutcome.UNCHANGED
    clock.now = NOW + 60 * SECOND
    assert storage.iter_older_than(60) == [(old.record.key, old.data)]
    assert sorted(storage.iter_older_than(20)) == sorted(
        [(old.record.key, old.data), (refreshed.record.key, refreshed.data)]
    )
    assert len(storage.iter_older_than(0)) == 3
    assert storage.iter_older_than(61) == []


def test_repeated_updates_keep_memory_bounded(storage: RecordStorage) -> None:
    for seq in range(1, 301):
        lifetime = 3_600_000 - seq  # every update changes the expiry
        assert offer(storage, record(0, seq=seq, lifetime_ms=lifetime)) is StoreOutcome.STORED
    assert len(storage) == 1
    assert len(storage._heap) <= 2 + 64 + 1  # white-box: stale expiry items are compacted


@functools.cache
def stored_for_closeness() -> tuple[RecordStorage, list[bytes]]:
    storage = RecordStorage(clock=FakeClock())
    keys = []
    for index in range(40):
        signed = record(100 + index)
        assert offer(storage, signed, f"198.51.100.{index + 1}") is StoreOutcome.STORED
        keys.append(signed.record.key)
    return storage, keys


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=20, max_size=20), st.binary(min_size=20, max_size=20))
def test_keys_closer_to_matches_brute_force(node_id: bytes, own_id: bytes) -> None:
    storage, keys = stored_for_closeness()
    node, own = Node(node_id), Node(own_id)
    expected = {key for key in keys if Node(key).distance_to(node) < Node(key).distance_to(own)}
    assert set(storage.keys_closer_to(node.long_id, own.long_id)) == expected


def test_keys_closer_to_near_a_stored_key() -> None:
    storage, keys = stored_for_closeness()
    rng = random.Random(7)
    target = keys[0]
    # A node id differing from a key only in its last bit is closer to it than anything else.
    neighbour = Node(target[:-1] + bytes([target[-1] ^ 1]))
    far = Node(bytes(b ^ 0xFF for b in target))
    assert target in storage.keys_closer_to(neighbour.long_id, far.long_id)
    assert target not in storage.keys_closer_to(far.long_id, neighbour.long_id)
    same = Node(bytes(rng.randrange(256) for _ in range(20)))
    assert storage.keys_closer_to(same.long_id, same.long_id) == []


def test_bad_source_ip_is_a_caller_error(storage: RecordStorage) -> None:
    with pytest.raises(ValueError):
        storage.offer_result(
            record().record.key, record().data, source_ip="example.com", now_ms=NOW
        )


@functools.cache
def pool_record(index: int, seq: int, lifetime_s: int) -> SignedRecord:
    return record(200 + index, seq=seq, lifetime_ms=lifetime_s * SECOND)


_SOURCES = [None, "198.51.100.1", "198.51.100.2", "2001:db8::1", "2001:db8::2"]
_OPERATION = st.one_of(
    st.tuples(
        st.just("offer"),
        st.integers(0, 5),
        st.integers(1, 3),
        st.integers(1, 30),
        st.sampled_from(_SOURCES),
    ),
    st.tuples(st.just("remove"), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.integers(0, 15)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_OPERATION, max_size=40))
def test_random_operations_keep_the_books_straight(operations: list[tuple]) -> None:  # type: ignore[type-arg]
    clock = FakeClock()
    storage = RecordStorage(clock=clock, max_records=4, max_records_per_source=2)
    for operation in operations:
        if operation[0] == "offer":
            _, index, seq, lifetime_s, source = operation
            signed = pool_record(index, seq, lifetime_s)
            before = storage.get_record(signed.record.key)
            outcome = offer(storage, signed, source, now=clock.now)
            after = storage.get_record(signed.record.key)
            if outcome is StoreOutcome.STORED:
                assert after == signed
            elif outcome is StoreOutcome.UNCHANGED:
                assert after == before == signed
            else:
                assert after == before
        elif operation[0] == "remove":
            storage.remove(pool_record(operation[1], 1, 1).record.key)
        else:
            clock.now += operation[1] * SECOND
        # Every live record is unexpired, and the quota books match the stored entries.
        count = len(storage)  # drops what has expired by clock.now
        live = storage._entries  # white-box: the accounting must match the contents
        assert count == len(live)
        assert all(entry.expires > clock.now for entry in live.values())
        per_source: dict[str, int] = {}
        for entry in live.values():
            if entry.source is not None:
                per_source[entry.source] = per_source.get(entry.source, 0) + 1
        assert per_source == storage._per_source
        assert storage._own_count == sum(entry.source is None for entry in live.values())
        assert all(count <= 2 for count in per_source.values())
        assert len(live) - storage._own_count <= 4
