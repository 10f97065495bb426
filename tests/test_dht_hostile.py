"""Hostile input: whatever peers send, the DHT counts and drops it, stays within fixed memory,
and keeps serving. Sans-I/O for the protocol, the in-memory network for the trio driver."""

from __future__ import annotations

import functools
import ipaddress
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
import umsgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.dht import wire
from p2pnode.dht.memnet import MemoryNetwork
from p2pnode.dht.node import DhtNode
from p2pnode.dht.protocol import (
    DEFAULT_RPC_TIMEOUT,
    MAX_OUTGOING,
    MAX_PENDING_REQUESTS,
    MAX_PENDING_VERIFICATIONS,
    DhtProtocol,
    ReplyReceived,
    RequestFailed,
    RequestLimitError,
)
from p2pnode.dht.records import MAX_RECORD_SIZE, PeerRecord, SignedRecord
from p2pnode.dht.routing import subnet_of
from p2pnode.dht.storage import MAX_RECORDS_PER_SOURCE, RecordStorage
from p2pnode.dht.wire import (
    MAX_CONTACTS_PER_REPLY,
    MAX_DATAGRAM_SIZE,
    MAX_REQUEST_BODY,
    Address,
    Method,
    Request,
    Response,
)
from p2pnode.identity import Identity

NOW_MS = 1_800_000_000_000
OWN_ID = bytes([0x42]) * 20
ATTACKER: Address = ("203.0.113.66", 6666)


def wall_clock() -> int:
    return NOW_MS


def make_protocol(**kwargs: Any) -> DhtProtocol:
    return DhtProtocol(OWN_ID, RecordStorage(clock=wall_clock), wall_clock_ms=wall_clock, **kwargs)


@functools.cache
def identity(index: int) -> Identity:
    return Identity.generate(NOW_MS)


@functools.cache
def record(index: int) -> SignedRecord:
    return PeerRecord.create(identity(index), [("192.0.2.1", 4000)], seq=1, now_ms=NOW_MS)


def request_datagram(method: str, args: Any) -> bytes:
    return b"\x00" + os.urandom(20) + bytes(umsgpack.packb([method, args]))


def decoded(protocol: DhtProtocol) -> list[tuple[Request | Response, Address]]:
    return [(wire.decode_datagram(data), address) for data, address in protocol.take_outgoing()]


def drops(protocol: DhtProtocol) -> int:
    return sum(count for reason, count in protocol.stats.items() if reason.startswith("drop:"))


def assert_untouched(protocol: DhtProtocol) -> None:
    """Nothing a hostile datagram did is visible: no contact, no record, nothing pending."""
    assert len(protocol.table) == 0
    assert len(protocol.storage) == 0
    assert protocol.pending_count == 0


# --- malformed datagrams and wrong argument types ---------------------------------------------


def valid_datagrams() -> list[bytes]:
    signed = record(0)
    return [
        wire.encode_request(os.urandom(20), Method.PING, [b"\x01" * 20]),
        wire.encode_request(os.urandom(20), Method.FIND_VALUE, [b"\x01" * 20, signed.record.key]),
        wire.encode_request(
            os.urandom(20), Method.STORE, [b"\x01" * 20, signed.record.key, signed.data]
        ),
        wire.encode_response(os.urandom(20), [[b"\x02" * 20, "192.0.2.9", 4000]]),
    ]


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=20))
def test_random_datagrams_are_counted_drops(datagrams: list[bytes]) -> None:
    protocol = make_protocol()
    for data in datagrams:
        assert protocol.datagram_received(data, ATTACKER, 0.0) == []
    assert len(protocol.table) == 0
    assert len(protocol.storage) == 0


@settings(max_examples=300)
@given(st.sampled_from(range(4)), st.data())
def test_mutated_datagrams_never_raise(which: int, data: st.DataObject) -> None:
    protocol = make_protocol()
    datagram = bytearray(valid_datagrams()[which])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(datagram) - 1))
        datagram[position] = data.draw(st.integers(0, 255))
    assert protocol.datagram_received(bytes(datagram), ATTACKER, 0.0) == []
    assert len(protocol.table) == 0  # nobody enters without answering a ping


