"""Networks of real daemons on loopback (:class:`p2pnode.testnet.Testnet`), as users run them.

What each test shows a user can rely on:

- ten nodes that all message each other get every message exactly once, and every sender
  sees every message delivered;
- a receiver that crashes (SIGKILL) while three senders stream to it, and comes back on a new
  port, ends up with every accepted message exactly once;
- the network outlives its bootstrap node: after it is stopped the others still find and reach
  each other, and a new node joins through any remaining node and can send and receive;
- a partitioned node's messages wait in the senders' outboxes (delivery attempts are refused,
  nothing arrives) and all arrive exactly once when the partition heals;
- a link whose encrypted stream is corrupted in transit is closed, re-opened, and loses or
  repeats nothing;
- nodes that dial each other at the same moment over slow links all keep running, and every
  message arrives once.

No fixed sleeps: every wait is a condition polled with a deadline. The only bounded wait that
expects nothing to happen is the partition's "still not delivered" check, and it follows a
positive observation (each message's delivery was attempted and refused). The harness stops
every process it started.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pnode.home import NodeHome
from p2pnode.testnet import Testnet, TestNode, wait_until

#: Seconds for messages to arrive and be receipted once nothing stands in the way. Generous: a
#: loaded 2-core CI machine is slow, and a retry after a failure waits out its backoff.
SETTLE = 45.0
#: Seconds for one step of a test (a kill to land mid-stream, attempts to be refused).
STEP = 20.0
#: API calls in flight at once from a test (each runs the blocking client in a thread).
API_CONCURRENCY = 16
#: Sends in flight at once per streaming sender.
LANES = 2


@dataclass
class Sent:
    """One accepted message: who sent it, to whom, its id and body."""

    sender: TestNode
    recipient: TestNode
    id: str
    body: bytes


async def for_each(items: Iterable[Any], action: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``action`` on every item concurrently, at most :data:`API_CONCURRENCY` at a time."""
    limiter = trio.CapacityLimiter(API_CONCURRENCY)

    async def one(item: Any) -> None:
        async with limiter:
            await action(item)

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(one, item)


async def send_all(pairs: Iterable[tuple[TestNode, TestNode, str]]) -> list[Sent]:
    """Send each ``(sender, recipient, body)`` concurrently; returns them once all accepted."""
    sent: list[Sent] = []

    async def one(pair: tuple[TestNode, TestNode, str]) -> None:
        sender, recipient, body = pair
        message_id = await sender.send(recipient, body)
        sent.append(Sent(sender, recipient, message_id, body.encode()))

    await for_each(pairs, one)
    return sent


async def settled(senders: Iterable[TestNode]) -> bool:
    """True when no sender has anything left queued or awaiting a receipt."""
    for node in senders:
        outbox = (await node.status())["outbox"]
        if outbox["queued"] or outbox["sent"]:
            return False
    return True


async def assert_delivered_exactly_once(
    sent: list[Sent], inboxes: Iterable[TestNode], *, timeout: float = SETTLE
) -> None:
    """Wait until the senders have nothing pending, then check: every inbox holds exactly the
    messages sent to it (right ids, bodies and senders), each once; every message is marked
    delivered by its sender, and no sender has a failed message."""
    senders = {m.sender.name: m.sender for m in sent}.values()
    await wait_until(lambda: settled(senders), "every sender's outbox to settle", timeout=timeout)
    for node in inboxes:
        inbox = await node.inbox()
        expected = Counter((m.id, m.sender.id, m.body) for m in sent if m.recipient is node)
        got = Counter((m.id, m.sender, m.body) for m in inbox)
        duplicates = [key for key, n in got.items() if n > 1]
        assert duplicates == [], f"{node.name} stored messages twice: {duplicates[:5]}"
        missing = expected - got
        extra = got - expected
        assert not missing, f"{node.name} is missing {len(missing)}: {list(missing)[:5]}"
        assert not extra, f"{node.name} holds unexpected messages: {list(extra)[:5]}"
    for sender in senders:
        outbox = (await sender.status())["outbox"]
        mine = sum(1 for m in sent if m.sender is sender)
        assert outbox["failed"] == 0, f"{sender.name}: {outbox}"
        assert outbox["delivered"] >= mine, f"{sender.name}: {outbox}"
    states: dict[str, str] = {}

    async def state_of(message: Sent) -> None:
        states[message.id] = (await message.sender.message_state(message.id))["state"]

    await for_each(sent, state_of)
    assert [i for i, s in states.items() if s != "delivered"] == []


