"""Routing-table hygiene: who may enter the table, how many per address and subnet, and when a
contact leaves it."""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from kademlia.routing import RoutingTable as StockRoutingTable

from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import DHT_KEY_PERSON, PeerRecord, dht_key
from p2pnode.dht.routing import (
    MAX_FAILURES,
    MAX_PER_SUBNET_PER_BUCKET,
    AddResult,
    RoutingTable,
    closest,
    subnet_of,
)
from p2pnode.dht.storage import RecordStorage
from p2pnode.dht.wire import Contact, Method
from p2pnode.identity import Identity

NOW_MS = 1_800_000_000_000
LOW_ID = bytes(20)
HIGH_ID = b"\xff" * 20


def nid(value: int) -> bytes:
    return value.to_bytes(20, "big")


def contact(value: int, host: str, port: int = 4000) -> Contact:
    return Contact(nid(value), host, port)


def brute_force(contacts: list[Contact], target: bytes, k: int) -> list[Contact]:
    target_id = int.from_bytes(target, "big")
    return sorted(contacts, key=lambda c: int.from_bytes(c.node_id, "big") ^ target_id)[:k]


def check_invariants(table: RoutingTable) -> None:
    """What hygiene promises about any table, however it was built."""
    contacts = list(table)
    addresses = [c.address for c in contacts]
    assert len(addresses) == len(set(addresses)), "two IDs at one ip:port"
    for c in contacts:
        assert table.contact_at(c.address) == c.node_id
    for bucket in table._buckets:
        assert len(bucket.nodes) <= table.ksize
        per_subnet: dict[str, int] = {}
        for node in bucket.nodes.values():
            if table.exempt_loopback and ipaddress.ip_address(node.ip).is_loopback:
                continue
            subnet = subnet_of(node.ip)
            per_subnet[subnet] = per_subnet.get(subnet, 0) + 1
        assert max(per_subnet.values(), default=0) <= MAX_PER_SUBNET_PER_BUCKET


# --- node IDs and randomness ------------------------------------------------------------------


def test_node_id_is_a_160_bit_hash_of_the_identity_key() -> None:
    identity = Identity.generate(NOW_MS)
    node_id = dht_key(identity.public_key)
    expected = hashlib.blake2b(identity.public_key, digest_size=20, person=DHT_KEY_PERSON)
    assert node_id == expected.digest()
    assert len(node_id) * 8 == 160
    # The same ID is the key the node's record lives under, so a record can only be stored
    # under the ID its own identity key hashes to.
    signed = PeerRecord.create(identity, [("192.0.2.1", 4000)], seq=1, now_ms=NOW_MS)
    assert signed.record.key == node_id
    assert dht_key(Identity.generate(NOW_MS).public_key) != node_id


def test_message_ids_come_from_the_os_csprng_by_default() -> None:
    default = inspect.signature(DhtProtocol).parameters["random_bytes"].default
    assert default is os.urandom
    protocol = DhtProtocol(
        LOW_ID, RecordStorage(clock=lambda: NOW_MS), wall_clock_ms=lambda: NOW_MS
    )
    ids = {
        protocol.send_request(("192.0.2.1", 4000), Method.PING, [LOW_ID], 0.0) for _ in range(50)
    }
    assert len(ids) == 50
    assert all(len(msg_id) == 20 for msg_id in ids)


# --- the only way in --------------------------------------------------------------------------


def test_own_id_never_enters() -> None:
    table = RoutingTable(LOW_ID)
    assert table.add_verified(Contact(LOW_ID, "192.0.2.1", 4000)).result is AddResult.OWN_ID
    assert len(table) == 0


def test_routing_table_has_no_unverified_way_in() -> None:
    # The stock table's add_contact takes whatever a sender claims; ours has only
    # add_verified, which the protocol calls after the node answered our ping.
    assert hasattr(StockRoutingTable, "add_contact")
    public = {name for name in dir(RoutingTable) if not name.startswith("_")}
    assert {name for name in public if "add" in name} == {"add_verified"}


