"""DhtProtocol driven with byte strings and explicit times: the kademlia RPCs answered with the
stock semantics, verification before admission, reply matching, retransmission and timeouts."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import pytest
import umsgpack

from p2pnode.dht import wire
from p2pnode.dht.protocol import (
    DEFAULT_RPC_TIMEOUT,
    MAX_RETRANSMITS,
    RETRANSMIT_AFTER,
    DhtProtocol,
    ReplyReceived,
    RequestFailed,
)
from p2pnode.dht.records import PeerRecord, SignedRecord
from p2pnode.dht.storage import RecordStorage
from p2pnode.dht.wire import Address, Contact, Method, Request, Response
from p2pnode.identity import Identity

NOW_MS = 1_800_000_000_000
OWN_ID = bytes([0x5A]) * 20


def make_protocol(**kwargs: Any) -> DhtProtocol:
    return DhtProtocol(
        OWN_ID, RecordStorage(clock=lambda: NOW_MS), wall_clock_ms=lambda: NOW_MS, **kwargs
    )


@functools.cache
def identity(index: int) -> Identity:
    return Identity.generate(NOW_MS)


def record(index: int, seq: int = 1) -> SignedRecord:
    return PeerRecord.create(identity(index), [("192.0.2.1", 4000 + seq)], seq=seq, now_ms=NOW_MS)


@dataclass(frozen=True)
class Peer:
    node_id: bytes
    address: Address

    @property
    def contact(self) -> Contact:
        return Contact(self.node_id, *self.address)

    def request(self, method: Method, *extra: Any) -> tuple[bytes, bytes]:
        msg_id = os.urandom(20)
        args = [] if method is Method.STUN else [self.node_id, *extra]
        return msg_id, wire.encode_request(msg_id, method, args)


def peer(index: int, host: str | None = None) -> Peer:
    node_id = hashlib.sha1(index.to_bytes(4, "big")).digest()
    return Peer(node_id, (host or f"198.51.{index % 250}.{index // 250 + 1}", 4000 + index))


def sent(protocol: DhtProtocol) -> list[tuple[Request | Response, Address]]:
    return [(wire.decode_datagram(data), address) for data, address in protocol.take_outgoing()]


def ask(
    protocol: DhtProtocol, sender: Peer, method: Method, *extra: Any, now: float = 0.0
) -> tuple[Any, list[tuple[Request, Address]]]:
    """Deliver one request; return our reply's value and the requests we sent in turn."""
    msg_id, data = sender.request(method, *extra)
    assert protocol.datagram_received(data, sender.address, now) == []
    out = sent(protocol)
    replies = [(m, a) for m, a in out if isinstance(m, Response)]
    assert len(replies) == 1
    reply, address = replies[0]
    assert (reply.msg_id, address) == (msg_id, sender.address)
    return reply.value, [(m, a) for m, a in out if isinstance(m, Request)]


def admit(protocol: DhtProtocol, sender: Peer, now: float = 0.0) -> list[tuple[Request, Address]]:
    """``sender`` pings us and answers our verification ping; returns what we sent then."""
    _, requests = ask(protocol, sender, Method.PING, now=now)
    pings = [m for m, a in requests if m.method == "ping" and a == sender.address]
    assert len(pings) == 1
    reply = wire.encode_response(pings[0].msg_id, sender.node_id)
    assert protocol.datagram_received(reply, sender.address, now) == []
    assert sender.node_id in protocol.table
    return [(m, a) for m, a in sent(protocol) if isinstance(m, Request)]


# --- the RPCs, answered as stock kademlia answers them ----------------------------------------


def test_ping_is_answered_with_our_id() -> None:
    protocol = make_protocol()
    value, _ = ask(protocol, peer(1), Method.PING)
    assert value == OWN_ID
    assert protocol.stats["request:ping"] == 1


def test_stun_is_answered_with_the_address_we_saw() -> None:
    protocol = make_protocol()
    value, requests = ask(protocol, Peer(b"\x01" * 20, ("203.0.113.5", 61000)), Method.STUN)
    assert value == ["203.0.113.5", 61000]
    assert requests == []  # stun names no ID, so there is nobody to verify