WRONG_ARGUMENTS = [
    ("ping", []),
    ("ping", ["not bytes"]),
    ("ping", [b"\x01" * 19]),
    ("ping", [12345]),
    ("ping", [None]),
    ("ping", [[b"\x01" * 20]]),
    ("ping", {"id": b"\x01" * 20}),
    ("store", [b"\x01" * 20, b"\x02" * 20]),
    ("store", [b"\x01" * 20, "key", b"value"]),
    ("store", [b"\x01" * 20, b"\x02" * 20, 3.5]),
    ("store", [b"\x01" * 20, b"\x02" * 20, {"value": b"x"}]),
    ("find_node", [b"\x01" * 20, True]),
    ("find_value", [b"\x01" * 20, b"\x02" * 21]),
    ("stun", [b"\x01" * 20]),
    ("rpc_ping", [b"\x01" * 20]),
    ("__init__", []),
    ("transport", []),
    (7, []),
    (b"ping", [b"\x01" * 20]),
]


@pytest.mark.parametrize(("method", "args"), WRONG_ARGUMENTS)
def test_wrong_argument_types_are_dropped_unanswered(method: Any, args: Any) -> None:
    protocol = make_protocol()
    assert protocol.datagram_received(request_datagram(method, args), ATTACKER, 0.0) == []
    assert protocol.take_outgoing() == []  # no reply, no verification ping
    assert drops(protocol) == 1
    assert_untouched(protocol)


# --- oversized requests -----------------------------------------------------------------------


def test_oversized_datagrams_and_requests_are_dropped() -> None:
    protocol = make_protocol()
    sender = b"\x01" * 20
    key = record(0).record.key
    cases = [
        b"\x00" + os.urandom(20) + b"\xc0" * MAX_DATAGRAM_SIZE,  # over the datagram limit
        request_datagram("store", [sender, key, b"x" * MAX_REQUEST_BODY]),  # body over 8 KiB
        request_datagram("store", [sender, key, b"x" * (MAX_RECORD_SIZE + 1)]),  # value
        request_datagram("ping", [sender] + [b"pad" * 10] * 5),  # too many arguments
    ]
    for data in cases:
        assert protocol.datagram_received(data, ATTACKER, 0.0) == []
    assert protocol.stats["drop:oversized"] == 2
    assert protocol.stats["drop:bad-argument"] == 2
    assert protocol.take_outgoing() == []
    assert_untouched(protocol)


def test_oversized_replies_fail_the_request() -> None:
    protocol = make_protocol()
    address = ("198.51.100.1", 4000)
    too_many = [[os.urandom(20), "192.0.2.1", 4000 + i] for i in range(MAX_CONTACTS_PER_REPLY + 1)]
    for method, value in [
        (Method.FIND_NODE, too_many),
        (Method.FIND_VALUE, {"value": b"x" * (MAX_RECORD_SIZE + 1)}),
    ]:
        msg_id = protocol.send_request(address, method, [OWN_ID, OWN_ID], 0.0)
        reply = wire.encode_response(msg_id, value)
        assert protocol.datagram_received(reply, address, 0.0) == [
            RequestFailed(msg_id, "bad-reply")
        ]
    assert len(protocol.table) == 0


# --- replies we did not ask for ---------------------------------------------------------------


def test_spoofed_replies_are_dropped_and_the_real_reply_still_completes() -> None:
    protocol = make_protocol()
    server = ("198.51.100.1", 4000)
    msg_id = protocol.send_request(server, Method.FIND_NODE, [OWN_ID, OWN_ID], 0.0)
    poisoned = [[os.urandom(20), "203.0.113.66", 6000 + i] for i in range(20)]
    for i in range(200):
        # Guessed message ids from the right address, and the right id from other addresses.
        guessed = wire.encode_response(os.urandom(20), poisoned)
        assert protocol.datagram_received(guessed, server, 0.001 * i) == []
        right_id = wire.encode_response(msg_id, poisoned)
        assert protocol.datagram_received(right_id, ("203.0.113.66", 6000 + i), 0.001 * i) == []
    assert protocol.stats["drop:unsolicited-reply"] == 200
    assert protocol.stats["drop:reply-from-wrong-address"] == 200
    assert protocol.pending_count == 1
    real = [[b"\x07" * 20, "192.0.2.7", 4007]]
    events = protocol.datagram_received(wire.encode_response(msg_id, real), server, 0.5)
    assert events == [ReplyReceived(msg_id, [wire.Contact(b"\x07" * 20, "192.0.2.7", 4007)])]
    assert len(protocol.table) == 0