# --- one ID per ip:port -----------------------------------------------------------------------


def test_one_id_per_address() -> None:
    table = RoutingTable(LOW_ID)
    first = contact(1 << 150, "192.0.2.1")
    assert table.add_verified(first).result is AddResult.ADDED
    for other in range(2, 30):
        spoof = contact(other << 150, "192.0.2.1")
        assert table.add_verified(spoof).result is AddResult.ADDRESS_TAKEN
    assert list(table) == [first]
    assert table.contact_at(("192.0.2.1", 4000)) == first.node_id
    # The same ID answering again refreshes it; another port on the host is another address.
    assert table.add_verified(first).result is AddResult.UPDATED
    assert table.add_verified(contact(2 << 150, "192.0.2.1", 4001)).result is AddResult.ADDED
    assert len(table) == 2


def test_address_is_freed_when_its_contact_leaves_or_moves() -> None:
    table = RoutingTable(LOW_ID)
    mover = contact(1 << 150, "192.0.2.1")
    table.add_verified(mover)
    moved = Contact(mover.node_id, "198.51.100.7", 5000)
    assert table.add_verified(moved).result is AddResult.UPDATED
    assert list(table) == [moved]
    assert table.contact_at(mover.address) is None
    assert table.add_verified(contact(2 << 150, "192.0.2.1")).result is AddResult.ADDED
    table.remove(nid(2 << 150))
    assert table.contact_at(("192.0.2.1", 4000)) is None
    assert table.add_verified(contact(3 << 150, "192.0.2.1")).result is AddResult.ADDED


# --- subnets ----------------------------------------------------------------------------------


def test_at_most_two_per_ipv4_slash_24_in_a_bucket() -> None:
    table = RoutingTable(LOW_ID, exempt_loopback=False)
    results = [table.add_verified(contact(i << 150, f"203.0.113.{i}")).result for i in (1, 2, 3)]
    assert results == [AddResult.ADDED, AddResult.ADDED, AddResult.SUBNET_FULL]
    assert table.add_verified(contact(4 << 150, "203.0.114.1")).result is AddResult.ADDED
    assert len(table) == 3


def test_at_most_two_per_ipv6_slash_64_in_a_bucket() -> None:
    table = RoutingTable(LOW_ID, exempt_loopback=False)
    hosts = ["2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:db8:1:2::3"]
    results = [table.add_verified(contact(i << 150, h)).result for i, h in enumerate(hosts, 1)]
    assert results == [AddResult.ADDED, AddResult.ADDED, AddResult.SUBNET_FULL]
    assert table.add_verified(contact(9 << 150, "2001:db8:1:3::1")).result is AddResult.ADDED


def test_loopback_is_exempt_only_when_asked() -> None:
    exempt = RoutingTable(LOW_ID, exempt_loopback=True)
    strict = RoutingTable(LOW_ID, exempt_loopback=False)
    for port in range(4000, 4010):
        exempt.add_verified(contact(port << 140, "127.0.0.1", port))
        strict.add_verified(contact(port << 140, "127.0.0.1", port))
    assert len(exempt) == 10
    assert len(strict) == MAX_PER_SUBNET_PER_BUCKET


def test_subnet_limit_is_per_bucket() -> None:
    # Own ID 0 with k=4: the table splits; the far half and the near half are different
    # buckets, each may hold two contacts from the same /24.
    table = RoutingTable(LOW_ID, ksize=4, exempt_loopback=False)
    near = [contact(i, f"198.51.{i}.1") for i in range(1, 5)]
    far = [contact((1 << 159) | i, f"203.0.113.{i}") for i in range(1, 3)]
    for c in near + far:
        assert table.add_verified(c).result is AddResult.ADDED
    assert table.bucket_count() >= 2
    assert table.add_verified(contact(5, "203.0.113.9")).result is AddResult.ADDED
    assert table.add_verified(contact(6, "203.0.113.10")).result is AddResult.ADDED
    assert table.add_verified(contact((1 << 159) | 9, "203.0.113.11")).result is (
        AddResult.SUBNET_FULL
    )
    check_invariants(table)