def test_a_request_built_by_stock_rpcudp_is_answered() -> None:
    protocol = make_protocol()
    msg_id = hashlib.sha1(os.urandom(32)).digest()
    sender = peer(1)
    data = b"\x00" + msg_id + umsgpack.packb(["find_node", (sender.node_id, OWN_ID)])
    protocol.datagram_received(data, sender.address, 0.0)
    replies = [(m, a) for m, a in sent(protocol) if isinstance(m, Response)]
    assert replies == [(Response(msg_id, []), sender.address)]


def test_find_node_returns_the_k_closest_known_contacts_as_triples() -> None:
    protocol = make_protocol(ksize=8)
    peers = [peer(i) for i in range(1, 25)]
    for p in peers:
        admit(protocol, p)
    requester = peers[0]
    target = hashlib.sha1(b"target").digest()
    value, _ = ask(protocol, requester, Method.FIND_NODE, target)
    others = [p.contact for p in peers[1:]]
    target_id = int.from_bytes(target, "big")
    expected = sorted(others, key=lambda c: int.from_bytes(c.node_id, "big") ^ target_id)[:8]
    assert value == [[c.node_id, c.host, c.port] for c in expected]


def test_find_value_returns_contacts_until_a_record_is_stored() -> None:
    protocol = make_protocol()
    helper = peer(2)
    admit(protocol, helper)
    signed = record(0)
    value, _ = ask(protocol, peer(1), Method.FIND_VALUE, signed.record.key)
    assert value == [[helper.node_id, *helper.address]]
    stored, _ = ask(protocol, peer(1), Method.STORE, signed.record.key, signed.data)
    assert stored is True
    value, _ = ask(protocol, peer(1), Method.FIND_VALUE, signed.record.key)
    assert value == {"value": signed.data}


def test_store_answers_true_only_for_a_valid_new_or_identical_record() -> None:
    protocol = make_protocol()
    sender = peer(1)
    first, second, other = record(0, seq=1), record(0, seq=2), record(1)
    key = first.record.key

    def store(key: bytes, value: bytes) -> Any:
        answer, _ = ask(protocol, sender, Method.STORE, key, value)
        return answer

    assert store(key, b"not a record") is False
    assert store(key, other.data) is False  # a valid record, under someone else's key
    assert store(key, second.data[:-1] + bytes([second.data[-1] ^ 1])) is False  # forged
    assert protocol.storage.get(key) is None
    assert store(key, second.data) is True
    assert store(key, second.data) is True  # the same record again: still held
    assert store(key, first.data) is False  # an older sequence number
    assert protocol.storage.get(key) == second.data
    assert protocol.stats["store:invalid"] == 3
    assert protocol.stats["store:stale"] == 1


# --- verification before admission -----------------------------------------------------------


def test_a_requester_is_not_added_until_it_answers_our_ping() -> None:
    protocol = make_protocol()
    sender = peer(1)
    pings: list[Request] = []
    for method, extra in [
        (Method.PING, ()),
        (Method.FIND_NODE, (OWN_ID,)),
        (Method.FIND_VALUE, (OWN_ID,)),
        (Method.STORE, (OWN_ID, b"junk")),
    ]:
        _, requests = ask(protocol, sender, method, *extra)
        pings += [m for m, a in requests if m.method == "ping" and a == sender.address]
        assert len(protocol.table) == 0
    # One verification ping in flight per address, however many requests arrive.
    assert len(pings) == 1
    assert protocol.pending_count == 1
    reply = wire.encode_response(pings[0].msg_id, sender.node_id)
    protocol.datagram_received(reply, sender.address, 0.1)
    assert list(protocol.table) == [sender.contact]


def test_the_id_in_the_ping_reply_counts_not_the_claimed_one() -> None:
    protocol = make_protocol()
    claimed = peer(1)
    _, requests = ask(protocol, claimed, Method.PING)
    ((ping, _),) = requests
    real_id = b"\x77" * 20
    protocol.datagram_received(wire.encode_response(ping.msg_id, real_id), claimed.address, 0.0)
    assert list(protocol.table) == [Contact(real_id, *claimed.address)]


def test_an_unanswered_verification_admits_nobody_and_can_be_retried() -> None:
    protocol = make_protocol()
    sender = peer(1)
    ask(protocol, sender, Method.PING)
    assert protocol.handle_timers(DEFAULT_RPC_TIMEOUT) == []  # no caller event for it
    assert len(protocol.table) == 0
    assert protocol.pending_count == 0
    _, requests = ask(protocol, sender, Method.PING, now=DEFAULT_RPC_TIMEOUT + 1)
    assert [m.method for m, _ in requests] == ["ping"]


