"""The node service in process: delivery with receipts, retries, dedup, throttling, no plaintext.

Nodes talk over real loopback TCP links; records come from a fixed directory instead of the DHT
(the DHT has its own tests), so each test controls where a recipient can be reached.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pnode import node as node_module
from p2pnode import storeworker
from p2pnode.clock import wall_clock_ms
from p2pnode.dht.records import PeerRecord
from p2pnode.envelope import make_receipt, open_message, open_receipt, seal_message
from p2pnode.identity import Identity
from p2pnode.link.frames import Frame, FrameKind
from p2pnode.link.manager import Link, LinkManager
from p2pnode.node import EventKind, NodeConfig, NodeService, StaticDirectory
from p2pnode.store import DeliveryState, Store, StoreError

FAST = NodeConfig(backoff_base_ms=20, backoff_max_ms=100)


class Directory(StaticDirectory):
    """A fixed table of records standing in for the DHT, filled from identities."""

    def publish(
        self, identity: Identity, addresses: Sequence[tuple[str, int]], seq: int = 1
    ) -> None:
        self.add(PeerRecord.create(identity, addresses, seq=seq, now_ms=wall_clock_ms()))


@asynccontextmanager
async def running(
    nursery: trio.Nursery,
    tmp_path: Path,
    name: str,
    directory: Directory,
    *,
    config: NodeConfig = FAST,
    publish: bool = True,
    identity: Identity | None = None,
) -> AsyncIterator[NodeService]:
    identity = identity or Identity.generate(wall_clock_ms())
    store = Store.open(tmp_path / f"{name}.db")
    node = NodeService(identity, store, directory, config=config)
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with scope:
                await node.run(task_status=task_status)
        finally:
            stopped.set()

    await nursery.start(run)
    assert node.links.listen_address is not None
    if publish:
        directory.publish(identity, [node.links.listen_address])
    try:
        yield node
    finally:
        scope.cancel()
        # The store is closed only once the node has stopped using it (a store call running
        # in a thread finishes first).
        with trio.CancelScope(shield=True), trio.fail_after(10):
            await stopped.wait()
        store.close()


@asynccontextmanager
async def alice_and_bob(tmp_path: Path) -> AsyncIterator[tuple[NodeService, NodeService]]:
    """Two nodes, "a" and "b", running with :data:`FAST` settings and each other's records in
    one directory; both are stopped when the block ends."""
    directory = Directory()
    async with (
        trio.open_nursery() as nursery,
        running(nursery, tmp_path, "a", directory) as alice,
        running(nursery, tmp_path, "b", directory) as bob,
    ):
        yield alice, bob


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.01)


async def test_message_is_delivered_once_with_a_receipt(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with alice_and_bob(tmp_path) as (alice, bob):
            events = bob.subscribe()
            message_id = await alice.send(bob.public_key, "héllo bob".encode())
            entry = await alice.wait_for_outcome(message_id)
            assert entry.state is DeliveryState.DELIVERED
            event = await events.receive()
            assert (event.kind, event.message_id, event.peer, event.body) == (
                EventKind.MESSAGE,
                message_id,
                alice.public_key,
                "héllo bob".encode(),
            )
            inbox = await bob.worker.read(lambda s: s.inbox_list(False, 10))
            assert [(m.message_id, m.sender, m.body) for m in inbox] == [
                (message_id, alice.public_key, "héllo bob".encode())
            ]
            # Replies flow over the same link, in the other direction.
            reply = await bob.send(alice.public_key, b"hi alice")
            assert (await bob.wait_for_outcome(reply)).state is DeliveryState.DELIVERED
            assert alice.links.open_links == 1 and bob.links.open_links == 1


class _SentAtStepEnd(trio.abc.Instrument):
    """Records ``node.stats["sent"]`` each time ``task`` ends a scheduler step."""

    def __init__(self, task: trio.lowlevel.Task, node: NodeService) -> None:
        self.task, self.node = task, node
        self.sent: list[int] = []

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.sent.append(self.node.stats["sent"])


async def _send_watching_steps(node: NodeService, recipient: bytes, body: bytes) -> list[int]:
    """Send ``body``; return ``node.stats["sent"]`` at the end of each of this task's steps
    during the call (the first entry: when ``send`` first yielded)."""
    instrument = _SentAtStepEnd(trio.lowlevel.current_task(), node)
    trio.lowlevel.add_instrument(instrument)
    try:
        await node.send(recipient, body)
    finally:
        trio.lowlevel.remove_instrument(instrument)
    return instrument.sent


async def test_a_message_to_a_linked_peer_is_sent_before_send_first_yields(
    tmp_path: Path,
) -> None:
    """With a link open, the envelope is on it within the step that called ``send``, without
    waiting a scheduler round for a delivery task (the round trip is that much shorter)."""
    with trio.fail_after(20):
        async with alice_and_bob(tmp_path) as (alice, bob):
            # No link yet: the delivery task connects first, so nothing is sent then.
            sent = await _send_watching_steps(alice, bob.public_key, b"first")
            assert sent[0] == 0
            await wait_until(lambda: alice.stats["delivered"] == 1)
            await trio.testing.wait_all_tasks_blocked()  # its delivery task has ended

            sent = await _send_watching_steps(alice, bob.public_key, b"second")
            assert sent[0] == 2
            await wait_until(lambda: alice.stats["delivered"] == 2)
            inbox = await bob.worker.read(lambda s: s.inbox_list(False, 10))
            assert sorted(m.body for m in inbox) == [b"first", b"second"]


async def test_send_returns_only_after_the_outbox_row_is_durable(tmp_path: Path) -> None:
    directory = Directory()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with running(nursery, tmp_path, "a", directory) as alice:
                nobody = Identity.generate(wall_clock_ms()).public_key  # no record anywhere
                message_id = await alice.send(nobody, b"queued")
                # Another connection, as after a crash, sees the row at once.
                row = (
                    sqlite3.connect(tmp_path / "a.db")
                    .execute("SELECT body FROM outbox WHERE id = ?", (message_id,))
                    .fetchone()
                )
                assert row == (b"queued",)
                nursery.cancel_scope.cancel()


async def test_unreachable_recipient_is_retried_until_it_comes_online(tmp_path: Path) -> None:
    directory = Directory()
    bob_identity = Identity.generate(wall_clock_ms())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with running(nursery, tmp_path, "a", directory) as alice:
                message_id = await alice.send(bob_identity.public_key, b"eventually")
                await wait_until(lambda: alice.stats["attempt-failed"] >= 2)
                entry = await alice.message_state(message_id)
                assert entry is not None and entry.state is DeliveryState.QUEUED
                assert entry.attempts >= 2 and "cannot reach" in (entry.last_error or "")
                async with running(nursery, tmp_path, "b", directory, identity=bob_identity) as bob:
                    entry = await alice.wait_for_outcome(message_id)
                    assert entry.state is DeliveryState.DELIVERED
                    assert await bob.worker.read(lambda s: s.unread_count()) == 1
                nursery.cancel_scope.cancel()


async def test_undeliverable_message_fails_with_the_reason_when_it_expires(tmp_path: Path) -> None:
    directory = Directory()
    config = NodeConfig(backoff_base_ms=20, backoff_max_ms=50, expiry_ms=300)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with running(nursery, tmp_path, "a", directory, config=config) as alice:
                nobody = Identity.generate(wall_clock_ms()).public_key
                message_id = await alice.send(nobody, b"never")
                entry = await alice.wait_for_outcome(message_id)
                assert entry.state is DeliveryState.FAILED
                assert entry.last_error == "expired"
                nursery.cancel_scope.cancel()


class RawPeer:
    """A bare link endpoint playing a sender by hand, to send exact frames."""

    def __init__(self) -> None:
        self.identity = Identity.generate(wall_clock_ms())
        self.receipts: list[bytes] = []
        self.envelopes: list[tuple[Link, bytes]] = []
        self.links = LinkManager(self.identity.signing_key, self._on_frame)

    async def _on_frame(self, link: Link, frame: Frame) -> None:
        if frame.kind is FrameKind.RECEIPT:
            self.receipts.append(frame.data)
        elif frame.kind is FrameKind.ENVELOPE:
            self.envelopes.append((link, frame.data))

    def acknowledge(self, envelopes: list[tuple[Link, bytes]]) -> None:
        """Open the envelopes and send one receipt for them all."""
        now = wall_clock_ms()
        keys = self.identity.decryption_keys(now)
        messages = [
            open_message(
                wire, own_identity=self.identity.public_key, decryption_keys=keys, now_ms=now
            )
            for _, wire in envelopes
        ]
        receipt = make_receipt(
            self.identity.signing_key, messages[0].sender, [m.id for m in messages], now_ms=now
        )
        envelopes[0][0].send(FrameKind.RECEIPT, receipt)


async def test_at_most_max_in_flight_messages_await_receipts(tmp_path: Path) -> None:
    directory = Directory()
    raw = RawPeer()
    config = NodeConfig(backoff_base_ms=20, backoff_max_ms=100, max_in_flight=4)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(raw.links.serve)
            assert raw.links.listen_address is not None
            directory.publish(raw.identity, [raw.links.listen_address])
            async with running(nursery, tmp_path, "a", directory, config=config) as alice:
                ids = [await alice.send(raw.identity.public_key, b"%d" % i) for i in range(10)]
                acknowledged = 0
                for sent in (4, 8, 10):
                    await wait_until(lambda sent=sent: len(raw.envelopes) >= sent)  # type: ignore[misc]
                    assert len(raw.envelopes) == sent  # the rest wait for receipts
                    raw.acknowledge(raw.envelopes[acknowledged:])
                    acknowledged = sent
                for message_id in ids:
                    entry = await alice.wait_for_outcome(message_id)
                    assert entry.state is DeliveryState.DELIVERED
                assert alice.stats["delivered"] == 10
                nursery.cancel_scope.cancel()


async def test_a_receipt_frees_the_window_before_the_delivered_state_is_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Recording "delivered" waits for the sender's own commit; the receiver is done with the
    # messages once its receipt is out, so sending must go on meanwhile.
    bob_identity = Identity.generate(wall_clock_ms())
    now = wall_clock_ms()
    with Store.open(tmp_path / "a.db") as queued:
        for i in range(12):
            queued.enqueue(b"%016d" % i, bob_identity.public_key, b"m", now, now + 60_000)
    recording = threading.Event()
    real_mark_delivered_by = Store.mark_delivered_by

    def held(self: Store, *args: Any, **kwargs: Any) -> list[bytes]:
        recording.wait(10)
        return real_mark_delivered_by(self, *args, **kwargs)

    monkeypatch.setattr(Store, "mark_delivered_by", held)
    # A held commit stands for a slow disk's, which runs on the store thread (the loop's own
    # thread would be held with it: storeworker.INLINE_COMMIT_MAX_SECONDS).
    monkeypatch.setattr(storeworker, "INLINE_COMMIT_MAX_CHANGES", 0)
    directory = Directory()
    config = NodeConfig(backoff_base_ms=20, backoff_max_ms=100, max_in_flight=4)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            try:
                async with (
                    running(nursery, tmp_path, "b", directory, identity=bob_identity) as bob,
                    running(nursery, tmp_path, "a", directory, config=config) as alice,
                ):
                    with trio.fail_after(10):
                        await wait_until(lambda: bob.stats["received"] == 12)
                    assert alice.stats["delivered"] == 0  # none recorded yet
                    recording.set()
                    await wait_until(lambda: alice.stats["delivered"] == 12)
                    assert bob.stats["duplicate"] == 0  # nothing was sent twice meanwhile
                    counts = await alice.worker.read(lambda s: s.outbox_counts())
                    assert counts[DeliveryState.DELIVERED] == 12
                    nursery.cancel_scope.cancel()
            finally:
                recording.set()


async def test_sent_is_written_only_for_messages_whose_receipt_is_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "sent" costs a store write; a message receipted within MARK_SENT_DELAY never needs it,
    # even if it was sent while the delay of an earlier message was running.
    monkeypatch.setattr(node_module, "MARK_SENT_DELAY", 0.5)
    marked: list[bytes] = []
    real_mark_sent = Store.mark_sent

    def recording(self: Store, message_id: bytes, *args: Any, **kwargs: Any) -> bool:
        marked.append(message_id)
        return real_mark_sent(self, message_id, *args, **kwargs)

    monkeypatch.setattr(Store, "mark_sent", recording)
    directory = Directory()
    raw = RawPeer()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(raw.links.serve)
            assert raw.links.listen_address is not None
            directory.publish(raw.identity, [raw.links.listen_address])
            async with running(nursery, tmp_path, "a", directory) as alice:
                start = trio.current_time()
                first = await alice.send(raw.identity.public_key, b"at once")
                await wait_until(lambda: len(raw.envelopes) == 1)
                raw.acknowledge(raw.envelopes[:1])
                await alice.wait_for_outcome(first)
                # Sent while the first one's delay runs; receipted 0.25 s after that delay
                # ends, well within its own.
                prompt = await alice.send(raw.identity.public_key, b"within the delay")
                await wait_until(lambda: len(raw.envelopes) == 2)
                await trio.sleep_until(start + 0.75)
                raw.acknowledge(raw.envelopes[1:2])
                await alice.wait_for_outcome(prompt)
                late = await alice.send(raw.identity.public_key, b"receipt held back")
                await wait_until(lambda: late in marked)
                entry = await alice.message_state(late)
                assert entry is not None and entry.state is DeliveryState.SENT
                raw.acknowledge(raw.envelopes[2:3])
                assert (await alice.wait_for_outcome(late)).state is DeliveryState.DELIVERED
                nursery.cancel_scope.cancel()
    assert first not in marked and prompt not in marked


async def test_one_receipt_acknowledges_a_burst(tmp_path: Path) -> None:
    directory = Directory()
    raw = RawPeer()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(raw.links.serve)
            async with running(nursery, tmp_path, "b", directory) as bob:
                record = directory.records[bob.public_key].record
                link = await raw.links.connect(bob.public_key, record.addresses)
                ids = set()
                for i in range(200):
                    message_id, wire = seal_message(
                        raw.identity.signing_key,
                        bob.public_key,
                        record.encryption_key,
                        b"%d" % i,
                        now_ms=wall_clock_ms(),
                    )
                    ids.add(message_id)
                    link.send(FrameKind.ENVELOPE, wire)
                acknowledged: list[bytes] = []

                def all_acknowledged() -> bool:
                    while len(raw.receipts) > len(acknowledged_receipts):
                        receipt = open_receipt(
                            raw.receipts[len(acknowledged_receipts)],
                            own_identity=raw.identity.public_key,
                            peer_identity=bob.public_key,
                        )
                        acknowledged_receipts.append(receipt.ids)
                        acknowledged.extend(receipt.ids)
                    return len(acknowledged) >= len(ids)

                acknowledged_receipts: list[tuple[bytes, ...]] = []
                await wait_until(all_acknowledged)
                # Every message acknowledged exactly once, and stored once.
                assert sorted(acknowledged) == sorted(ids)
                assert bob.stats["received"] == 200
                assert await bob.worker.read(lambda s: s.unread_count()) == 200
                nursery.cancel_scope.cancel()


async def test_duplicate_is_acknowledged_again_and_stored_once(tmp_path: Path) -> None:
    directory = Directory()
    raw = RawPeer()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(raw.links.serve)
            async with running(nursery, tmp_path, "b", directory) as bob:
                record = directory.records[bob.public_key].record
                message_id, wire = seal_message(
                    raw.identity.signing_key,
                    bob.public_key,
                    record.encryption_key,
                    b"once",
                    now_ms=wall_clock_ms(),
                )
                link = await raw.links.connect(bob.public_key, record.addresses)
                link.send(FrameKind.ENVELOPE, wire)
                await wait_until(lambda: len(raw.receipts) == 1)
                link.send(FrameKind.ENVELOPE, wire)  # as after a lost receipt
                await wait_until(lambda: len(raw.receipts) == 2)
                for receipt in raw.receipts:
                    assert open_receipt(
                        receipt,
                        own_identity=raw.identity.public_key,
                        peer_identity=bob.public_key,
                        message_id=message_id,
                    ).ids == (message_id,)
                assert bob.stats["received"] == 1 and bob.stats["duplicate"] == 1
                assert await bob.worker.read(lambda s: s.unread_count()) == 1
                nursery.cancel_scope.cancel()


async def test_envelope_from_someone_other_than_the_link_peer_is_refused(tmp_path: Path) -> None:
    directory = Directory()
    raw = RawPeer()
    carol = Identity.generate(wall_clock_ms())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(raw.links.serve)
            async with running(nursery, tmp_path, "b", directory) as bob:
                record = directory.records[bob.public_key].record
                # Carol's genuine message, pushed by a different node.
                _, wire = seal_message(
                    carol.signing_key,
                    bob.public_key,
                    record.encryption_key,
                    b"relayed",
                    now_ms=wall_clock_ms(),
                )
                link = await raw.links.connect(bob.public_key, record.addresses)
                link.send(FrameKind.ENVELOPE, wire)
                await wait_until(lambda: bob.stats["rejected:sender-is-not-link-peer"] == 1)
                assert raw.receipts == []
                assert await bob.worker.read(lambda s: s.unread_count()) == 0
                nursery.cancel_scope.cancel()


async def test_flooding_peer_is_throttled_without_slowing_others(tmp_path: Path) -> None:
    directory = Directory()
    flooder = RawPeer()
    config = NodeConfig(
        backoff_base_ms=20, backoff_max_ms=100, incoming_per_second=50, incoming_burst=10
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(flooder.links.serve)
            async with (
                running(nursery, tmp_path, "b", directory, config=config) as bob,
                running(nursery, tmp_path, "a", directory) as alice,
            ):
                record = directory.records[bob.public_key].record
                link = await flooder.links.connect(bob.public_key, record.addresses)
                flood = 200  # 4 s worth at 50/s
                for n in range(flood):
                    _, wire = seal_message(
                        flooder.identity.signing_key,
                        bob.public_key,
                        record.encryption_key,
                        b"flood %d" % n,
                        now_ms=wall_clock_ms(),
                    )
                    link.send(FrameKind.ENVELOPE, wire)
                await wait_until(lambda: bob.stats["throttled"] > 0)
                message_id = await alice.send(bob.public_key, b"not stuck behind the flood")
                assert (await alice.wait_for_outcome(message_id)).state is DeliveryState.DELIVERED
                # Alice got through while most of the flood was still waiting its turn.
                acknowledged = sum(
                    len(
                        open_receipt(
                            receipt,
                            own_identity=flooder.identity.public_key,
                            peer_identity=bob.public_key,
                        ).ids
                    )
                    for receipt in flooder.receipts
                )
                assert 0 < acknowledged < flood // 2
                nursery.cancel_scope.cancel()


class RecordingProxy:
    """A TCP relay that keeps every byte it forwards, in both directions."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.captured = bytearray()

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                self.captured += data
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await sink.aclose()

    async def _handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self.target)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pipe, client, server)
            nursery.start_soon(self._pipe, server, client)

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(("127.0.0.1", port))


