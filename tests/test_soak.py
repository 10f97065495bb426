"""Long soaks of real daemons under churn and network faults (``make soak``, not ``make test``).

Skipped unless ``P2PNODE_SOAK=1``. ``P2PNODE_SOAK_SECONDS`` sets how long each soak drives
traffic (default 300), ``P2PNODE_SOAK_SEED`` replays a run (the seed is printed). The faults
follow a seeded schedule; what is asserted at the end is what a user relies on: once the faults
stop, every accepted message arrives exactly once and is reported delivered.

The fault schedule holds some faults for a while (that is what a fault is); every wait for an
*outcome* is a condition with a deadline.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import trio

from p2pnode.testnet import Testnet, TestNode, wait_until

if not os.environ.get("P2PNODE_SOAK"):
    pytest.skip("soak tests run with `make soak` (P2PNODE_SOAK=1)", allow_module_level=True)

pytestmark = pytest.mark.soak

#: Seconds each soak drives traffic and faults.
DURATION = float(os.environ.get("P2PNODE_SOAK_SECONDS", "300"))
#: Seconds for everything to arrive once the faults stop: beyond the receipt timeout (30 s) a
#: message sent into a black hole waits out, plus the longest backoff a soak reaches.
SETTLE = 300.0


def seed() -> int:
    value = int(os.environ.get("P2PNODE_SOAK_SEED") or random.SystemRandom().randrange(2**32))
    print(f"soak seed {value} (replay with P2PNODE_SOAK_SEED={value})")
    return value


class Ledger:
    """Every message ``send`` accepted: (sender, recipient, id, body)."""

    def __init__(self) -> None:
        self.sent: list[tuple[TestNode, TestNode, str, bytes]] = []
        self._n = 0

    async def send(self, sender: TestNode, recipient: TestNode) -> None:
        self._n += 1
        body = f"{sender.name}>{recipient.name}#{self._n}".encode()
        message_id = await sender.send(recipient, body)
        self.sent.append((sender, recipient, message_id, body))

    async def assert_exactly_once(self, net: Testnet) -> None:
        async def settled() -> bool:
            for node in net:
                outbox = (await node.status())["outbox"]
                if outbox["queued"] or outbox["sent"]:
                    return False
            return True

        await wait_until(settled, "every outbox to settle", timeout=SETTLE, interval=0.5)
        for node in net:
            inbox = Counter((m.id, m.sender, m.body) for m in await node.inbox())
            expected = Counter((i, s.id, b) for s, r, i, b in self.sent if r is node)
            assert [k for k, n in inbox.items() if n > 1] == [], f"{node.name}: duplicates"
            assert inbox == expected, f"{node.name}: {len(expected - inbox)} missing"
            outbox = (await node.status())["outbox"]
            assert outbox["failed"] == 0, outbox
        print(f"{len(self.sent)} messages, each delivered exactly once")


async def traffic(
    ledger: Ledger,
    senders: list[TestNode],
    recipients: list[TestNode],
    rng: random.Random,
    stop: trio.Event,
    lanes: int = 4,
) -> None:
    """Keep ``lanes`` sends in flight, random sender to random other recipient, until
    ``stop``."""

    async def lane() -> None:
        while not stop.is_set():
            sender = rng.choice(senders)
            recipient = rng.choice([r for r in recipients if r is not sender])
            await ledger.send(sender, recipient)

    async with trio.open_nursery() as nursery:
        for _ in range(lanes):
            nursery.start_soon(lane)


async def test_churn_soak(tmp_path: Path) -> None:
    """Four stable nodes send to everyone; four others are killed (SIGKILL) or stopped and
    restarted over and over, each time once they received more since their last start."""
    rng = random.Random(seed())
    async with Testnet(n=8, root=tmp_path) as net:
        stable, churned = net.nodes[:4], net.nodes[4:]
        ledger = Ledger()
        stop = trio.Event()
        restarts = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic, ledger, stable, net.nodes, rng, stop)
            with trio.move_on_after(DURATION):
                while True:
                    victim = rng.choice(churned)
                    floor = int((await victim.status())["unread"])

                    async def received_more(node: TestNode = victim, floor: int = floor) -> bool:
                        return int((await node.status())["unread"]) > floor

                    await wait_until(received_more, f"{victim.name} to receive", timeout=120)
                    if rng.random() < 0.7:
                        await victim.kill()
                    else:
                        assert await victim.stop() == 0
                    await victim.restart()
                    restarts += 1
            stop.set()
        print(f"{restarts} kills or stops of the churned nodes")
        await ledger.assert_exactly_once(net)


async def test_network_faults_soak(tmp_path: Path) -> None:
    """Six proxied nodes all send to each other while a seeded schedule puts one fault at a
    time on a random node's proxy: a partition, latency, a black hole, duplicated chunks."""
    rng = random.Random(seed())
    async with Testnet(n=6, root=tmp_path, proxied=True) as net:
        ledger = Ledger()
        stop = trio.Event()
        faults: Counter[str] = Counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic, ledger, net.nodes, net.nodes, rng, stop)
            with trio.move_on_after(DURATION):
                while True:
                    index = rng.randrange(len(net))
                    proxy = net.proxy(index)
                    fault = rng.choice(["partition", "delay", "drop", "duplicate"])
                    faults[fault] += 1
                    if fault == "partition":
                        net.partition(index)
                    elif fault == "delay":
                        proxy.delay = rng.uniform(0.01, 0.5)
                    elif fault == "drop":
                        proxy.drop = True
                    else:
                        proxy.duplicate = rng.uniform(0.01, 0.3)
                    try:
                        await trio.sleep(rng.uniform(0.5, 5.0))  # the fault's duration
                    finally:
                        proxy.reset()
            stop.set()
        print(f"faults applied: {dict(faults)}")
        await ledger.assert_exactly_once(net)
