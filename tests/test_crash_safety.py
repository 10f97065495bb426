"""Crash safety with real processes: every message accepted by ``send`` arrives exactly once.

Each test runs two ``p2pnode daemon`` subprocesses (:class:`p2pnode.testnet.Testnet`), node0
sending to node1, and kills one or both of them with SIGKILL at the moments that matter: the
sender right after ``send`` returned, the receiver while a stream of messages is being
delivered (once and repeatedly), both, and the sender while every message it sent still awaits
its receipt. After the restarts the receiver's inbox must hold every
accepted message exactly once and the sender must report every one delivered, with nothing left
queued or sent.

Whether a kill really landed mid-stream is checked, not assumed: while a killed node is down
its store file is read directly (read-only), which shows what it had made durable at the moment
of the crash. Every wait has a deadline; the harness stops every process it started.

Deadlines are generous (a loaded CI machine is slow); the one exception is the test of a sender
that crashed while waiting for receipts, which must resend them at start rather than after the
receipt timeout.
"""

from __future__ import annotations

import signal
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pnode.home import NodeHome
from p2pnode.node import RECEIPT_TIMEOUT_MS
from p2pnode.testnet import Testnet, TestNode

#: Seconds to wait for every accepted message to arrive and be reported delivered.
SETTLE_TIMEOUT = 45.0
#: Seconds to wait for a stream to reach the point where a kill is due.
PROGRESS_TIMEOUT = 20.0
#: Seconds between polls of a condition (a poll is one API call).
POLL = 0.005
#: Upper bound on an open-ended stream (stopped long before; see the repeated-kill test).
STREAM_CAP = 5000


# --- helpers -------------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = PROGRESS_TIMEOUT
) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not await condition():
            await trio.sleep(POLL)
        return
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


async def status(node: TestNode) -> dict[str, Any]:
    result: dict[str, Any] = await node.api("GET", "/v1/status")
    return result


async def inbox_count(node: TestNode) -> int:
    """How many messages the node's inbox holds (nothing here ever marks one read)."""
    return int((await status(node))["unread"])


@dataclass
class Durable:
    """What a killed node's store file holds: the state it had made durable when it died."""

    inbox: int
    outbox: dict[str, int]
    outbox_ids: set[str]

    @property
    def pending(self) -> int:
        return self.outbox.get("queued", 0) + self.outbox.get("sent", 0)


def durable_state(node: TestNode) -> Durable:
    """Read a stopped node's SQLite store read-only (never while the daemon runs)."""
    assert not node.running, "only a dead node's store is read directly"
    path = NodeHome(node.home).database
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        inbox = int(conn.execute("SELECT count(*) FROM inbox").fetchone()[0])
        outbox = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
        ids = {bytes(row[0]).hex() for row in conn.execute("SELECT id FROM outbox")}
    finally:
        conn.close()
    return Durable(inbox, outbox, ids)


@dataclass
class Stream:
    """node0 sending numbered messages to node1 with ``concurrency`` sends in flight.

    ``accepted`` maps each id ``send`` returned to its body. The stream ends after ``count``
    messages, or, if ``count`` is None, once :attr:`stop` is set.
    """

    sender: TestNode
    recipient: TestNode
    prefix: str
    count: int | None
    concurrency: int = 8
    accepted: dict[str, bytes] = field(default_factory=dict)
    stop: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    _next: int = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.concurrency):
                nursery.start_soon(self._worker)
        self.finished.set()

    async def _worker(self) -> None:
        limit = STREAM_CAP if self.count is None else self.count
        while self._next < limit and not self.stop.is_set():
            body = f"{self.prefix}-{self._next:05d}".encode()
            self._next += 1
            message_id = await self.sender.send(self.recipient, body)
            self.accepted[message_id] = body


async def send_burst(
    sender: TestNode, recipient: TestNode, prefix: str, k: int
) -> dict[str, bytes]:
    """Send ``k`` distinct messages at once; returns id -> body once every send returned."""
    accepted: dict[str, bytes] = {}

    async def one(i: int) -> None:
        body = f"{prefix}-{i:05d}".encode()
        accepted[await sender.send(recipient, body)] = body

    async with trio.open_nursery() as nursery:
        for i in range(k):
            nursery.start_soon(one, i)
    assert len(accepted) == k, "send returned the same id twice"
    return accepted


