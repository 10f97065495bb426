"""The trio driver of the DHT: moves datagrams between a transport and :class:`DhtProtocol`.

All protocol decisions live in :mod:`p2pnode.dht.protocol` and :mod:`p2pnode.dht.lookup`; this
module only waits: for datagrams, for deadlines, for replies. The transport is anything with
``send``/``receive`` (:class:`UdpTransport` for real sockets, the in-memory network of
:mod:`p2pnode.dht.memnet` for simulations), so simulations run this very code.
"""

from __future__ import annotations

import logging
import math
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from p2pnode.dht.lookup import Lookup
from p2pnode.dht.protocol import (
    DhtProtocol,
    ReplyReceived,
    RequestFailed,
    RequestLimitError,
)
from p2pnode.dht.records import RecordError, SignedRecord, dht_key, verify_record
from p2pnode.dht.storage import StoreOutcome
from p2pnode.dht.wire import MAX_DATAGRAM_SIZE, Address, Contact, Method

log = logging.getLogger(__name__)

#: Default deadline of a record lookup, in seconds.
DEFAULT_LOOKUP_TIMEOUT: Final = 10.0
#: Seconds between sweeps of expired records.
EXPIRY_SWEEP_INTERVAL: Final = 60.0
#: Seconds between routing-table refreshes (the paper refreshes idle buckets hourly; we
#: refresh every bucket less often than each lookup refreshes the ones it touches).
REFRESH_INTERVAL: Final = 15 * 60.0
#: After a value lookup, the best record is stored again on this many of the closest nodes
#: that lacked it (the paper's caching step; heals copies lost to churn).
REPAIR_STORES: Final = 2


class DatagramTransport(Protocol):
    """What the DHT driver needs of a datagram socket."""

    @property
    def local_address(self) -> Address:
        """The address peers reach us at."""
        ...

    async def send(self, data: bytes, address: Address) -> None:
        """Send one datagram (best effort: datagrams may be lost)."""
        ...

    async def receive(self) -> tuple[bytes, Address]:
        """Wait for the next datagram."""
        ...


