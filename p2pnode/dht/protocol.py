"""The DHT protocol core: kademlia's RPCs as a sans-I/O state machine.

:class:`DhtProtocol` takes datagrams and the time in, and gives datagrams, events and its next
deadline out; it never touches a socket or a clock. The trio driver (:mod:`p2pnode.dht.node`)
moves bytes between a UDP socket and this object, and the simulation moves them between many
of these objects in memory.

It answers the kademlia package's RPCs (ping, store, find_node, find_value, stun) with the
package's semantics, and fixes its defects (GUIDE section 5):

- contacts enter the routing table only after answering our ping at their address;
- a malformed or unsolicited datagram is a counted drop, never an exception;
- a reply is accepted only from the address the request went to, under its random message id;
- store answers honestly (False when the value was refused), and only valid signed records are
  stored, within quotas (:mod:`p2pnode.dht.storage`);
- keys are handed to a new contact once, when it is verified, never by scanning every key on
  every packet;
- a contact is evicted after several unanswered requests, not one.

Resource handling: outstanding requests, pending verifications and the outgoing queue are all
bounded (constants below); memory does not grow with what peers send.
"""

from __future__ import annotations

import enum
import heapq
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from p2pnode.dht import wire
from p2pnode.dht.records import MAX_RECORD_SIZE
from p2pnode.dht.routing import AddResult, RoutingTable
from p2pnode.dht.storage import RecordStorage, StoreOutcome
from p2pnode.dht.wire import Address, Contact, Method, WireError

#: Seconds to wait for a reply (rpcudp waits 5 s; on loopback and typical paths replies take
#: milliseconds, and a lookup routes around a slow node rather than waiting for it).
DEFAULT_RPC_TIMEOUT: Final = 2.0
#: Seconds before an unanswered request is sent again (same message id; every kademlia RPC is
#: idempotent). Loss is then survived at the cost of this delay, not of a failed contact.
RETRANSMIT_AFTER: Final = 0.4
#: Times a request is sent again before the final timeout.
MAX_RETRANSMITS: Final = 2
#: Requests we may have outstanding at once; a request beyond this fails at once.
MAX_PENDING_REQUESTS: Final = 4096
#: Verification pings (to nodes that contacted us or that a reply named) in flight at once.
MAX_PENDING_VERIFICATIONS: Final = 256
#: Most keys offered to one newly verified contact (the closest to it). Bounds the work a
#: stream of new contacts can cause.
MAX_HANDOVER_KEYS: Final = 64
#: Datagrams queued for sending; the driver drains the queue after every input.
MAX_OUTGOING: Final = 8192


class Purpose(enum.Enum):
    """Why a request was sent: the caller's (surfaced as events) or the protocol's own."""

    CALLER = "caller"
    VERIFY = "verify"  # ping to a node before it may enter the routing table
    HANDOVER = "handover"  # store of a key to a new contact closer to it


@dataclass(frozen=True)
class ReplyReceived:
    """A caller's request was answered; ``value`` is checked (see :func:`wire.parse_reply`)."""

    msg_id: bytes
    value: Any


@dataclass(frozen=True)
class RequestFailed:
    """A caller's request got no valid reply: ``reason`` is ``timeout`` or ``bad-reply``."""

    msg_id: bytes
    reason: str


Event = ReplyReceived | RequestFailed


class RequestLimitError(RuntimeError):
    """Too many requests are outstanding; try again when some have completed."""


@dataclass
class _Pending:
    address: Address
    method: Method
    deadline: float
    purpose: Purpose
    node_id: bytes | None  # whom we believe we are asking (failures are charged by address)
    datagram: bytes
    next_send: float
    retransmits_left: int