async def test_no_plaintext_or_identity_on_the_wire(tmp_path: Path) -> None:
    directory = Directory()
    canary = b"CANARY-5f1e9c-distinctive-plaintext"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with (
                running(nursery, tmp_path, "a", directory) as alice,
                running(nursery, tmp_path, "b", directory) as bob,
            ):
                assert bob.links.listen_address is not None
                proxy = RecordingProxy(bob.links.listen_address)
                proxy_address = await nursery.start(proxy.serve)
                directory.publish(bob.identity, [proxy_address], seq=2)  # reach Bob via the proxy
                message_id = await alice.send(bob.public_key, canary)
                assert (await alice.wait_for_outcome(message_id)).state is DeliveryState.DELIVERED
                inbox = await bob.worker.read(lambda s: s.inbox_list(False, 1))
                assert inbox[0].body == canary  # it did go through the proxy and arrive
                captured = bytes(proxy.captured)
                assert len(captured) > 500
                assert canary not in captured
                assert canary[:12] not in captured
                assert alice.public_key not in captured
                assert bob.public_key not in captured
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("count", [300])
async def test_many_messages_each_delivered_exactly_once(tmp_path: Path, count: int) -> None:
    directory = Directory()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            async with (
                running(nursery, tmp_path, "a", directory) as alice,
                running(nursery, tmp_path, "b", directory) as bob,
            ):
                ids = [await alice.send(bob.public_key, b"m%d" % n) for n in range(count)]
                for message_id in ids:
                    assert (
                        await alice.wait_for_outcome(message_id)
                    ).state is DeliveryState.DELIVERED
                inbox = await bob.worker.read(lambda s: s.inbox_list(False, 1000))
                assert sorted(m.message_id for m in inbox) == sorted(ids)
                assert sorted(m.body for m in inbox) == sorted(b"m%d" % n for n in range(count))
                nursery.cancel_scope.cancel()