# --- splitting, replacement and eviction ------------------------------------------------------


def far_id(i: int) -> bytes:
    """IDs in the half of the space away from HIGH_ID, all sharing the prefix 00000 and
    differing at bit 6, so their bucket's depth is 5 and it never splits (the paper's rule)."""
    return nid(((i % 2) << 154) | (i << 100))


def full_far_bucket(ksize: int = 4) -> tuple[RoutingTable, list[Contact]]:
    table = RoutingTable(HIGH_ID, ksize=ksize, exempt_loopback=False)
    actives = [Contact(far_id(i), f"198.51.{i}.1", 4000) for i in range(1, ksize + 1)]
    for c in actives:
        assert table.add_verified(c).result is AddResult.ADDED
    return table, actives


def test_bucket_covering_own_id_splits_instead_of_refusing() -> None:
    table = RoutingTable(LOW_ID, ksize=4)
    contacts = [contact(1 << (159 - i), f"198.51.{i}.1") for i in range(12)]
    for c in contacts:
        assert table.add_verified(c).result is AddResult.ADDED
    assert table.bucket_count() > 1
    assert sorted(table, key=lambda c: c.node_id) == sorted(contacts, key=lambda c: c.node_id)
    check_invariants(table)


def test_full_far_bucket_keeps_newcomer_as_replacement_and_asks_to_ping_the_head() -> None:
    table, actives = full_far_bucket()
    newcomer = Contact(far_id(9), "203.0.113.9", 4000)
    added = table.add_verified(newcomer)
    assert added.result is AddResult.BUCKET_FULL
    assert added.ping == actives[0]  # least recently seen
    assert newcomer.node_id not in table
    assert table.bucket_count() == 2


def test_head_survives_fewer_than_max_failures_then_replacement_takes_its_place() -> None:
    table, actives = full_far_bucket()
    newcomer = Contact(far_id(9), "203.0.113.9", 4000)
    table.add_verified(newcomer)
    head = actives[0]
    for _ in range(MAX_FAILURES - 1):
        assert table.record_failure(head.node_id) is False
        assert head.node_id in table
    assert table.record_failure(head.node_id) is True
    assert head.node_id not in table
    assert newcomer.node_id in table
    assert table.contact_at(newcomer.address) == newcomer.node_id
    assert table.contact_at(head.address) is None
    check_invariants(table)


def test_an_answer_resets_the_failure_count() -> None:
    table, actives = full_far_bucket()
    head = actives[0].node_id
    for _ in range(5):
        for _ in range(MAX_FAILURES - 1):
            assert table.record_failure(head) is False
        table.record_success(head)
    assert head in table


def test_promotion_does_not_bypass_the_subnet_limit() -> None:
    # Regression: the stock KBucket promotes replacements unchecked, so five replacements
    # from one /24 filed while the bucket was full took all four slots once the actives left.
    table, actives = full_far_bucket()
    for i in range(5):
        added = table.add_verified(Contact(far_id(20 + i), f"203.0.113.{i + 1}", 4000))
        assert added.result is AddResult.BUCKET_FULL
    for active in actives:
        table.remove(active.node_id)
    assert len(table) == MAX_PER_SUBNET_PER_BUCKET
    check_invariants(table)


def test_promotion_does_not_put_two_ids_at_one_address() -> None:
    # Regression: a replacement filed at an address that another ID has taken since must be
    # dropped, not promoted next to it.
    table, actives = full_far_bucket()
    replacement = Contact(far_id(9), "203.0.113.9", 4000)
    assert table.add_verified(replacement).result is AddResult.BUCKET_FULL
    elsewhere = Contact(b"\xfe" + bytes(19), "203.0.113.9", 4000)  # near our own ID
    assert table.add_verified(elsewhere).result is AddResult.ADDED
    table.remove(actives[0].node_id)
    assert replacement.node_id not in table
    assert table.contact_at(("203.0.113.9", 4000)) == elsewhere.node_id
    check_invariants(table)