def test_a_verification_reply_from_another_address_admits_nobody() -> None:
    protocol = make_protocol()
    sender = peer(1)
    _, requests = ask(protocol, sender, Method.PING)
    ((ping, _),) = requests
    impostor = ("203.0.113.66", 4000)
    protocol.datagram_received(wire.encode_response(ping.msg_id, b"\x66" * 20), impostor, 0.0)
    assert len(protocol.table) == 0
    assert protocol.stats["drop:reply-from-wrong-address"] == 1


def test_a_verified_contact_is_not_pinged_again_on_every_request() -> None:
    protocol = make_protocol()
    sender = peer(1)
    admit(protocol, sender)
    for _ in range(5):
        _, requests = ask(protocol, sender, Method.FIND_NODE, OWN_ID)
        assert requests == []


def test_contacts_named_in_a_reply_are_not_added() -> None:
    protocol = make_protocol()
    responder = peer(1)
    admit(protocol, responder)
    msg_id = protocol.send_request(
        responder.address, Method.FIND_NODE, [OWN_ID, OWN_ID], 0.0, node_id=responder.node_id
    )
    sent(protocol)
    named = [peer(i).contact for i in range(10, 30)]
    value = [[c.node_id, c.host, c.port] for c in named]
    events = protocol.datagram_received(wire.encode_response(msg_id, value), responder.address, 0.0)
    assert events == [ReplyReceived(msg_id, named)]
    assert list(protocol.table) == [responder.contact]


def test_our_own_ping_answered_admits_the_contact() -> None:
    protocol = make_protocol()
    other = peer(1)
    msg_id = protocol.send_request(other.address, Method.PING, [OWN_ID], 0.0)
    events = protocol.datagram_received(
        wire.encode_response(msg_id, other.node_id), other.address, 0.0
    )
    assert events == [ReplyReceived(msg_id, other.node_id)]
    assert other.node_id in protocol.table


def test_a_find_node_reply_from_an_unknown_address_triggers_verification() -> None:
    protocol = make_protocol()
    other = peer(1)
    msg_id = protocol.send_request(other.address, Method.FIND_NODE, [OWN_ID, OWN_ID], 0.0)
    sent(protocol)
    protocol.datagram_received(wire.encode_response(msg_id, []), other.address, 0.0)
    assert len(protocol.table) == 0
    ((ping, address),) = sent(protocol)
    assert isinstance(ping, Request)
    assert (ping.method, address) == ("ping", other.address)


# --- reply matching ---------------------------------------------------------------------------


def test_a_reply_is_accepted_only_from_the_asked_address_under_its_message_id() -> None:
    protocol = make_protocol()
    target = peer(1)
    msg_id = protocol.send_request(target.address, Method.STUN, [], 0.0)
    wrong_address = ("203.0.113.9", target.address[1])
    assert (
        protocol.datagram_received(wire.encode_response(msg_id, ["1.2.3.4", 5]), wrong_address, 0.1)
        == []
    )
    assert (
        protocol.datagram_received(
            wire.encode_response(os.urandom(20), ["1.2.3.4", 5]), target.address, 0.1
        )
        == []
    )
    assert protocol.pending_count == 1
    events = protocol.datagram_received(
        wire.encode_response(msg_id, ["192.0.2.77", 4000]), target.address, 0.2
    )
    assert events == [ReplyReceived(msg_id, ("192.0.2.77", 4000))]
    # The same reply again (a duplicate datagram) is unsolicited now.
    assert (
        protocol.datagram_received(
            wire.encode_response(msg_id, ["192.0.2.77", 4000]), target.address, 0.3
        )
        == []
    )
    assert protocol.stats["drop:reply-from-wrong-address"] == 1
    assert protocol.stats["drop:unsolicited-reply"] == 2