async def test_a_send_whose_outbox_write_fails_raises_and_the_node_carries_on(
    tmp_path: Path,
) -> None:
    with trio.fail_after(20):
        async with alice_and_bob(tmp_path) as (alice, bob):
            store = alice.worker.store
            real_enqueue = store.enqueue

            def full_disk(*args: object, **kwargs: object) -> object:
                raise StoreError("database or disk is full")

            store.enqueue = full_disk  # type: ignore[method-assign,assignment]
            with pytest.raises(StoreError, match="disk is full"):
                await alice.send(bob.public_key, b"lost with the disk")
            store.enqueue = real_enqueue  # type: ignore[method-assign]
            message_id = await alice.send(bob.public_key, b"after the disk was freed")
            entry = await alice.wait_for_outcome(message_id)
            assert entry.state is DeliveryState.DELIVERED
            # Whatever became of the first one, nothing pending is left behind for it.
            counts = await alice.worker.read(lambda s: s.outbox_counts())
            assert counts[DeliveryState.DELIVERED] == 1
            assert sum(counts.values()) == 1


async def test_a_node_with_a_rotated_key_reads_messages_sealed_to_either_key(
    tmp_path: Path,
) -> None:
    directory = Directory()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with (
                running(nursery, tmp_path, "a", directory) as alice,
                running(nursery, tmp_path, "b", directory) as bob,
                running(nursery, tmp_path, "c", directory) as carol,
            ):
                before = await alice.send(bob.public_key, b"sealed to the old key")
                assert (await alice.wait_for_outcome(before)).state is DeliveryState.DELIVERED
                old_record = directory.records[bob.public_key].record
                rotated = bob.identity.rotated(wall_clock_ms())
                bob.use_identity(rotated)
                assert bob.links.listen_address is not None
                directory.publish(rotated, [bob.links.listen_address], seq=2)
                new_record = directory.records[bob.public_key].record
                assert new_record.encryption_key != old_record.encryption_key
                # Alice still seals to the key she has; Carol looks Bob up afresh.
                late = await alice.send(bob.public_key, b"old key, after the rotation")
                fresh = await carol.send(bob.public_key, b"new key")
                for sender, message_id in ((alice, late), (carol, fresh)):
                    entry = await sender.wait_for_outcome(message_id)
                    assert entry.state is DeliveryState.DELIVERED
                assert await bob.worker.read(lambda s: s.unread_count()) == 3
                with pytest.raises(ValueError, match="identity key"):
                    bob.use_identity(Identity.generate(wall_clock_ms()))
                nursery.cancel_scope.cancel()