async def assert_exactly_once(
    sender: TestNode,
    recipient: TestNode,
    accepted: dict[str, bytes],
    *,
    timeout: float = SETTLE_TIMEOUT,
) -> None:
    """Wait (up to ``timeout`` seconds) until the sender has nothing left queued or sent;
    then check the recipient's inbox is exactly the accepted messages, each once, and that the
    sender reports every one delivered.

    Every accepted message is in the sender's outbox, so once nothing there is pending no
    message will be sent again: what has not arrived by then is lost.
    """

    async def settled() -> bool:
        outbox = (await status(sender))["outbox"]
        return bool(outbox["queued"] == 0 and outbox["sent"] == 0)

    with trio.move_on_after(timeout) as waiting:
        while not await settled():
            await trio.sleep(POLL)

    outbox = (await status(sender))["outbox"]
    inbox = await recipient.inbox()
    received = {m.id: m.body for m in inbox}
    missing = sorted(body.decode() for i, body in accepted.items() if i not in received)
    assert missing == [], (
        f"{len(missing)} accepted messages are not in the inbox "
        f"(the sender's outbox after {timeout} s at most: {outbox}): {missing[:10]}"
    )
    ids = Counter(m.id for m in inbox)
    bodies = Counter(m.body for m in inbox)
    assert [i for i, n in ids.items() if n > 1] == [], "a message id is stored twice"
    assert [b for b, n in bodies.items() if n > 1] == [], "a message body arrived twice"
    assert received == accepted, "the inbox holds messages that were never accepted"
    assert {m.sender for m in inbox} == {sender.id}

    assert outbox == {"queued": 0, "sent": 0, "delivered": len(accepted), "failed": 0}
    assert not waiting.cancelled_caught  # implied by the line above
    states: dict[str, str] = {}

    async def state_of(message_id: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            states[message_id] = (await sender.message_state(message_id))["state"]

    limiter = trio.CapacityLimiter(16)
    async with trio.open_nursery() as nursery:
        for message_id in accepted:
            nursery.start_soon(state_of, message_id, limiter)
    assert {i for i, s in states.items() if s != "delivered"} == set()


async def kill_receiver_mid_stream(net: Testnet, stream: Stream, floor: int) -> Durable:
    """Wait until node1 has stored more than ``floor`` messages, then SIGKILL it at once, while
    the stream is still sending; returns node1's durable state at the crash."""

    async def progressed() -> bool:
        return await inbox_count(net[1]) > floor

    await wait_until(progressed, f"node1 to store more than {floor} messages")
    accepted_before = len(stream.accepted)
    assert not stream.finished.is_set(), "the stream ended before the kill: not mid-stream"
    await net.kill(1)  # the signal goes out before this first yields
    crashed = durable_state(net[1])
    assert floor < crashed.inbox, "the kill came before node1 stored anything new"
    print(
        f"node1 killed holding {crashed.inbox} messages; "
        f"{accepted_before} accepted by node0 before the kill"
    )
    return crashed


# --- tests ---------------------------------------------------------------------------------------


async def test_sender_killed_right_after_send_returned(tmp_path: Path) -> None:
    """50 concurrent sends; SIGKILL the sender the instant the last one returned. Every
    returned id is in its store; after the restart each arrives exactly once."""
    k = 50
    async with Testnet(n=2, root=tmp_path, proxied=True) as net:
        # Delivery starts while each send's outbox write commits; half a second each way on
        # the link keeps every receipt out until well after the last send returned.
        net.proxy(1).delay = 0.5
        accepted = await send_burst(net[0], net[1], "burst", k)
        await net.kill(0)  # the instant the last send returned

        crashed = durable_state(net[0])
        # Every id send returned was durable in the outbox before the call returned.
        assert set(accepted) <= crashed.outbox_ids
        assert crashed.outbox.get("failed", 0) == 0
        assert crashed.pending > 0, f"all {k} were already delivered: the kill came too late"
        print(f"node0 killed with {crashed.pending} of {k} messages not yet delivered")

        net.proxy(1).reset()
        await net.restart(0)
        await assert_exactly_once(net[0], net[1], accepted)


async def test_receiver_killed_while_messages_in_flight(tmp_path: Path) -> None:
    """A stream of 200; SIGKILL the receiver once it holds a quarter of them, while the sender
    keeps sending; restart it: each arrives exactly once."""
    k = 200
    async with Testnet(n=2, root=tmp_path) as net, trio.open_nursery() as nursery:
        stream = Stream(net[0], net[1], "stream", k)
        nursery.start_soon(stream.run)
        crashed = await kill_receiver_mid_stream(net, stream, floor=k // 4)
        assert crashed.inbox < k
        await net.restart(1)
        with trio.fail_after(PROGRESS_TIMEOUT):
            await stream.finished.wait()
        await assert_exactly_once(net[0], net[1], stream.accepted)


async def test_receiver_killed_repeatedly_during_one_stream(tmp_path: Path) -> None:
    """One open-ended stream; the receiver is killed three times, each time once delivery has
    resumed after the previous restart; each message arrives exactly once."""
    kills = 3
    async with Testnet(n=2, root=tmp_path) as net, trio.open_nursery() as nursery:
        stream = Stream(net[0], net[1], "repeat", None, concurrency=1)
        nursery.start_soon(stream.run)
        floor = 0
        for _ in range(kills):
            # Each kill waits until delivery has resumed after the previous restart.
            crashed = await kill_receiver_mid_stream(net, stream, floor)
            floor = crashed.inbox
            await net.restart(1)
        # A little more of the stream after the last restart, then stop it.
        await wait_until(
            lambda: _more_than(net[1], floor), "delivery to resume after the last restart"
        )
        stream.stop.set()
        with trio.fail_after(PROGRESS_TIMEOUT):
            await stream.finished.wait()
        assert len(stream.accepted) < STREAM_CAP
        await assert_exactly_once(net[0], net[1], stream.accepted)


async def _more_than(node: TestNode, floor: int) -> bool:
    return await inbox_count(node) > floor


async def test_sender_and_receiver_both_killed(tmp_path: Path) -> None:
    """Both nodes killed mid-stream, one after the other and then at the same moment; each
    message arrives exactly once."""
    k = 300
    async with Testnet(n=2, root=tmp_path, proxied=True) as net, trio.open_nursery() as nursery:
        # Round 1: the receiver dies mid-stream; the sender dies the instant its last send
        # returned, while the receiver is still down (so it holds undelivered messages).
        stream = Stream(net[0], net[1], "both", k)
        nursery.start_soon(stream.run)
        receiver_crash = await kill_receiver_mid_stream(net, stream, floor=0)
        with trio.fail_after(PROGRESS_TIMEOUT):
            await stream.finished.wait()
        await net.kill(0)
        sender_crash = durable_state(net[0])
        assert set(stream.accepted) <= sender_crash.outbox_ids
        assert sender_crash.pending >= k - receiver_crash.inbox
        # node0 first: node1 then re-joins the DHT through it and publishes its new address.
        await net.restart(0)
        await net.restart(1)
        accepted = dict(stream.accepted)

        # Round 2: both die at the same moment, the instant a second burst's last send
        # returned, with the burst in flight between them.
        async def resumed() -> bool:
            return await inbox_count(net[1]) > receiver_crash.inbox

        await wait_until(resumed, "delivery to resume after both restarts")
        # Receipts take at least a second to come back (0.5 s each way): every send returns
        # before its receipt, however fast delivery is.
        net.proxy(1).delay = 0.5
        burst = await send_burst(net[0], net[1], "both-burst", 100)
        async with trio.open_nursery() as killing:
            killing.start_soon(net.kill, 0)
            killing.start_soon(net.kill, 1)
        sender_crash = durable_state(net[0])
        receiver_crash = durable_state(net[1])
        assert set(burst) <= sender_crash.outbox_ids
        # Mid-stream for the sender: receipts were still due (node1 may or may not have stored
        # those messages; either way they are sent again and must not be stored twice).
        assert sender_crash.pending > 0, "every receipt was in before the kill"
        print(
            f"both killed: node0 with {sender_crash.pending} pending, "
            f"node1 holding {receiver_crash.inbox} of {k + len(burst)}"
        )
        net.proxy(1).reset()
        await net.restart(0)
        await net.restart(1)
        accepted.update(burst)
        await assert_exactly_once(net[0], net[1], accepted)


async def test_sender_killed_awaiting_receipts_resends_at_restart(tmp_path: Path) -> None:
    """The sender dies with every pending message sent on the link but not yet receipted (the
    receiver is paused with SIGSTOP, so no receipt can come). After the restart they must be
    sent again at once, not after the receipt timeout."""
    k = 50
    async with Testnet(n=2, root=tmp_path) as net:
        warm_up = await net[0].send(net[1], "warm-up")  # opens the link
        await net[0].wait_delivered(warm_up)
        receiver = net[1].process
        assert receiver is not None
        receiver.send_signal(signal.SIGSTOP)
        try:
            accepted = await send_burst(net[0], net[1], "unreceipted", k)

            async def all_sent() -> bool:
                outbox = (await status(net[0]))["outbox"]
                return bool(outbox["sent"] == k and outbox["queued"] == 0)

            await wait_until(all_sent, f"node0 to hand all {k} messages to the link")
            await net.kill(0)
        finally:
            receiver.send_signal(signal.SIGCONT)
        crashed = durable_state(net[0])
        assert crashed.outbox == {"delivered": 1, "sent": k}, crashed

        await net.restart(0)
        accepted[warm_up] = b"warm-up"
        await assert_exactly_once(net[0], net[1], accepted, timeout=RECEIPT_TIMEOUT_MS / 1000 / 3)