def test_a_malformed_reply_fails_the_request() -> None:
    protocol = make_protocol()
    target = peer(1)
    msg_id = protocol.send_request(target.address, Method.FIND_NODE, [OWN_ID, OWN_ID], 0.0)
    events = protocol.datagram_received(
        wire.encode_response(msg_id, [[b"short", "192.0.2.1", 4000]]), target.address, 0.0
    )
    assert events == [RequestFailed(msg_id, "bad-reply")]
    assert protocol.pending_count == 0
    assert protocol.stats["drop:bad-reply"] == 1


# --- retransmission and timeouts --------------------------------------------------------------


def test_retransmits_after_retransmit_after_then_times_out_at_rpc_timeout() -> None:
    protocol = make_protocol()
    target = peer(1)
    msg_id = protocol.send_request(target.address, Method.PING, [OWN_ID], 10.0)
    ((original, address),) = protocol.take_outgoing()
    assert address == target.address
    assert protocol.next_deadline() == pytest.approx(10.0 + RETRANSMIT_AFTER)
    assert protocol.handle_timers(10.0 + RETRANSMIT_AFTER / 2) == []
    assert protocol.take_outgoing() == []

    now = 10.0
    for _ in range(MAX_RETRANSMITS):
        deadline = protocol.next_deadline()
        assert deadline is not None
        assert deadline == pytest.approx(now + RETRANSMIT_AFTER)
        now = deadline
        assert protocol.handle_timers(now) == []
        assert protocol.take_outgoing() == [(original, target.address)]  # same id and bytes
    assert protocol.next_deadline() == pytest.approx(10.0 + DEFAULT_RPC_TIMEOUT)
    assert protocol.handle_timers(10.0 + DEFAULT_RPC_TIMEOUT - 0.01) == []
    assert protocol.take_outgoing() == []  # no more than MAX_RETRANSMITS
    assert protocol.handle_timers(10.0 + DEFAULT_RPC_TIMEOUT) == [RequestFailed(msg_id, "timeout")]
    assert protocol.pending_count == 0
    assert protocol.next_deadline() is None
    assert protocol.stats["retransmit"] == MAX_RETRANSMITS
    # A reply after the timeout completes nothing.
    late = wire.encode_response(msg_id, target.node_id)
    assert protocol.datagram_received(late, target.address, 13.0) == []
    assert protocol.stats["drop:unsolicited-reply"] == 1


def test_rpc_timeout_is_configurable() -> None:
    protocol = make_protocol(rpc_timeout=5.0)
    msg_id = protocol.send_request(peer(1).address, Method.PING, [OWN_ID], 0.0)
    events: list[Any] = []
    now = 0.0
    while (deadline := protocol.next_deadline()) is not None and now < 100:
        now = deadline
        events += protocol.handle_timers(now)
    assert events == [RequestFailed(msg_id, "timeout")]
    assert now == pytest.approx(5.0)


def test_a_reply_to_a_retransmission_completes_the_request() -> None:
    protocol = make_protocol()
    target = peer(1)
    msg_id = protocol.send_request(target.address, Method.PING, [OWN_ID], 0.0)
    protocol.handle_timers(RETRANSMIT_AFTER)
    assert len(protocol.take_outgoing()) == 2
    reply = wire.encode_response(msg_id, target.node_id)
    events = protocol.datagram_received(reply, target.address, RETRANSMIT_AFTER + 0.01)
    assert events == [ReplyReceived(msg_id, target.node_id)]
    assert protocol.handle_timers(DEFAULT_RPC_TIMEOUT * 2) == []


def test_cancel_forgets_the_request() -> None:
    protocol = make_protocol()
    target = peer(1)
    msg_id = protocol.send_request(target.address, Method.PING, [OWN_ID], 0.0)
    protocol.cancel(msg_id)
    assert protocol.pending_count == 0
    assert protocol.next_deadline() is None
    assert protocol.handle_timers(DEFAULT_RPC_TIMEOUT * 2) == []
    reply = wire.encode_response(msg_id, target.node_id)
    assert protocol.datagram_received(reply, target.address, 0.1) == []
    assert protocol.stats["drop:unsolicited-reply"] == 1


def test_timeouts_of_several_requests_come_in_deadline_order() -> None:
    protocol = make_protocol()
    ids = [protocol.send_request(peer(i).address, Method.PING, [OWN_ID], i * 0.5) for i in range(4)]
    events = protocol.handle_timers(100.0)
    assert events == [RequestFailed(msg_id, "timeout") for msg_id in ids]