def unread_in_store(node: TestNode) -> int:
    """How many messages a *stopped* node's store holds (read-only; never while it runs)."""
    import sqlite3  # noqa: PLC0415

    assert not node.running
    path = NodeHome(node.home).database
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM inbox").fetchone()[0])
    finally:
        conn.close()


# --- (a) everyone to everyone ----------------------------------------------------------------


async def test_ten_nodes_all_to_all_each_message_exactly_once(tmp_path: Path) -> None:
    async with Testnet(n=10, root=tmp_path) as net:
        pairs = [(a, b, f"{a.name} to {b.name}") for a in net for b in net if a is not b]
        sent = await send_all(pairs)
        assert len(sent) == 90
        assert len({m.id for m in sent}) == 90
        await assert_delivered_exactly_once(sent, net)
        for node in net:
            bodies = sorted(m.body.decode() for m in await node.inbox())
            assert bodies == sorted(f"{o.name} to {node.name}" for o in net if o is not node)
            outbox = (await node.status())["outbox"]
            assert outbox == {"queued": 0, "sent": 0, "delivered": 9, "failed": 0}


# --- (b) a receiver crashes while three senders stream to it ----------------------------------


@dataclass
class Streams:
    """Senders each sending numbered messages to one recipient until :attr:`stop` is set."""

    senders: list[TestNode]
    recipient: TestNode
    sent: list[Sent] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for sender in self.senders:
                for lane in range(LANES):
                    nursery.start_soon(self._one_sender, sender, lane)

    async def _one_sender(self, sender: TestNode, lane: int) -> None:
        i = 0
        while not self.stop.is_set():
            body = f"{sender.name}-{lane}-{i:04d}"
            message_id = await sender.send(self.recipient, body)
            self.sent.append(Sent(sender, self.recipient, message_id, body.encode()))
            i += 1


async def test_receiver_killed_mid_delivery_then_restarted(tmp_path: Path) -> None:
    async with Testnet(n=4, root=tmp_path) as net:
        receiver = net[3]
        streams = Streams([net[0], net[1], net[2]], receiver)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(streams.run)

            async def some_arrived() -> bool:
                return int((await receiver.status())["unread"]) >= 30

            await wait_until(some_arrived, "the receiver to store 30 messages", timeout=STEP)
            # Freeze it where it is (mid-receive), let the senders hand more messages to their
            # links, then kill it: those messages were on their way when it died.
            assert receiver.process is not None
            frozen_at = len(streams.sent)  # no checkpoint until the signal is sent
            receiver.process.send_signal(signal.SIGSTOP)
            try:

                async def in_flight() -> bool:
                    outboxes = [(await s.status())["outbox"] for s in streams.senders]
                    on_links = sum(outbox["sent"] for outbox in outboxes)
                    # More accepted since the freeze than there can be sends in progress at
                    # once: some messages were certainly accepted after it.
                    return on_links >= 20 and len(streams.sent) > frozen_at + 3 * LANES

                await wait_until(in_flight, "20 messages on their way to the frozen receiver")
                accepted_before_kill = len(streams.sent)
            finally:
                await receiver.kill()
            held = unread_in_store(receiver)
            # Mid-delivery, checked rather than assumed: it had stored some, not all.
            assert 30 <= held < accepted_before_kill, (held, accepted_before_kill)
            old_address = receiver.links

            # The senders keep sending into the outage.
            async def sent_during_outage() -> bool:
                return len(streams.sent) >= accepted_before_kill + 30

            await wait_until(sent_during_outage, "30 more sends while the receiver is down")
            await receiver.restart()
            # It came back on another port: the senders must find its new record.
            assert receiver.links != old_address

            async def resumed() -> bool:
                return int((await receiver.status())["unread"]) > held

            await wait_until(resumed, "delivery to resume after the restart", timeout=SETTLE)
            streams.stop.set()
        print(
            f"receiver killed holding {held} messages, {accepted_before_kill} accepted before "
            f"the kill, {len(streams.sent)} in all"
        )
        await assert_delivered_exactly_once(streams.sent, [receiver])


# --- (c) the bootstrap node goes away --------------------------------------------------------


