"""An in-memory datagram network for deterministic simulations and tests.

Nodes get :class:`MemoryTransport` objects instead of UDP sockets; the network delivers each
datagram after a seeded random latency, or loses it with a seeded probability. Under trio's
``MockClock(autojump_threshold=0)`` simulated minutes pass in milliseconds. Everything random
comes from one ``random.Random(seed)``, so a run is reproducible; see
:func:`seed_trio_scheduler` for the one other source of nondeterminism.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

import trio
import trio._core._run as trio_run

from p2pnode.dht.wire import Address

#: Datagrams a node's inbox may hold before the network drops more (a slow reader loses
#: datagrams, as with a real socket buffer).
INBOX_CAPACITY: Final = 1024


def seed_trio_scheduler(seed: int) -> None:
    """Make trio's task scheduling order reproducible.

    Trio shuffles the order in which tasks woken at the same instant run, using a private,
    unseeded ``random.Random``; a reproducible simulation has to seed it. Seeding alone is not
    enough: by default trio only maybe-reverses each batch of runnable tasks, whose order
    follows wake-up order, which in turn can follow the iteration order of sets of tasks
    (ordered by memory address), so it differs between processes. Trio's deterministic mode
    (what its Hypothesis plugin switches on) sorts each batch by task creation order before
    the seeded shuffle; this switches it on too, for the rest of the process (it costs a sort
    per batch). This touches trio internals on purpose, here only; if trio renames them, this
    raises rather than silently losing reproducibility.
    """
    scheduler_random = trio_run._r
    if not isinstance(scheduler_random, random.Random) or not hasattr(
        trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING"
    ):
        raise RuntimeError("trio's scheduler internals moved; update seed_trio_scheduler")
    setattr(trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING", True)  # noqa: B010 (it is Final)
    scheduler_random.seed(seed)


@dataclass(order=True)
class _InFlight:
    deliver_at: float
    sequence: int
    destination: Address = field(compare=False)
    data: bytes = field(compare=False)
    source: Address = field(compare=False)


class MemoryNetwork:
    """A lossy, delaying datagram network between :class:`MemoryTransport` endpoints.

    Args:
        seed: seeds every random choice the network makes.
        loss: probability that a datagram is lost.
        latency: (min, max) one-way delay in seconds, drawn uniformly per datagram.

    Run it with ``await nursery.start(network.run)`` before nodes send.
    """

    def __init__(
        self, seed: int, *, loss: float = 0.0, latency: tuple[float, float] = (0.001, 0.010)
    ) -> None:
        self.rng = random.Random(seed)  # noqa: S311 (simulated loss and delay, not crypto)
        self.loss = loss
        self.latency = latency
        self.stats: Counter[str] = Counter()
        #: Every delivered datagram as (time, source, destination, size), for reproducibility
        #: checks; recording is off unless set to a list.
        self.trace: list[tuple[float, Address, Address, int]] | None = None
        self._endpoints: dict[Address, MemoryTransport] = {}
        self._queue: list[_InFlight] = []
        self._sequence = itertools.count()
        self._wake = trio.Event()

    def endpoint(self, address: Address) -> MemoryTransport:
        """Attach a new endpoint at ``address``.

        Raises:
            OSError: if the address is taken (as binding a used port would).
        """
        if address in self._endpoints:
            raise OSError(f"address {address} in use")
        transport = MemoryTransport(self, address)
        self._endpoints[address] = transport
        return transport

    def detach(self, address: Address) -> None:
        """Remove the endpoint at ``address``; datagrams to it are lost from now on."""
        transport = self._endpoints.pop(address, None)
        if transport is not None:
            transport.closed = True
            transport._send.close()

    def submit(self, data: bytes, source: Address, destination: Address) -> None:
        """Accept a datagram for delivery (or loss)."""
        self.stats["sent"] += 1
        if self.rng.random() < self.loss:
            self.stats["lost"] += 1
            return
        delay = self.rng.uniform(*self.latency)
        item = _InFlight(
            trio.current_time() + delay, next(self._sequence), destination, data, source
        )
        heapq.heappush(self._queue, item)
        self._wake.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver datagrams when their time comes, until cancelled."""
        task_status.started()
        while True:
            deadline = self._queue[0].deliver_at if self._queue else math.inf
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            while self._queue and self._queue[0].deliver_at <= now:
                item = heapq.heappop(self._queue)
                self._deliver(item)

    def _deliver(self, item: _InFlight) -> None:
        endpoint = self._endpoints.get(item.destination)
        if endpoint is None:
            self.stats["unreachable"] += 1
            return
        try:
            endpoint._send.send_nowait((item.data, item.source))
        except trio.WouldBlock:
            self.stats["inbox-full"] += 1
            return
        self.stats["delivered"] += 1
        if self.trace is not None:
            self.trace.append((item.deliver_at, item.source, item.destination, len(item.data)))


class MemoryTransport:
    """One endpoint of a :class:`MemoryNetwork`; implements the DHT's ``DatagramTransport``."""

    def __init__(self, network: MemoryNetwork, address: Address) -> None:
        self._network = network
        self._address = address
        self._send, self._receive = trio.open_memory_channel[tuple[bytes, Address]](INBOX_CAPACITY)
        self.closed = False

    @property
    def local_address(self) -> Address:
        """This endpoint's address."""
        return self._address

    async def send(self, data: bytes, address: Address) -> None:
        """Hand a datagram to the network (silently dropped once detached)."""
        if not self.closed:
            self._network.submit(bytes(data), self._address, address)
        await trio.lowlevel.checkpoint()

    async def receive(self) -> tuple[bytes, Address]:
        """Wait for the next datagram; blocks forever once detached (the node is gone)."""
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            await trio.sleep_forever()
            raise AssertionError("unreachable") from None
