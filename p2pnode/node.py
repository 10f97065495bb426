"""The node service: durable sending, delivery with retries, receiving with receipts.

``send`` writes the message to the outbox and returns once that write is durable; delivery
runs in the background: find the recipient's record (peer cache first, then the DHT), reach it
over a link, send the sealed envelope, and mark the message delivered when the recipient's
signed receipt comes back. Delivery starts while the outbox write is being committed, so the
commit's disk flush and the trip to the recipient overlap: what ``send`` promises is that a
message it returned an id for is never lost. A crash before it returns leaves the caller
without an id (as any crash in the middle of a call does); the recipient may have the message
by then. Failed attempts are retried with exponential backoff and jitter until the message
expires (default 7 days), when it is marked failed with the reason.

Receiving: an envelope is opened and verified, stored durably in the inbox, and only then
acknowledged with a receipt. A duplicate id is acknowledged again and stored once. Each peer's
envelopes pass a token bucket; a flooding peer's link is simply read more slowly, which slows
that peer and no other.

Crash safety follows from the order of those steps: nothing is acknowledged before it is
durable, and message ids make every repetition harmless.

Resource handling: :meth:`NodeService.run` owns the store worker, the link manager and every
delivery task; cancelling it stops them (a commit in progress completes first).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final, Protocol

import trio

from p2pnode.clock import wall_clock_ms
from p2pnode.dht.records import PeerRecord, RecordError, SignedRecord, dht_key, verify_record
from p2pnode.envelope import (
    MAX_BODY_SIZE,
    MAX_RECEIPT_IDS,
    EnvelopeError,
    Message,
    make_receipt,
    new_message_id,
    open_message,
    open_receipt,
    seal_message,
)
from p2pnode.identity import Identity
from p2pnode.link.frames import Frame, FrameKind
from p2pnode.link.manager import Link, LinkError, LinkManager
from p2pnode.ratelimit import KeyedLimiter
from p2pnode.store import DeliveryState, OutboxEntry, Store, UnknownMessageError
from p2pnode.storeworker import StoreWorker

log = logging.getLogger(__name__)

DAY_MS: Final = 24 * 60 * 60 * 1000
#: A message not delivered within this long is marked failed.
DEFAULT_EXPIRY_MS: Final = 7 * DAY_MS
#: Backoff after the n-th failed attempt: uniformly random between half and all of
#: ``min(BASE * 2**n, MAX)`` ("equal jitter"), so retries of many senders spread out.
BACKOFF_BASE_MS: Final = 1000
BACKOFF_MAX_MS: Final = 60 * 60 * 1000
#: A sent message whose receipt has not come within this long is sent again.
RECEIPT_TIMEOUT_MS: Final = 30_000
#: Seconds between scans of the outbox for due messages when nothing wakes the scanner.
DELIVERY_SCAN_INTERVAL: Final = 1.0
#: Due messages taken per scan.
DELIVERY_BATCH: Final = 1000
#: Seconds to find a recipient's record in the DHT.
LOOKUP_TIMEOUT: Final = 10.0
#: Envelopes accepted per second from one peer, sustained, and as a burst. Well above what an
#: honest node sends; a flooding peer is read at this pace.
INCOMING_PER_SECOND: Final = 5000.0
INCOMING_BURST: Final = 10_000.0
#: Seconds a sent message waits for its receipt before "sent" is written to the outbox.
MARK_SENT_DELAY: Final = 0.2
#: Messages sent to one recipient and awaiting their receipts, at most. More waiting messages
#: stay queued until receipts come: a backlog is sealed as the recipient keeps up, not all at
#: once (memory stays bounded, and receipts come well within :data:`MARK_SENT_DELAY`: at 4,000
#: messages per second 256 are 64 ms of work).
MAX_IN_FLIGHT: Final = 256
#: Messages sealed in one go before the link may write them: the recipient starts on the first
#: while the next are sealed (sealing 256 at once held everything back for 25 ms).
SEAL_CHUNK: Final = 32
#: Recipients' verified records kept in memory.
MAX_REMEMBERED_RECORDS: Final = 4096
#: Events buffered per subscriber; a subscriber that falls further behind misses events
#: (counted), it never slows the node.
SUBSCRIBER_BUFFER: Final = 1000


class PeerDirectory(Protocol):
    """Where the node finds other nodes' records (the DHT, or a fixed table in tests)."""

    async def find_record(
        self, identity_key: bytes, *, timeout: float | None = None
    ) -> SignedRecord:
        """The current valid record of ``identity_key``; raises LookupError or TimeoutError."""
        ...