# --- IDs spoofed from one ip:port -------------------------------------------------------------


def test_many_ids_claimed_from_one_address_yield_at_most_one_contact() -> None:
    protocol = make_protocol()
    in_flight_max = 0
    pings_sent = 0
    for i in range(200):
        claimed = os.urandom(20)
        protocol.datagram_received(
            wire.encode_request(os.urandom(20), Method.PING, [claimed]), ATTACKER, i * 0.01
        )
        in_flight_max = max(in_flight_max, protocol.pending_count)
        for message, address in decoded(protocol):
            if isinstance(message, Request):
                assert address == ATTACKER
                pings_sent += 1
                # The attacker answers our verification with yet another ID each time.
                answer = wire.encode_response(message.msg_id, os.urandom(20))
                protocol.datagram_received(answer, ATTACKER, i * 0.01)
        decoded(protocol)
    contacts = list(protocol.table)
    assert len(contacts) == 1
    assert contacts[0].address == ATTACKER
    assert in_flight_max == 1  # one verification at a time per address
    assert pings_sent <= 200
    # The k closest slots around any target hold it once at most.
    for _ in range(10):
        neighbours = protocol.table.find_neighbors(os.urandom(20))
        assert [c.address for c in neighbours].count(ATTACKER) <= 1


def test_many_ports_of_one_slash_24_fill_at_most_two_slots_per_bucket() -> None:
    protocol = make_protocol(exempt_loopback=False)
    for i in range(100):
        address = (f"203.0.113.{i % 250 + 1}", 5000 + i)
        node_id = os.urandom(20)
        protocol.datagram_received(
            wire.encode_request(os.urandom(20), Method.PING, [node_id]), address, 0.0
        )
        for message, to in decoded(protocol):
            if isinstance(message, Request):
                protocol.datagram_received(wire.encode_response(message.msg_id, node_id), to, 0.0)
        decoded(protocol)
    per_bucket = [
        sum(1 for node in bucket.nodes.values() if subnet_of(node.ip) == "203.0.113.0/24")
        for bucket in protocol.table._buckets
    ]
    assert max(per_bucket) <= 2
    assert len(protocol.table) <= 2 * protocol.table.bucket_count()


# --- store flood from one IP ------------------------------------------------------------------


def flood_records() -> list[SignedRecord]:
    return [record(i) for i in range(MAX_RECORDS_PER_SOURCE + 6)]


def store(protocol: DhtProtocol, signed: SignedRecord, source: Address) -> Any:
    msg_id = os.urandom(20)
    args = [b"\x01" * 20, signed.record.key, signed.data]
    protocol.datagram_received(wire.encode_request(msg_id, Method.STORE, args), source, 0.0)
    replies = [m for m, _ in decoded(protocol) if isinstance(m, Response) and m.msg_id == msg_id]
    assert len(replies) == 1
    return replies[0].value


def test_store_flood_from_one_ip_is_refused_beyond_the_quota() -> None:
    protocol = make_protocol()
    answers = [
        store(protocol, signed, ("203.0.113.66", 6000 + i))  # any port: one source
        for i, signed in enumerate(flood_records())
    ]
    assert answers == [True] * MAX_RECORDS_PER_SOURCE + [False] * 6
    assert len(protocol.storage) == MAX_RECORDS_PER_SOURCE
    assert protocol.stats["store:over_quota"] == 6
    # Another source is not affected by the flood.
    assert store(protocol, flood_records()[-1], ("198.51.100.1", 4000)) is True