class DhtProtocol:
    """One DHT node's protocol state: routing table, stored records, outstanding requests.

    Args:
        node_id: this node's 20-byte ID (for p2pnode nodes, ``records.dht_key`` of its
            identity key).
        storage: the records this node keeps for the network.
        wall_clock_ms: wall-clock milliseconds, for record validity (injected so simulations
            control it).
        random_bytes: source of message ids; unpredictable ids stop off-path reply spoofing.
        rpc_timeout: seconds before an unanswered request fails.
        ksize: Kademlia's k.
        exempt_loopback: passed to :class:`RoutingTable`.
    """

    def __init__(
        self,
        node_id: bytes,
        storage: RecordStorage,
        *,
        wall_clock_ms: Callable[[], int],
        random_bytes: Callable[[int], bytes] = os.urandom,
        rpc_timeout: float = DEFAULT_RPC_TIMEOUT,
        ksize: int = 20,
        exempt_loopback: bool = True,
    ) -> None:
        if len(node_id) != wire.NODE_ID_SIZE:
            raise ValueError("node IDs are 20 bytes")
        self.node_id = node_id
        self.storage = storage
        self.table = RoutingTable(node_id, ksize=ksize, exempt_loopback=exempt_loopback)
        self.ksize = ksize
        self.rpc_timeout = rpc_timeout
        #: Counts of dropped input and other notable happenings, by reason.
        self.stats: Counter[str] = Counter()
        self._wall_clock_ms = wall_clock_ms
        self._random_bytes = random_bytes
        self._pending: dict[bytes, _Pending] = {}
        self._deadlines: list[tuple[float, bytes]] = []
        self._verifying: dict[Address, bytes] = {}
        self._outgoing: list[tuple[bytes, Address]] = []
        #: Called whenever a new contact enters the routing table.
        self.on_contact_added: Callable[[], None] | None = None

    # --- output ------------------------------------------------------------------------------

    def take_outgoing(self) -> list[tuple[bytes, Address]]:
        """Datagrams to send, in order; the queue is emptied."""
        out, self._outgoing = self._outgoing, []
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timers` next has work, or None if nothing is outstanding."""
        while self._deadlines and self._deadlines[0][1] not in self._pending:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    @property
    def pending_count(self) -> int:
        """Requests awaiting a reply."""
        return len(self._pending)

    # --- requests we make --------------------------------------------------------------------

    def send_request(
        self,
        address: Address,
        method: Method,
        args: list[Any],
        now: float,
        *,
        node_id: bytes | None = None,
        purpose: Purpose = Purpose.CALLER,
    ) -> bytes:
        """Queue a request to ``address`` and return its message id.

        Its outcome comes back as a :class:`ReplyReceived` or :class:`RequestFailed` event
        (only for ``Purpose.CALLER``).

        Raises:
            RequestLimitError: if :data:`MAX_PENDING_REQUESTS` are already outstanding.
        """
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            self.stats["request-limit"] += 1
            raise RequestLimitError("too many outstanding DHT requests")
        msg_id = self._random_bytes(wire.MSG_ID_SIZE)
        while msg_id in self._pending:  # only with a broken random source; never reuse an id
            msg_id = self._random_bytes(wire.MSG_ID_SIZE)
        datagram = wire.encode_request(msg_id, method, args)
        self._queue(datagram, address)
        deadline = now + self.rpc_timeout
        next_send = now + RETRANSMIT_AFTER
        self._pending[msg_id] = _Pending(
            address, method, deadline, purpose, node_id, datagram, next_send, MAX_RETRANSMITS
        )
        heapq.heappush(self._deadlines, (min(deadline, next_send), msg_id))
        return msg_id

    def cancel(self, msg_id: bytes) -> None:
        """Forget an outstanding request (its reply, if any, will be dropped as unsolicited)."""
        self._pending.pop(msg_id, None)

    def request_args(self, method: Method, key: bytes | None = None) -> list[Any]:
        """The argument list of one of our requests: our ID first, as rpcudp expects."""
        return [self.node_id] if key is None else [self.node_id, key]

    def verify(self, address: Address, now: float, *, node_id: bytes | None = None) -> None:
        """Ping ``address`` so that, if it answers, it enters the routing table.

        Skipped (and counted) when a verification of that address is already in flight or
        too many are.
        """
        if address in self._verifying:
            return
        if len(self._verifying) >= MAX_PENDING_VERIFICATIONS:
            self.stats["verification-limit"] += 1
            return
        try:
            msg_id = self.send_request(
                address, Method.PING, [self.node_id], now, node_id=node_id, purpose=Purpose.VERIFY
            )
        except RequestLimitError:
            return
        self._verifying[address] = msg_id

    # --- input -------------------------------------------------------------------------------

    def datagram_received(self, data: bytes, address: Address, now: float) -> list[Event]:
        """Process one datagram from ``address``.

        Requests are answered (the reply is queued); replies complete requests. Anything
        malformed, unsolicited or from the wrong address is dropped and counted in
        :attr:`stats`. Never raises for any input.
        """
        try:
            datagram = wire.decode_datagram(data)
        except WireError as exc:
            self.stats[f"drop:{exc.reason}"] += 1
            return []
        if isinstance(datagram, wire.Request):
            self._handle_request(datagram, address, now)
            return []
        return self._handle_response(datagram, address, now)

    def handle_timers(self, now: float) -> list[Event]:
        """Send again each request due for retransmission; fail every request whose deadline
        has passed."""
        events: list[Event] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, msg_id = heapq.heappop(self._deadlines)
            pending = self._pending.get(msg_id)
            if pending is None:
                continue
            if now < pending.deadline:
                if pending.retransmits_left > 0 and now >= pending.next_send:
                    pending.retransmits_left -= 1
                    pending.next_send = now + RETRANSMIT_AFTER
                    self.stats["retransmit"] += 1
                    self._queue(pending.datagram, pending.address)
                upcoming = pending.deadline
                if pending.retransmits_left > 0:
                    upcoming = min(upcoming, pending.next_send)
                heapq.heappush(self._deadlines, (upcoming, msg_id))
                continue
            del self._pending[msg_id]
            self.stats["timeout"] += 1
            # Charge the failure to the contact that lives at the silent address, never to
            # the ID the request names: that ID may be a requester's unverified claim, and
            # charging it would let anyone evict an honest contact by claiming its ID from
            # an address that never answers our verification ping.
            owner = self.table.contact_at(pending.address)
            if owner is not None:
                self.table.record_failure(owner)
            if pending.purpose is Purpose.VERIFY:
                self._verifying.pop(pending.address, None)
            elif pending.purpose is Purpose.CALLER:
                events.append(RequestFailed(msg_id, "timeout"))
        return events

    def _handle_request(self, request: wire.Request, address: Address, now: float) -> None:
        try:
            parsed = wire.parse_request(request, max_value_size=MAX_RECORD_SIZE)
        except WireError as exc:
            self.stats[f"drop:{exc.reason}"] += 1
            return
        self.stats[f"request:{parsed.method.value}"] += 1
        reply = self._answer(parsed, address)
        self._queue(wire.encode_response(request.msg_id, reply), address)
        sender = parsed.sender_id
        if sender is not None and sender != self.node_id:
            known = self.table.contact_at(address)
            if known != sender:
                self.verify(address, now, node_id=sender)

    def _answer(self, parsed: wire.ParsedRequest, address: Address) -> Any:
        method = parsed.method
        if method is Method.PING:
            return self.node_id
        if method is Method.STUN:
            return [address[0], address[1]]
        assert parsed.key is not None
        if method is Method.STORE:
            outcome = self.storage.offer(
                parsed.key, parsed.value, source_ip=address[0], now_ms=self._wall_clock_ms()
            )
            self.stats[f"store:{outcome.name.lower()}"] += 1
            return outcome in (StoreOutcome.STORED, StoreOutcome.UNCHANGED)
        if method is Method.FIND_VALUE:
            record = self.storage.get(parsed.key)
            if record is not None:
                return {"value": record}
        neighbours = self.table.find_neighbors(parsed.key, exclude=address)
        return [[c.node_id, c.host, c.port] for c in neighbours]

    def _handle_response(
        self, response: wire.Response, address: Address, now: float
    ) -> list[Event]:
        pending = self._pending.get(response.msg_id)
        if pending is None:
            self.stats["drop:unsolicited-reply"] += 1
            return []
        if pending.address != address:
            # Someone other than the node we asked; the real reply may still come.
            self.stats["drop:reply-from-wrong-address"] += 1
            return []
        del self._pending[response.msg_id]
        try:
            value = wire.parse_reply(pending.method, response.value, max_value_size=MAX_RECORD_SIZE)
        except WireError as exc:
            self.stats[f"drop:{exc.reason}"] += 1
            if pending.purpose is Purpose.VERIFY:
                self._verifying.pop(address, None)
            return (
                [RequestFailed(response.msg_id, "bad-reply")]
                if pending.purpose is Purpose.CALLER
                else []
            )
        owner = self.table.contact_at(address)
        if owner is not None:
            self.table.record_success(owner)
        if pending.purpose is Purpose.VERIFY:
            self._verifying.pop(address, None)
            self._admit(Contact(value, address[0], address[1]), now)
            return []
        if pending.purpose is Purpose.HANDOVER:
            return []
        if pending.method is Method.PING:
            # The caller pinged this address and it answered with its ID: that is exactly
            # the verification a contact needs.
            self._admit(Contact(value, address[0], address[1]), now)
        elif owner is None:
            self.verify(address, now, node_id=pending.node_id)
        return [ReplyReceived(response.msg_id, value)]

    # --- routing table upkeep ----------------------------------------------------------------

    def _admit(self, contact: Contact, now: float) -> None:
        """Add a contact that answered our ping; hand it the keys it should now hold."""
        added = self.table.add_verified(contact)
        self.stats[f"contact:{added.result.value}"] += 1
        if added.result is AddResult.ADDED and self.on_contact_added is not None:
            self.on_contact_added()
        if added.result is AddResult.ADDED:
            # Only a contact that was actually added costs a scan of the stored keys: a node
            # refused by the table (address taken, subnet full) must not trigger one per reply.
            for key, value in self._handover_candidates(contact):
                try:
                    self.send_request(
                        contact.address,
                        Method.STORE,
                        [self.node_id, key, value],
                        now,
                        node_id=contact.node_id,
                        purpose=Purpose.HANDOVER,
                    )
                except RequestLimitError:
                    break
        elif added.ping is not None:
            # Bucket full: check the head is alive; if it fails repeatedly it is evicted and
            # the newcomer (kept as a replacement) takes its place.
            self.verify(added.ping.address, now, node_id=added.ping.node_id)

    def _handover_candidates(self, contact: Contact) -> list[tuple[bytes, bytes]]:
        """Keys the new contact should store (section 2.5 of the paper): those for which we are
        the closest node we know and the newcomer is among the k closest. Called once, just
        after the contact was added (the table is consulted without it), over at most
        :data:`MAX_HANDOVER_KEYS` keys nearest to it."""
        new_id = int.from_bytes(contact.node_id, "big")
        own_id = int.from_bytes(self.node_id, "big")
        keys = heapq.nsmallest(
            MAX_HANDOVER_KEYS,
            self.storage.keys_closer_to(new_id, own_id),
            key=lambda key: int.from_bytes(key, "big") ^ new_id,
        )
        chosen = []
        for key in keys:
            key_id = int.from_bytes(key, "big")
            neighbours = self.table.find_neighbors(key, exclude=contact.address)
            if neighbours:
                nearest = int.from_bytes(neighbours[0].node_id, "big") ^ key_id
                farthest = int.from_bytes(neighbours[-1].node_id, "big") ^ key_id
                we_are_closest = (own_id ^ key_id) < nearest
                newcomer_close = len(neighbours) < self.ksize or (new_id ^ key_id) < farthest
                if not (we_are_closest and newcomer_close):
                    continue
            value = self.storage.get(key)
            if value is not None:
                chosen.append((key, value))
        return chosen

    def _queue(self, data: bytes, address: Address) -> None:
        if len(self._outgoing) >= MAX_OUTGOING:
            self.stats["drop:outgoing-queue-full"] += 1
            return
        self._outgoing.append((data, address))