# --- find_neighbors ---------------------------------------------------------------------------


def test_find_neighbors_excludes_the_requester() -> None:
    # (The stock traverser's early stop is shown in test_dht_stock_defects.py.)
    layout = [contact(i << 120 | i, f"10.{i}.0.1") for i in range(1, 40)]
    table = RoutingTable(LOW_ID)
    for c in layout:
        table.add_verified(c)
    target = layout[0].node_id
    found = table.find_neighbors(target, exclude=layout[0].address)
    assert layout[0] not in found
    assert found == brute_force(layout[1:], target, 20)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(0, 120),
    ksize=st.integers(1, 8),
    k=st.integers(1, 25),
)
def test_find_neighbors_returns_exactly_the_brute_force_k_closest(
    seed: int, size: int, ksize: int, k: int
) -> None:
    rng = random.Random(seed)
    own = rng.randbytes(20)
    table = RoutingTable(own, ksize=ksize)
    for i in range(size):
        # Clustered IDs (a shared random prefix) make deep splits and full far buckets.
        prefix = rng.choice([0, 1, 2, 3]) << 156
        node_id = nid(prefix | rng.getrandbits(150)) if rng.random() < 0.5 else rng.randbytes(20)
        table.add_verified(Contact(node_id, "127.0.0.1", 1000 + i))
    members = list(table)
    for _ in range(5):
        target = rng.randbytes(20)
        assert table.find_neighbors(target, k) == brute_force(members, target, k)
        assert closest(target, members, k) == brute_force(members, target, k)
    check_invariants(table)


# --- invariants under any sequence of operations ----------------------------------------------

operations = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "add", "fail", "remove", "success"]),
        st.integers(1, 40),  # which ID
        st.integers(0, 11),  # which address
    ),
    min_size=60,
    max_size=150,
)


@settings(max_examples=80, deadline=None)
@given(operations, st.booleans())
def test_hygiene_invariants_hold_after_any_operations(
    ops: list[tuple[str, int, int]], exempt: bool
) -> None:
    table = RoutingTable(HIGH_ID, ksize=3, exempt_loopback=exempt)
    hosts = ["203.0.113.1", "203.0.113.2", "203.0.113.3", "2001:db8::1", "2001:db8::2"]
    hosts += ["198.51.100.1", "127.0.0.1", "127.0.0.2"]
    for op, which, where in ops:
        # Mostly IDs of one far bucket that never splits (so replacements pile up), some
        # near our own ID (so buckets split).
        node_id = far_id(which) if which < 30 else nid(2**160 - which)
        address = (hosts[where % len(hosts)], 4000 + where // len(hosts))
        if op == "add":
            table.add_verified(Contact(node_id, *address))
        elif op == "fail":
            table.record_failure(node_id)
        elif op == "success":
            table.record_success(node_id)
        else:
            table.remove(node_id)
        check_invariants(table)


def test_moving_to_a_full_subnet_is_refused() -> None:
    # Regression: a contact re-verified at a new address skipped the subnet check, so known
    # contacts could gather in one /24 beyond the limit.
    table = RoutingTable(LOW_ID, exempt_loopback=False)
    for i in (1, 2):
        table.add_verified(contact(i << 150, f"203.0.113.{i}"))
    mover = contact(3 << 150, "198.51.100.1")
    table.add_verified(mover)
    moved = Contact(mover.node_id, "203.0.113.3", 4000)
    assert table.add_verified(moved).result is AddResult.SUBNET_FULL
    assert mover in list(table)
    assert table.contact_at(mover.address) == mover.node_id
    # Within its own subnet a contact may move freely.
    assert table.add_verified(Contact(mover.node_id, "198.51.100.2", 4000)).result is (
        AddResult.UPDATED
    )
    check_invariants(table)