def test_store_flood_from_one_ipv6_slash_64_is_one_source() -> None:
    protocol = make_protocol()
    base = int(ipaddress.IPv6Address("2001:db8:1:2::"))
    answers = [
        store(protocol, signed, (str(ipaddress.IPv6Address(base + i * 7919)), 6000))
        for i, signed in enumerate(flood_records())
    ]
    assert answers.count(True) == MAX_RECORDS_PER_SOURCE
    assert len(protocol.storage) <= MAX_RECORDS_PER_SOURCE


def test_invalid_stores_cost_nothing_to_keep() -> None:
    protocol = make_protocol()
    for i in range(500):
        junk = [b"\x01" * 20, os.urandom(20), os.urandom(200)]
        protocol.datagram_received(
            wire.encode_request(os.urandom(20), Method.STORE, junk), ("203.0.113.66", 6000 + i), 0.0
        )
    assert len(protocol.storage) == 0
    assert protocol.stats["store:invalid"] == 500


# --- floods of requests: bounded verifications, requests and output ---------------------------


def test_request_flood_from_many_addresses_is_bounded() -> None:
    protocol = make_protocol(exempt_loopback=False)
    replies = 0
    for i in range(1000):
        address = (f"10.{i // 250}.{i % 250}.1", 4000)
        protocol.datagram_received(
            wire.encode_request(os.urandom(20), Method.PING, [os.urandom(20)]), address, 0.0
        )
        replies += sum(isinstance(m, Response) for m, _ in decoded(protocol))
        assert len(protocol._verifying) <= MAX_PENDING_VERIFICATIONS
        assert protocol.pending_count <= MAX_PENDING_REQUESTS
    assert replies == 1000  # answering is stateless: everyone still gets a reply
    assert protocol.stats["verification-limit"] == 1000 - MAX_PENDING_VERIFICATIONS
    # Once the silent verifications time out, an honest newcomer is verified again.
    protocol.handle_timers(DEFAULT_RPC_TIMEOUT)
    assert len(protocol._verifying) == 0
    assert protocol.pending_count == 0
    honest = ("192.0.2.50", 4000)
    honest_id = b"\x50" * 20
    now = DEFAULT_RPC_TIMEOUT + 1
    protocol.datagram_received(
        wire.encode_request(os.urandom(20), Method.PING, [honest_id]), honest, now
    )
    for message, address in decoded(protocol):
        if isinstance(message, Request):
            protocol.datagram_received(
                wire.encode_response(message.msg_id, honest_id), address, now
            )
    assert list(protocol.table) == [wire.Contact(honest_id, *honest)]


def test_outgoing_queue_is_bounded_when_the_driver_falls_behind() -> None:
    protocol = make_protocol()
    for i in range(MAX_OUTGOING + 500):
        protocol.datagram_received(
            wire.encode_request(os.urandom(20), Method.STUN, []),
            ("203.0.113.66", i % 60000 + 1),
            0.0,
        )
    assert len(protocol.take_outgoing()) == MAX_OUTGOING
    assert protocol.stats["drop:outgoing-queue-full"] == 500


def test_outstanding_requests_are_capped() -> None:
    protocol = make_protocol()
    for i in range(MAX_PENDING_REQUESTS):
        protocol.send_request(("198.51.100.1", i + 1), Method.PING, [OWN_ID], 0.0)
    with pytest.raises(RequestLimitError):
        protocol.send_request(("198.51.100.1", 9), Method.PING, [OWN_ID], 0.0)
    # Verification needs a request slot too: with none free it is skipped, not an error.
    data = wire.encode_request(os.urandom(20), Method.PING, [b"\x01" * 20])
    assert protocol.datagram_received(data, ATTACKER, 0.0) == []
    assert protocol.pending_count == MAX_PENDING_REQUESTS
    assert protocol.stats["request-limit"] == 2
    protocol.take_outgoing()


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=30)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(list(Method)), msgpack_values), max_size=10))
def test_any_reply_to_a_pending_request_is_an_event_never_an_exception(
    replies: list[tuple[Method, Any]],
) -> None:
    protocol = make_protocol()
    address = ("198.51.100.1", 4000)
    for method, value in replies:
        args = (
            [] if method is Method.STUN else [OWN_ID, OWN_ID][: 1 if method is Method.PING else 2]
        )
        if method is Method.STORE:
            args = [OWN_ID, OWN_ID, b"v"]
        msg_id = protocol.send_request(address, method, args, 0.0)
        events = protocol.datagram_received(wire.encode_response(msg_id, value), address, 0.0)
        assert len(events) == 1
        assert events[0].msg_id == msg_id
        assert isinstance(events[0], ReplyReceived | RequestFailed)
    # Replies name contacts; none of them entered the table by being named.
    assert all(c.address == address for c in protocol.table)