class StaticDirectory:
    """A :class:`PeerDirectory` over a fixed table of records (tests, benchmarks, and nodes
    whose peers are configured rather than looked up)."""

    def __init__(self, records: dict[bytes, SignedRecord] | None = None) -> None:
        self.records: dict[bytes, SignedRecord] = dict(records or {})

    def add(self, signed: SignedRecord) -> None:
        """Serve ``signed`` for its identity key (replacing any older one)."""
        self.records[signed.record.identity_key] = signed

    async def find_record(
        self, identity_key: bytes, *, timeout: float | None = None
    ) -> SignedRecord:
        """The record of ``identity_key``; LookupError if the table has none."""
        try:
            return self.records[identity_key]
        except KeyError:
            raise LookupError("no record for this identity") from None


class EventKind(enum.Enum):
    """What a subscriber hears about."""

    MESSAGE = "message"  # a new message was stored in the inbox
    DELIVERY = "delivery"  # an outgoing message changed state


@dataclass(frozen=True)
class NodeEvent:
    """A notification for subscribers (the control API's event stream)."""

    kind: EventKind
    message_id: bytes
    peer: bytes
    state: DeliveryState | None = None
    body: bytes | None = None
    sent_at: int | None = None
    received_at: int | None = None
    error: str | None = None


@dataclass
class NodeConfig:
    """Tunables of the node service (defaults are the documented constants)."""

    listen: tuple[str, int] = ("127.0.0.1", 0)
    expiry_ms: int = DEFAULT_EXPIRY_MS
    receipt_timeout_ms: int = RECEIPT_TIMEOUT_MS
    incoming_per_second: float = INCOMING_PER_SECOND
    incoming_burst: float = INCOMING_BURST
    lookup_timeout: float = LOOKUP_TIMEOUT
    backoff_base_ms: int = BACKOFF_BASE_MS
    backoff_max_ms: int = BACKOFF_MAX_MS
    max_in_flight: int = MAX_IN_FLIGHT


def backoff_ms(
    attempts: int,
    rng: random.Random,
    *,
    base_ms: int = BACKOFF_BASE_MS,
    max_ms: int = BACKOFF_MAX_MS,
) -> int:
    """Delay before the next attempt after ``attempts`` failures (see :data:`BACKOFF_BASE_MS`)."""
    ceiling = min(max_ms, base_ms * 2 ** min(attempts, 32))
    return int(rng.uniform(ceiling / 2, ceiling))