async def test_network_outlives_its_bootstrap_node(tmp_path: Path) -> None:
    async with Testnet(n=5, root=tmp_path) as net:
        bootstrap = net[0]  # every other node joined through it
        assert all(node.bootstrap == [bootstrap.dht] for node in net.nodes[1:])
        assert await bootstrap.stop() == 0  # a clean shutdown

        # No links exist yet: each first send must find its recipient in the DHT without it.
        rest = net.nodes[1:]
        sent = await send_all(
            (a, b, f"{a.name} to {b.name}") for a in rest for b in rest if a is not b
        )
        await assert_delivered_exactly_once(sent, rest)

        # A new node joins through one of the remaining nodes, and can send and receive.
        newcomer = await net.add_node(bootstrap=[net[2].dht or ""])
        assert newcomer.bootstrap == [net[2].dht]
        more = await send_all(
            [
                (newcomer, net[1], "newcomer to node1"),
                (newcomer, net[4], "newcomer to node4"),
                (net[3], newcomer, "node3 to newcomer"),
                (net[2], newcomer, "node2 to newcomer"),
            ]
        )
        await assert_delivered_exactly_once(sent + more, [*rest, newcomer])


# --- (d) a partition that heals --------------------------------------------------------------


async def test_partitioned_node_gets_everything_once_after_healing(tmp_path: Path) -> None:
    async with Testnet(n=4, root=tmp_path, proxied=True) as net:
        island = net[3]
        senders = [net[0], net[1], net[2]]
        # Links into the island, through its proxy (it never dials out in this test).
        warm = await send_all((s, island, f"{s.name} before") for s in senders)
        await assert_delivered_exactly_once(warm, [island])
        assert (await island.status())["links_open"] == 3

        net.partition(3)

        async def island_unlinked() -> bool:
            return int((await island.status())["links_open"]) == 0

        await wait_until(island_unlinked, "the partition to close the island's links")
        assert net.proxy(3).stats["cut"] >= 1

        during = await send_all(
            (s, island, f"{s.name} during {i}") for s in senders for i in range(3)
        )

        async def all_refused() -> bool:
            for m in during:
                state = await m.sender.message_state(m.id)
                if state["attempts"] < 1:
                    return False
            return True

        await wait_until(all_refused, "every message's delivery to be attempted", timeout=STEP)
        assert net.proxy(3).stats["refused"] >= 1
        # Still nothing through, for a short while longer: the messages stay queued.
        with trio.move_on_after(1.0):
            while True:
                for m in during:
                    state = await m.sender.message_state(m.id)
                    assert state["state"] == "queued", state
                    assert state["last_error"], state
                await trio.sleep(0.1)
        assert len(await island.inbox()) == 3

        net.heal()
        await assert_delivered_exactly_once(warm + during, [island])


# --- a corrupted link stream -----------------------------------------------------------------


async def test_corrupted_link_stream_is_closed_and_delivery_recovers(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path, proxied=True) as net:
        sender, receiver, proxy = net[1], net[0], net.proxy(0)
        first = await send_all([(sender, receiver, "first")])
        await assert_delivered_exactly_once(first, [receiver])
        assert proxy.stats["accepted"] == 1 and proxy.stats["closed"] == 0

        proxy.duplicate = 1.0  # every chunk twice: the secretstream must reject the copy
        second = await send_all([(sender, receiver, "second")])

        def corrupted_link_closed() -> Awaitable[bool]:
            async def check() -> bool:
                return proxy.stats["duplicated"] >= 1 and proxy.stats["closed"] >= 1

            return check()

        await wait_until(corrupted_link_closed, "the corrupted link to be closed", timeout=STEP)
        proxy.duplicate = 0.0
        third = await send_all([(sender, receiver, "third")])
        await assert_delivered_exactly_once(first + second + third, [receiver])
        assert proxy.stats["accepted"] >= 2  # a new link replaced the corrupted one


# --- simultaneous dials ----------------------------------------------------------------------


async def test_nodes_dialling_each_other_at_once_keep_running(tmp_path: Path) -> None:
    """Every pair dials each other at the same moment; 0.2 s of latency on every link makes the
    two handshakes of each pair overlap, as they do between distant nodes. (Regression: the
    node whose link lost that race used to read the winner's socket from a second task and
    die of trio.BusyResourceError.)"""
    async with Testnet(n=4, root=tmp_path, proxied=True) as net:
        for i in range(len(net)):
            net.proxy(i).delay = 0.2
        sent = await send_all(
            (a, b, f"{a.name} to {b.name}") for a in net for b in net if a is not b
        )

        async def settled_or_crashed() -> bool:
            return not all(node.running for node in net) or await settled(net)

        await wait_until(settled_or_crashed, "delivery, or a daemon to die", timeout=SETTLE)
        crashed = [node.name for node in net if not node.running]
        assert crashed == [], f"daemons died: {crashed}; see their logs in {tmp_path}"
        await assert_delivered_exactly_once(sent, net)