# --- the trio driver under a flood of garbage -------------------------------------------------


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def start_node(nursery: trio.Nursery, network: MemoryNetwork, address: Address) -> DhtNode:
    protocol = DhtProtocol(
        os.urandom(20), RecordStorage(clock=wall_clock), wall_clock_ms=wall_clock
    )
    node = DhtNode(
        protocol, network.endpoint(address), wall_clock_ms=wall_clock, rng=random.Random(1)
    )
    await nursery.start(node.serve)
    return node


async def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    msg_id = rng.randbytes(20)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 64))
    if kind in (1, 2):
        return bytes([kind - 1]) + msg_id + rng.randbytes(rng.randrange(0, 64))
    if kind == 3:
        valid = bytearray(rng.choice(valid_datagrams()))
        for _ in range(rng.randrange(1, 4)):
            valid[rng.randrange(len(valid))] = rng.randrange(256)
        return bytes(valid)
    if kind == 4:
        method, args = rng.choice(WRONG_ARGUMENTS)
        return b"\x00" + msg_id + bytes(umsgpack.packb([method, args]))
    if kind == 5:
        return b"\x01" + msg_id + b"\x91" * rng.randrange(500, 5000) + b"\xc0"
    return bytes([rng.randrange(2)]) + msg_id + rng.randbytes(MAX_DATAGRAM_SIZE)


async def test_node_keeps_serving_after_thousands_of_garbage_datagrams(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    network = MemoryNetwork(seed=3)
    await nursery.start(network.run)
    node = await start_node(nursery, network, ("127.0.0.1", 4000))
    senders = [network.endpoint(("203.0.113.66", 6000 + i)) for i in range(8)]
    rng = random.Random(42)

    def processed() -> int:
        return sum(
            count
            for reason, count in node.protocol.stats.items()
            if reason.startswith(("drop:", "request:"))
        )

    total = 0

    def all_processed() -> bool:
        return processed() >= total

    for _ in range(6):  # batches, so the network's inbox limit does not drop the garbage
        for _ in range(500):
            await rng.choice(senders).send(garbage(rng), node.address)
            total += 1
        await wait_until(all_processed)
    assert network.stats["inbox-full"] == 0
    assert drops(node.protocol) >= total * 0.9
    assert all(c.address[0] != "203.0.113.66" for c in node.protocol.table)
    assert node.protocol.pending_count <= MAX_PENDING_VERIFICATIONS
    # It still answers (a task exception would have failed the test through the nursery).
    honest = await start_node(nursery, network, ("127.0.0.1", 5000))
    assert await honest.ping(node.address) == node.node_id
    await wait_until(lambda: honest.node_id in node.protocol.table)


async def test_silent_requesters_do_not_block_later_verifications(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    network = MemoryNetwork(seed=4)
    await nursery.start(network.run)
    node = await start_node(nursery, network, ("127.0.0.1", 4000))
    for i in range(MAX_PENDING_VERIFICATIONS):
        # Spoofed source addresses: requests arrive, our verification pings go nowhere.
        silent = network.endpoint((f"10.0.{i // 250}.{i % 250 + 1}", 4000))
        await silent.send(
            wire.encode_request(os.urandom(20), Method.PING, [os.urandom(20)]), node.address
        )
    await wait_until(lambda: node.protocol.stats["request:ping"] == MAX_PENDING_VERIFICATIONS)
    await trio.sleep(5 * DEFAULT_RPC_TIMEOUT)  # virtual time: every verification has expired
    newcomer = await start_node(nursery, network, ("127.0.0.1", 5000))
    assert await newcomer.ping(node.address) == node.node_id
    await wait_until(lambda: newcomer.node_id in node.protocol.table, timeout=30)