class NodeService:
    """A messaging node: identity, store, links and a peer directory, put to work.

    Args:
        identity: this node's keys.
        store: its durable store (the service serialises all access to it).
        directory: where recipients' records are found.
        config: see :class:`NodeConfig`.
    """

    def __init__(
        self,
        identity: Identity,
        store: Store,
        directory: PeerDirectory,
        *,
        config: NodeConfig | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or NodeConfig()
        self.worker = StoreWorker(store, after_commit=self._send_receipts)
        self.directory = directory
        self.links = LinkManager(identity.signing_key, self._on_frame, on_link=self._on_link)
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._incoming = KeyedLimiter(self.config.incoming_per_second, self.config.incoming_burst)
        self._wake = trio.Event()
        # Per recipient with a delivery task: the messages waiting for it, by id.
        self._queues: dict[bytes, dict[bytes, OutboxEntry]] = {}
        # Per recipient: messages sent and awaiting their receipt, by id, with when sent.
        self._awaiting: dict[bytes, dict[bytes, float]] = {}
        self._awaiting_recipient: dict[bytes, bytes] = {}  # message id -> recipient
        # Receipted messages whose delivered state is being committed: out of the window
        # already (the peer has them), but not to be sent again by a scan meanwhile.
        self._recording: set[bytes] = set()
        self._state_changed: dict[bytes, trio.Event] = {}
        self._subscribers: list[trio.MemorySendChannel[NodeEvent]] = []
        self._nursery: trio.Nursery | None = None
        self._progress = trio.Event()  # set when receipts arrive
        # Sent messages not yet recorded as "sent" (see _mark_sent_loop), with when and the
        # retry time to record.
        self._unmarked: dict[bytes, tuple[int, int]] = {}
        self._unmarked_added = trio.Event()
        # Received messages durably stored but not yet acknowledged, per link (see
        # _send_receipts), in arrival order.
        self._receipts_due: dict[Link, dict[bytes, None]] = {}
        # Verified records of recent recipients (saves a store read and two signature checks
        # per delivery); bounded, oldest forgotten first.
        self._records: dict[bytes, PeerRecord] = {}
        #: Called with the message id whenever a valid receipt arrives, before it is recorded
        #: (an observation point for measurements; it must not block).
        self.on_receipt: Callable[[bytes], None] | None = None
        #: Counters: messages sent, received, duplicates, rejections by reason, and so on.
        self.stats: Counter[str] = Counter()

    @property
    def public_key(self) -> bytes:
        """This node's identity key."""
        return self.identity.public_key

    def use_identity(self, identity: Identity) -> None:
        """Open envelopes with ``identity``'s keys from now on: the same identity key with a
        rotated encryption key (older keys stay usable while they may still open messages).

        Raises:
            ValueError: if ``identity`` has another identity key.
        """
        if identity.public_key != self.identity.public_key:
            raise ValueError("a running node keeps its identity key")
        self.identity = identity

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the store worker, the link listener and delivery; report readiness with
        ``task_status.started(self)`` once links are listening."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.worker.run)
            await nursery.start(self.links.serve, *self.config.listen)
            nursery.start_soon(self._delivery_loop)
            nursery.start_soon(self._mark_sent_loop)
            task_status.started(self)

    def own_record(self, seq: int, addresses: Sequence[tuple[str, int]]) -> SignedRecord:
        """Our signed peer record advertising ``addresses``."""
        return PeerRecord.create(self.identity, addresses, seq=seq, now_ms=self._clock())

    # --- sending -----------------------------------------------------------------------------

    async def send(self, recipient: bytes, body: bytes) -> bytes:
        """Queue ``body`` for ``recipient``; returns the message id once the outbox row is
        durable. Delivery continues in the background, across restarts.

        Delivery starts when the outbox write's commit begins, beside it. If that write
        fails, the message is withdrawn and this raises; a copy already sent may still reach
        the recipient, who stores it once.

        Raises:
            ValueError: for a recipient key that is not 32 bytes, or a body over
                :data:`MAX_BODY_SIZE`.
        """
        if len(recipient) != 32:
            raise ValueError("a recipient is a 32-byte identity key")
        if len(body) > MAX_BODY_SIZE:
            raise ValueError(f"the message body is {len(body)} bytes; the limit is {MAX_BODY_SIZE}")
        message_id = new_message_id()
        now = self._clock()
        expires = now + self.config.expiry_ms
        entry = OutboxEntry.queued(message_id, recipient, body, now, expires)

        def deliver() -> None:
            # Straight to delivery once the outbox commit begins, overlapping it (sealing
            # first would delay the commit, and so this return, by the seal). The outbox scan
            # covers retries. A receipt's store change queues behind this write: it finds the
            # row.
            if self._nursery is not None and not self._send_now(entry):
                self._dispatch([entry])

        try:
            await self.worker.write(
                lambda s: s.enqueue(message_id, recipient, body, now, expires), on_start=deliver
            )
        except BaseException:
            self._withdraw(recipient, message_id)
            raise
        self.stats["queued"] += 1
        return message_id

    def _withdraw(self, recipient: bytes, message_id: bytes) -> None:
        """Forget a message whose outbox write failed: unsent, it is not sent; sent, its
        receipt (if any) finds no row and changes nothing."""
        queue = self._queues.get(recipient)
        if queue is not None:
            queue.pop(message_id, None)
        self._receipt_settled(message_id)
        self._unmarked.pop(message_id, None)

    async def message_state(self, message_id: bytes) -> OutboxEntry | None:
        """The outbox entry of ``message_id`` (None if unknown)."""
        return await self.worker.read(lambda s: s.outbox_get(message_id))

    async def wait_for_outcome(self, message_id: bytes) -> OutboxEntry:
        """Wait until ``message_id`` is delivered or failed; returns its entry.

        Raises:
            KeyError: if no such message was sent from this node.
        """
        while True:
            changed = self._state_changed.setdefault(message_id, trio.Event())
            entry = await self.message_state(message_id)
            if entry is None:
                raise KeyError(message_id.hex())
            if entry.state in (DeliveryState.DELIVERED, DeliveryState.FAILED):
                return entry
            await changed.wait()

    def subscribe(self) -> trio.MemoryReceiveChannel[NodeEvent]:
        """A channel of :class:`NodeEvent`; close it to unsubscribe."""
        send, receive = trio.open_memory_channel[NodeEvent](SUBSCRIBER_BUFFER)
        self._subscribers.append(send)
        return receive

    def _publish(self, event: NodeEvent) -> None:
        if event.kind is EventKind.DELIVERY:
            changed = self._state_changed.pop(event.message_id, None)
            if changed is not None:
                changed.set()
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.stats["event-dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    # --- delivery ----------------------------------------------------------------------------

    async def _delivery_loop(self) -> None:
        # At start every pending message is due: a "sent" one from before a restart has no
        # link left to bring its receipt.
        start = self._clock()
        await self.worker.write(functools.partial(Store.outbox_make_all_due, now=start))
        while True:
            now = self._clock()
            expired = await self.worker.write(functools.partial(Store.outbox_expire, now=now))
            for message_id in expired:
                self._receipt_settled(message_id)
                self._publish(
                    NodeEvent(
                        EventKind.DELIVERY, message_id, b"", DeliveryState.FAILED, error="expired"
                    )
                )
            due = await self.worker.read(
                functools.partial(Store.outbox_due, now=now, limit=DELIVERY_BATCH)
            )
            self._dispatch(due)
            with trio.move_on_after(DELIVERY_SCAN_INTERVAL):
                await self._wake.wait()
            self._wake = trio.Event()

    def _dispatch(self, due: list[OutboxEntry]) -> None:
        assert self._nursery is not None
        stale = trio.current_time() - self.config.receipt_timeout_ms / 1000
        for entry in due:
            if entry.message_id in self._recording:
                continue  # receipted; its delivered state is on its way to the store
            awaiting = self._awaiting.get(entry.recipient, {})
            sent_at = awaiting.get(entry.message_id)
            if sent_at is not None:
                if sent_at > stale:
                    continue  # sent recently; its receipt may still come
                self._receipt_settled(entry.message_id)  # given up on: no longer in flight
            queue = self._queues.get(entry.recipient)
            if queue is None:
                self._start_delivery(entry.recipient, {entry.message_id: entry})
            else:
                if not queue:
                    self._progressed()  # its delivery task may be waiting for more to send
                queue.setdefault(entry.message_id, entry)

    async def _deliver_to(self, recipient: bytes) -> None:
        """Deliver everything queued for ``recipient`` over one link, until its queue is
        empty and its receipts are in (or the receipt timeout passes)."""
        queue = self._queues[recipient]
        try:
            try:
                record, link = await self._reach(recipient)
            except (LinkError, LookupError, TimeoutError, RecordError) as exc:
                await self._attempt_failed(list(queue.values()), f"cannot reach it: {exc}")
                queue.clear()
                return
            while queue or self._awaiting.get(recipient):
                room = min(self._room(recipient), SEAL_CHUNK)
                batch = [queue.pop(i) for i in list(islice(queue, room))]
                if batch:
                    try:
                        self._send_batch(link, record, batch)
                    except LinkError as exc:
                        await self._attempt_failed(batch, f"link lost: {exc}")
                        return
                    # Let the link write this chunk (and receipts be read) before sealing more.
                    await trio.lowlevel.checkpoint()
                with trio.move_on_after(self.config.receipt_timeout_ms / 1000) as waited:
                    await self._wait_progress(recipient, link)
                if link.closed.is_set():
                    lost = list(self._awaiting.get(recipient, {}))
                    await self._retry_ids(lost, "link closed before the receipt came")
                    return
                if waited.cancelled_caught:
                    # No receipt for a whole timeout: the outbox scan resends what is still
                    # unreceipted, and sends what is still queued.
                    return
        finally:
            if self._queues.get(recipient) is queue:
                del self._queues[recipient]
                if queue:
                    self._wake.set()

    def _room(self, recipient: bytes) -> int:
        """How many more messages may be sent to ``recipient`` before receipts come."""
        return max(0, self.config.max_in_flight - len(self._awaiting.get(recipient, ())))

    async def _wait_progress(self, recipient: bytes, link: Link) -> None:
        """Return when messages for ``recipient`` are queued and may be sent, all its receipts
        are in, or the link closes."""
        while not (
            link.closed.is_set()
            or (self._queues.get(recipient) and self._room(recipient))
            or not self._awaiting.get(recipient)
        ):
            with trio.move_on_after(1.0):  # also notices the link closing
                await self._progress.wait()

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _receipt_settled(self, message_id: bytes) -> None:
        recipient = self._awaiting_recipient.pop(message_id, None)
        if recipient is not None:
            awaiting = self._awaiting.get(recipient)
            if awaiting is not None:
                awaiting.pop(message_id, None)
                if not awaiting:
                    del self._awaiting[recipient]

    async def _reach(self, recipient: bytes) -> tuple[PeerRecord, Link]:
        link = self.links.get(recipient)
        record = await self._resolve(recipient, refresh=False)
        if link is not None:
            return record, link
        try:
            return record, await self.links.connect(recipient, record.addresses)
        except LinkError:
            fresh = await self._resolve(recipient, refresh=True)
            if fresh.addresses == record.addresses:
                raise
            return fresh, await self.links.connect(recipient, fresh.addresses)

    async def _resolve(self, recipient: bytes, *, refresh: bool) -> PeerRecord:
        """The recipient's record: from memory, else the peer cache, else the DHT (also when
        ``refresh`` asks for a fresh one, e.g. after its cached addresses failed)."""
        now = self._clock()
        if not refresh:
            known = self._known_record(recipient, now)
            if known is not None:
                return known
            cached = await self.worker.read(lambda s: s.peer_get(recipient))
            if cached is not None:
                try:
                    record = verify_record(cached[0], key=dht_key(recipient), now_ms=now).record
                except RecordError:
                    pass  # expired or superseded: look it up afresh
                else:
                    self._records[recipient] = record
                    return record
        signed = await self.directory.find_record(recipient, timeout=self.config.lookup_timeout)
        now = self._clock()
        await self.worker.write(
            lambda s: s.peer_put(recipient, signed.data, signed.record.seq, now)
        )
        self._remember(recipient, signed.record)
        return signed.record

    def _known_record(self, recipient: bytes, now: int) -> PeerRecord | None:
        """The recipient's record held in memory, if it and its encryption key are valid at
        ``now``."""
        known = self._records.get(recipient)
        if known is not None and known.expires > now and known.encryption_key_expires > now:
            return known
        return None

    def _remember(self, recipient: bytes, record: PeerRecord) -> None:
        if len(self._records) >= MAX_REMEMBERED_RECORDS:
            self._records.pop(next(iter(self._records)))
        self._records[recipient] = record

    def _send_now(self, entry: OutboxEntry) -> bool:
        """Seal and send ``entry`` in the caller's step if its recipient has no delivery task
        and an open link, a valid record in memory and room in its window; a delivery task is
        then started to wait for the receipt (and retry if the link closes). Returns whether
        it was sent; if not, the caller dispatches it as usual.

        On the round trip this saves the scheduler round that starting a delivery task takes
        before it seals: 0.07-0.14 ms of a 1.9-2.2 ms round trip here, in three runs that
        alternated it message by message with the task-only path."""
        assert self._nursery is not None
        recipient = entry.recipient
        if recipient in self._queues or self._room(recipient) == 0:
            return False
        link = self.links.get(recipient)
        record = self._known_record(recipient, self._clock())
        if link is None or link.closed.is_set() or record is None:
            return False
        try:
            self._send_batch(link, record, [entry])
        except LinkError:
            return False  # the delivery task reconnects
        self._start_delivery(recipient, {})
        return True

    def _start_delivery(self, recipient: bytes, queue: dict[bytes, OutboxEntry]) -> None:
        """Start ``recipient``'s delivery task with ``queue`` to send; the queue exists for
        exactly as long as the task runs."""
        assert self._nursery is not None
        self._queues[recipient] = queue
        self._nursery.start_soon(self._deliver_to, recipient)

    def _send_batch(self, link: Link, record: PeerRecord, batch: list[OutboxEntry]) -> None:
        """Seal ``batch`` for ``record``'s node, write it to ``link`` and track each message
        until its receipt.

        Raises:
            LinkError: the link is closed; the messages not yet written are not tracked, and
                the caller retries the batch.
        """
        now = self._clock()
        sent_at = trio.current_time()
        for entry in batch:
            _, wire = seal_message(
                self.identity.signing_key,
                entry.recipient,
                record.encryption_key,
                entry.body,
                now_ms=now,
                message_id=entry.message_id,
            )
            link.send(FrameKind.ENVELOPE, wire)
            self._awaiting.setdefault(entry.recipient, {})[entry.message_id] = sent_at
            self._awaiting_recipient[entry.message_id] = entry.recipient
        link.flush()
        self.stats["sent"] += len(batch)
        retry_at = now + self.config.receipt_timeout_ms
        for entry in batch:
            self._unmarked[entry.message_id] = (now, retry_at)
        self._unmarked_added.set()

    async def _mark_sent_loop(self) -> None:
        """Record "sent" for messages whose receipt has not come within
        :data:`MARK_SENT_DELAY`. Most receipts come sooner, and then the delivered state is the
        only write: one disk flush per message saved, and none competing with the receiver's
        on the round trip. Nothing depends on "sent" being durable: after a restart every
        pending message is sent again."""
        while True:
            await self._unmarked_added.wait()
            self._unmarked_added = trio.Event()
            # Only messages sent before the wait began: one sent during it has not waited its
            # MARK_SENT_DELAY yet (marking those too wrote "sent" for a quarter of all
            # messages under load, each receipted a few milliseconds later); they are the
            # next round's.
            waited, self._unmarked = self._unmarked, {}
            await trio.sleep(MARK_SENT_DELAY)
            pending = {
                message_id: times
                for message_id, times in waited.items()
                if message_id in self._awaiting_recipient
            }
            if not pending:
                continue

            def mark(store: Store, pending: dict[bytes, tuple[int, int]] = pending) -> None:
                for message_id, (at, retry_at) in pending.items():
                    with contextlib.suppress(UnknownMessageError):  # its write failed
                        store.mark_sent(message_id, at, retry_at)

            def marked(_result: None, _error: BaseException | None) -> None:
                self._wake.set()  # marked entries leave the due list: the scan sees further

            await self.worker.submit(mark, marked)

    async def _attempt_failed(self, entries: list[OutboxEntry], error: str) -> None:
        now = self._clock()
        config = self.config
        plans = [
            (
                e.message_id,
                now
                + backoff_ms(
                    e.attempts,
                    self._rng,
                    base_ms=config.backoff_base_ms,
                    max_ms=config.backoff_max_ms,
                ),
            )
            for e in entries
        ]
        for message_id, _ in plans:
            self._receipt_settled(message_id)

        def record(store: Store) -> None:
            for message_id, at in plans:
                with contextlib.suppress(UnknownMessageError):  # its write failed
                    store.record_attempt_failure(message_id, now, at, error)

        if plans:
            self.stats["attempt-failed"] += len(plans)
            log.info("delivery of %d message(s) failed: %s", len(plans), error)
            await self.worker.write(record)

    async def _retry_ids(self, ids: list[bytes], error: str) -> None:
        entries = await self.worker.read(lambda s: [e for i in ids if (e := s.outbox_get(i))])
        await self._attempt_failed(
            [e for e in entries if e.state in (DeliveryState.QUEUED, DeliveryState.SENT)], error
        )
        self._wake.set()

    def _on_link(self, link: Link) -> None:
        """A link to a peer came up (either side dialled): whatever waits for that peer goes
        now, rather than when its backoff ends."""
        if self._nursery is not None:
            self._nursery.start_soon(self._flush_pending_for, link.peer)

    async def _flush_pending_for(self, peer: bytes) -> None:
        now = self._clock()
        pending = await self.worker.read(
            functools.partial(
                Store.outbox_pending_for, recipient=peer, now=now, limit=DELIVERY_BATCH
            )
        )
        if pending:
            self._dispatch(pending)

    # --- receiving ---------------------------------------------------------------------------

    async def _on_frame(self, link: Link, frame: Frame) -> None:
        if frame.kind is FrameKind.ENVELOPE:
            await self._on_envelope(link, frame.data)
        elif frame.kind is FrameKind.RECEIPT:
            await self._on_receipt(link, frame.data)

    async def _on_envelope(self, link: Link, wire: bytes) -> None:
        bucket = self._incoming.bucket(link.peer)
        if not bucket.try_take(trio.current_time()):
            self.stats["throttled"] += 1
            # This peer's link waits; others are unaffected.
            while not bucket.try_take(trio.current_time()):
                await trio.sleep(bucket.wait_time(trio.current_time()))
        now = self._clock()
        try:
            message = open_message(
                wire,
                own_identity=self.public_key,
                decryption_keys=self.identity.decryption_keys(now),
                now_ms=now,
            )
        except EnvelopeError as exc:
            self.stats[f"rejected:{exc.reason.value}"] += 1
            log.info("rejected an envelope from %s: %s", link.peer.hex()[:16], exc)
            return
        if message.sender != link.peer:
            self.stats["rejected:sender-is-not-link-peer"] += 1
            return

        def committed(new: bool | None, error: BaseException | None) -> None:
            if error is not None:
                log.error("could not store a message: %s", error)
                return  # not acknowledged: the sender will try again
            self._stored(link, message, bool(new), now)

        await self.worker.submit(
            lambda s: s.accept_incoming(
                message.id, message.sender, message.body, message.timestamp, now
            ),
            committed,
        )

    def _stored(self, link: Link, message: Message, new: bool, now: int) -> None:
        """``message`` is durable (or was already): acknowledge it, and tell subscribers."""
        self.stats["received" if new else "duplicate"] += 1
        self._receipts_due.setdefault(link, {})[message.id] = None
        if new:
            self._publish(
                NodeEvent(
                    EventKind.MESSAGE,
                    message.id,
                    message.sender,
                    body=message.body,
                    sent_at=message.timestamp,
                    received_at=now,
                )
            )

    def _send_receipts(self) -> None:
        """Acknowledge what the commit that just ended stored: one signed receipt per link, up
        to :data:`~p2pnode.envelope.MAX_RECEIPT_IDS` ids each. Runs right after each group
        commit's callbacks, so a receipt leaves in the same scheduler step as its commit ends."""
        if not self._receipts_due:
            return
        due, self._receipts_due = self._receipts_due, {}
        now = self._clock()
        for link, stored in due.items():
            ids = list(stored)
            for start in range(0, len(ids), MAX_RECEIPT_IDS):
                chunk = ids[start : start + MAX_RECEIPT_IDS]
                receipt = make_receipt(self.identity.signing_key, link.peer, chunk, now_ms=now)
                try:
                    link.send(FrameKind.RECEIPT, receipt)
                except LinkError:
                    # The sender sends them again; they are acknowledged then.
                    self.stats["receipt-unsent"] += len(chunk)
            link.flush()

    async def _on_receipt(self, link: Link, data: bytes) -> None:
        try:
            receipt = open_receipt(data, own_identity=self.public_key, peer_identity=link.peer)
        except EnvelopeError as exc:
            self.stats[f"rejected-receipt:{exc.reason.value}"] += 1
            return
        peer = link.peer
        ids = [i for i in receipt.ids if self._awaiting_recipient.get(i, peer) == peer]
        if len(ids) < len(receipt.ids):
            self.stats["rejected-receipt:wrong-peer"] += len(receipt.ids) - len(ids)
        if not ids:
            return
        if self.on_receipt is not None:
            for message_id in ids:
                self.on_receipt(message_id)
        now = self._clock()
        # The peer holds these durably: they leave the in-flight window now, so sending goes
        # on while the delivered state is committed here (waiting for that commit as well
        # kept the window full of messages the receiver was already done with).
        for message_id in ids:
            self._receipt_settled(message_id)
        self._recording.update(ids)
        self._progressed()

        def committed(changed: list[bytes] | None, error: BaseException | None) -> None:
            # On an error the rows stay pending and the outbox scan sends them again; the
            # receiver acknowledges them again and stores nothing twice.
            self._recording.difference_update(ids)
            if error is None and changed:
                self.stats["delivered"] += len(changed)
                for message_id in changed:
                    self._publish(
                        NodeEvent(EventKind.DELIVERY, message_id, peer, DeliveryState.DELIVERED)
                    )

        try:
            await self.worker.submit(
                functools.partial(
                    Store.mark_delivered_by, recipient=peer, message_ids=ids, now=now
                ),
                committed,
            )
        except BaseException:
            # Not queued (cancelled while the worker was full): nothing will record them, so
            # a later scan must be free to send them again.
            self._recording.difference_update(ids)
            raise