class UdpTransport:
    """A bound trio UDP socket.

    Resource handling: the caller closes it with :meth:`close` (or ``async with``).
    """

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._local = (host, port)

    @classmethod
    async def bind(cls, host: str = "127.0.0.1", port: int = 0) -> UdpTransport:
        """Bind a UDP socket on ``host:port`` (port 0 picks a free one).

        Raises:
            OSError: if the address cannot be bound (in use, not local, ...).
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    @property
    def local_address(self) -> Address:
        """The bound ``(host, port)``."""
        return self._local

    async def send(self, data: bytes, address: Address) -> None:
        """Send a datagram; an ICMP error from a previous send is ignored (UDP is lossy)."""
        try:
            await self._sock.sendto(data, address)
        except OSError as exc:
            log.debug("sendto %s failed: %s", address, exc)

    async def receive(self) -> tuple[bytes, Address]:
        """Receive the next datagram (at most :data:`MAX_DATAGRAM_SIZE` + 1 bytes are read,
        so an oversized one is seen as oversized, not silently truncated to a valid size)."""
        while True:
            try:
                data, address = await self._sock.recvfrom(MAX_DATAGRAM_SIZE + 1)
            except ConnectionRefusedError:
                continue  # ICMP port unreachable for an earlier send; nothing to receive
            return data, (address[0], address[1])

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    async def __aenter__(self) -> UdpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class RpcFailure(Exception):
    """A request got no valid reply (``reason``: ``timeout``, ``bad-reply`` or ``busy``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordNotFound(LookupError):
    """The lookup finished and no node holds a valid record for that identity."""


class LookupTimeout(TimeoutError):
    """The lookup's deadline passed before it finished, and no valid record had been found."""


@dataclass
class _Waiter:
    event: trio.Event
    outcome: ReplyReceived | RequestFailed | None = None


class DhtNode:
    """A running DHT node: a :class:`DhtProtocol` driven over a :class:`DatagramTransport`.

    Start it with ``await nursery.start(node.serve)``; then use :meth:`bootstrap`,
    :meth:`find_record` and :meth:`publish` from any task.

    Error handling: nothing a peer sends can make :meth:`serve` raise; malformed input is
    counted in ``protocol.stats``. Transport errors on send are logged and survived.
    """

    def __init__(
        self,
        protocol: DhtProtocol,
        transport: DatagramTransport,
        *,
        alpha: int = 3,
        wall_clock_ms: Callable[[], int],
        rng: random.Random | None = None,
    ) -> None:
        self.protocol = protocol
        self.transport = transport
        self.alpha = alpha
        self._wall_clock_ms = wall_clock_ms
        self._rng = rng or random.SystemRandom()
        self._waiters: dict[bytes, _Waiter] = {}
        self._wake = trio.Event()
        self._timer_sleeps_until = math.inf
        self._serve_nursery: trio.Nursery | None = None
        self._send_lock = trio.Lock()
        self._contacts_changed = trio.Event()
        protocol.on_contact_added = self._contact_added

    def _contact_added(self) -> None:
        self._contacts_changed.set()
        self._contacts_changed = trio.Event()

    async def wait_contact_added(self) -> None:
        """Wait until a new contact enters the routing table."""
        await self._contacts_changed.wait()

    @property
    def address(self) -> Address:
        """Where peers reach this node."""
        return self.transport.local_address

    @property
    def node_id(self) -> bytes:
        """This node's 20-byte DHT ID."""
        return self.protocol.node_id

    def now_ms(self) -> int:
        """The wall clock this node signs and checks records with, in milliseconds."""
        return self._wall_clock_ms()

    # --- the loops ---------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the receive and timer loops until cancelled; reports readiness (the local
        address) through ``task_status.started``."""
        async with trio.open_nursery() as nursery:
            self._serve_nursery = nursery
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._maintenance_loop)
            task_status.started(self.address)

    async def _receive_loop(self) -> None:
        while True:
            data, address = await self.transport.receive()
            events = self.protocol.datagram_received(data, address, trio.current_time())
            self._dispatch(events)
            self._wake_timer_if_needed()
            await self._flush()

    def _wake_timer_if_needed(self) -> None:
        # Input can create requests of the protocol's own (verification pings, hand-overs)
        # whose deadlines come before the one the timer loop is sleeping towards.
        deadline = self.protocol.next_deadline()
        if deadline is not None and deadline < self._timer_sleeps_until:
            self._wake.set()

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.protocol.next_deadline()
            self._timer_sleeps_until = deadline if deadline is not None else math.inf
            with trio.move_on_at(self._timer_sleeps_until):
                await self._wake.wait()
            self._wake = trio.Event()
            events = self.protocol.handle_timers(trio.current_time())
            self._dispatch(events)
            await self._flush()

    async def _maintenance_loop(self) -> None:
        next_refresh = trio.current_time() + REFRESH_INTERVAL
        while True:
            await trio.sleep(EXPIRY_SWEEP_INTERVAL)
            expired = self.protocol.storage.expire(self._wall_clock_ms())
            if expired:
                log.debug("dropped %d expired records", expired)
            if trio.current_time() >= next_refresh and len(self.protocol.table):
                await self.refresh()
                next_refresh = trio.current_time() + REFRESH_INTERVAL

    def _dispatch(self, events: Iterable[ReplyReceived | RequestFailed]) -> None:
        for event in events:
            waiter = self._waiters.pop(event.msg_id, None)
            if waiter is not None:
                waiter.outcome = event
                waiter.event.set()

    async def _flush(self) -> None:
        outgoing = self.protocol.take_outgoing()
        if not outgoing:
            return
        async with self._send_lock:
            for data, address in outgoing:
                await self.transport.send(data, address)

    # --- single requests ---------------------------------------------------------------------

    async def call(
        self, address: Address, method: Method, args: list[Any], *, node_id: bytes | None = None
    ) -> Any:
        """Send one request and wait for its checked reply.

        If the calling task is cancelled, the request is forgotten at once: no outstanding
        state is left behind.

        Raises:
            RpcFailure: on timeout, a malformed reply, or too many outstanding requests.
        """
        try:
            msg_id = self.protocol.send_request(
                address, method, args, trio.current_time(), node_id=node_id
            )
        except RequestLimitError:
            raise RpcFailure("busy") from None
        waiter = _Waiter(trio.Event())
        self._waiters[msg_id] = waiter
        self._wake.set()
        try:
            await self._flush()
            await waiter.event.wait()
        finally:
            if waiter.outcome is None:
                self._waiters.pop(msg_id, None)
                self.protocol.cancel(msg_id)
        outcome = waiter.outcome
        if isinstance(outcome, RequestFailed):
            raise RpcFailure(outcome.reason)
        assert outcome is not None  # the event is set only with an outcome
        return outcome.value

    async def ping(self, address: Address) -> bytes:
        """Ask ``address`` for its node ID; it is then verified and may enter the table.

        Raises:
            RpcFailure: if it does not answer properly.
        """
        node_id: bytes = await self.call(address, Method.PING, [self.node_id])
        return node_id

    # --- lookups -----------------------------------------------------------------------------

    async def run_lookup(
        self, target: bytes, *, want_value: bool = False
    ) -> tuple[Lookup, list[tuple[Contact, SignedRecord]]]:
        """Run an iterative lookup of ``target`` to completion.

        For a value lookup, every value a node returns is verified as a record for
        ``target``; invalid ones count as answers without a value (and as drops).

        Returns:
            The finished lookup and the valid records found, with who returned each.
        """
        seeds = self.protocol.table.find_neighbors(target)
        lookup = Lookup(
            target,
            seeds,
            ksize=self.protocol.ksize,
            alpha=self.alpha,
            want_value=want_value,
            own_id=self.node_id,
        )
        found: list[tuple[Contact, SignedRecord]] = []
        checked: dict[bytes, SignedRecord | RecordError] = {}
        send, receive = trio.open_memory_channel[tuple[Contact, Any]](math.inf)
        method = Method.FIND_VALUE if want_value else Method.FIND_NODE

        async def ask(contact: Contact) -> None:
            try:
                reply = await self.call(
                    contact.address, method, [self.node_id, target], node_id=contact.node_id
                )
            except RpcFailure as exc:
                reply = exc
            send.send_nowait((contact, reply))

        async with trio.open_nursery() as nursery:

            def launch() -> None:
                for contact in lookup.next_queries():
                    nursery.start_soon(ask, contact)

            launch()
            while not lookup.finished:
                contact, reply = await receive.receive()
                if isinstance(reply, RpcFailure):
                    lookup.on_failure(contact)
                elif isinstance(reply, bytes):
                    # Several nodes return the same bytes: check each distinct copy once.
                    outcome = checked.get(reply)
                    if outcome is None:
                        try:
                            outcome = verify_record(reply, key=target, now_ms=self._wall_clock_ms())
                        except RecordError as exc:
                            outcome = exc
                        checked[reply] = outcome
                    if isinstance(outcome, RecordError):
                        self.protocol.stats[f"drop:record:{outcome.reason.name.lower()}"] += 1
                        lookup.on_contacts(contact, [])
                    else:
                        lookup.on_value(contact, reply)
                        found.append((contact, outcome))
                else:
                    lookup.on_contacts(contact, reply)
                launch()
            nursery.cancel_scope.cancel()
        return lookup, found

    async def find_contacts(self, target: bytes) -> list[Contact]:
        """The k closest live nodes to ``target`` that we could find."""
        lookup, _ = await self.run_lookup(target)
        return lookup.closest_answered()

    async def find_record(
        self, identity_key: bytes, *, timeout: float = DEFAULT_LOOKUP_TIMEOUT
    ) -> SignedRecord:
        """Find the valid peer record with the highest sequence number for ``identity_key``.

        Asks several nodes (see :data:`p2pnode.dht.lookup.VALUE_QUORUM`); a forged, stale,
        expired or wrongly keyed record is never returned. Afterwards the best record is
        stored again on nodes near the key that lacked it.

        Raises:
            RecordNotFound: the lookup finished without any valid record.
            LookupTimeout: ``timeout`` seconds passed first with no valid record found.
        """
        key = dht_key(identity_key)
        candidates: list[SignedRecord] = []
        lookup: Lookup | None = None
        with trio.move_on_after(timeout):
            lookup, found = await self.run_lookup(key, want_value=True)
            candidates.extend(record for _, record in found)
        # Our own copy counts too; read after the lookup, since a newer record may have been
        # stored here while it ran.
        local = self.protocol.storage.get_record(key)
        if local is not None:
            candidates.append(local)
        if not candidates:
            if lookup is None:
                raise LookupTimeout(f"no record found within {timeout} s")
            raise RecordNotFound("no node holds a valid record for this identity")
        best = max(candidates, key=lambda signed: signed.record.seq)
        if lookup is not None:
            if self._serve_nursery is not None:
                # In the background: the caller has its answer; the repair only heals copies.
                self._serve_nursery.start_soon(self._repair, lookup, found, best)
            else:
                await self._repair(lookup, found, best)
        return best

    async def _repair(
        self, lookup: Lookup, found: Sequence[tuple[Contact, SignedRecord]], best: SignedRecord
    ) -> None:
        current = {c.node_id for c, r in found if r.record.seq >= best.record.seq}
        stale = [c for c in lookup.closest_answered() if c.node_id not in current]
        async with trio.open_nursery() as nursery:
            for contact in stale[:REPAIR_STORES]:
                nursery.start_soon(
                    self._store_one, contact, dht_key(best.record.identity_key), best.data
                )

    async def _store_one(self, contact: Contact, key: bytes, value: bytes) -> bool:
        try:
            accepted = await self.call(
                contact.address, Method.STORE, [self.node_id, key, value], node_id=contact.node_id
            )
        except RpcFailure:
            return False
        return bool(accepted)

    async def publish(self, signed: SignedRecord) -> int:
        """Store ``signed`` on the k nodes closest to its key (and here, if we are among them).

        Returns:
            How many remote nodes accepted it (their honest answers; 0 means nobody holds it
            but us).
        """
        key = dht_key(signed.record.identity_key)
        outcome = self.protocol.storage.offer(
            key, signed.data, source_ip=None, now_ms=self._wall_clock_ms()
        )
        if outcome not in (StoreOutcome.STORED, StoreOutcome.UNCHANGED):
            log.warning("our own record was refused by our storage: %s", outcome)
        contacts = await self.find_contacts(key)
        results: list[bool] = []

        async def store(contact: Contact) -> None:
            results.append(await self._store_one(contact, key, signed.data))

        async with trio.open_nursery() as nursery:
            for contact in contacts:
                nursery.start_soon(store, contact)
        return sum(results)

    # --- joining -----------------------------------------------------------------------------

    async def bootstrap(self, addresses: Iterable[Address]) -> int:
        """Join the network through any of ``addresses`` (stock kademlia nodes included).

        Pings each, then looks up our own ID to fill the routing table.

        Returns:
            How many of ``addresses`` answered.
        """
        answered = 0

        async def try_one(address: Address) -> None:
            nonlocal answered
            try:
                await self.ping(address)
            except RpcFailure:
                log.info("bootstrap peer %s:%d did not answer", *address)
            else:
                answered += 1

        async with trio.open_nursery() as nursery:
            for address in addresses:
                nursery.start_soon(try_one, address)
        if answered:
            await self.find_contacts(self.node_id)
        return answered

    async def refresh(self) -> None:
        """Look up a random ID in each bucket's range, then our own (section 2.3 of the
        paper): keeps the table full and fresh."""
        for low, high in self.protocol.table.bucket_ranges():
            target = self._rng.randint(low, high).to_bytes(20, "big")
            await self.find_contacts(target)
        await self.find_contacts(self.node_id)
