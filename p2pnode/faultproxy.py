"""A TCP relay that injects faults between real processes, for integration tests.

::

    proxy = FaultProxy(("127.0.0.1", 4001))
    host, port = await nursery.start(proxy.run)   # now dial (host, port) instead of 4001
    proxy.delay = 0.2       # every chunk arrives 0.2 s later, in each direction
    proxy.drop = True       # black hole: connections stay open, nothing goes through
    proxy.duplicate = 0.5   # half the chunks are forwarded twice
    proxy.cut()             # close every connection; refuse new ones ...
    proxy.heal()            # ... until healed
    proxy.reset()           # back to passing everything through unchanged

:class:`p2pnode.testnet.Testnet` puts one in front of every node's link port with
``proxied=True`` (the node advertises the proxy's address in its DHT record, so peers reach it
only through the proxy). The proxy relays bytes; it knows nothing of what they mean. A
``duplicate`` chunk inside an encrypted link stream is a corruption the receiver must detect.

Modes can be changed at any time from any task of the same trio run, and apply to the chunks
read after the change, on every connection, new and existing:

- *pass* (the default): bytes are relayed unchanged, in order, half-closes included.
- ``delay``: seconds added to every chunk, in each direction (latency, not a throughput limit:
  chunks behind a delayed one are not delayed further). The end of a stream is delayed too.
- ``drop``: chunks are read and discarded in both directions, so senders never block; the
  connections stay open and the end of a stream is not passed on either.
- ``duplicate``: the probability that a chunk is written twice (``0.0`` to ``1.0``).
- :meth:`cut`: every open connection is closed at once, and new connections are accepted and
  closed at once (the dialler sees its connection closed before anything is exchanged) until
  :meth:`heal`. The listening port stays bound, so it can be healed on the same address.

A chunk is whatever one read returned (at most :data:`CHUNK_SIZE` bytes): the boundaries are
the kernel's, not the writer's.

Resource handling: :meth:`run` owns the listener and every connection (both sockets of each);
cancelling it closes them all. Error handling: a connection whose either side fails (reset,
upstream unreachable) is closed on both sides and counted in :attr:`FaultProxy.stats`; nothing
a connection does escapes :meth:`run`, which raises only if it cannot bind its port.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections import Counter
from typing import Any, Final

import trio

log = logging.getLogger(__name__)

#: Bytes read per receive call, and so the largest chunk the faults act on. Large enough that
#: a relayed stream is not slowed by the proxy (a 100 B frame and a 64 KiB batch alike are one
#: read), small enough that a delayed direction holds a bounded amount of memory.
CHUNK_SIZE: Final = 64 * 1024
#: Chunks read but not yet written, per direction; beyond that the reader waits (TCP then
#: pushes back on the sender). With ``delay`` this bounds memory at about 4 MiB per direction.
PIPELINE_DEPTH: Final = 64
#: Seconds to connect to the target before the accepted connection is given up (the same as
#: the link's own connect timeout, :data:`p2pnode.link.manager.CONNECT_TIMEOUT`).
CONNECT_TIMEOUT: Final = 5.0
#: Seconds a new connection waits for a target while none is set (the harness clears the
#: target while the node behind the proxy restarts); then it is closed.
TARGET_WAIT: Final = 30.0

Address = tuple[str, int]

# What the reader hands the writer: bytes to write (twice if the flag says so), or the end of
# the stream (None), each with the trio time it may be written at.
_Item = tuple[float, bytes | None, bool]


class FaultProxy:
    """A TCP relay from ``(host, port)`` to ``target`` with run-time switchable faults.

    Args:
        target: where connections are relayed to; may be None and set later (connections
            wait for it, up to :data:`TARGET_WAIT`).
        host: address to listen on (loopback by default).
        port: port to listen on (0 picks a free one; see :attr:`address`).
        seed: seed of the random choices of ``duplicate`` (for reproducible runs).
    """

    def __init__(
        self,
        target: Address | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._target: Address | None = None
        self._target_set = trio.Event()
        self.target = target
        self._delay = 0.0
        self._duplicate = 0.0
        #: Black-hole mode (see the module docstring).
        self.drop = False
        self._cut = False
        # Not for security: which chunks get duplicated.
        self._rng = random.Random(seed)  # noqa: S311
        self._connections: set[trio.CancelScope] = set()
        #: The address it listens on, once :meth:`run` has started.
        self.address: Address | None = None
        #: Counters: ``accepted``, ``refused`` (while cut), ``upstream-failed``, ``cut``
        #: (connections closed by :meth:`cut`), ``closed``, ``chunks``, ``bytes`` (forwarded),
        #: ``dropped``, ``duplicated`` (chunks).
        self.stats: Counter[str] = Counter()

    # --- modes -------------------------------------------------------------------------------

    @property
    def target(self) -> Address | None:
        """Where new connections are relayed to (None: they wait until it is set)."""
        return self._target

    @target.setter
    def target(self, value: Address | None) -> None:
        self._target = value
        if value is None:
            if self._target_set.is_set():
                self._target_set = trio.Event()
        else:
            self._target_set.set()

    @property
    def delay(self) -> float:
        """Seconds added to each chunk, each direction (0 for none)."""
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"a delay is a finite number of seconds >= 0, not {seconds!r}")
        self._delay = float(seconds)

    @property
    def duplicate(self) -> float:
        """Probability that a chunk is forwarded twice (0 for never, 1 for every chunk)."""
        return self._duplicate

    @duplicate.setter
    def duplicate(self, probability: float) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"a probability is between 0 and 1, not {probability!r}")
        self._duplicate = float(probability)

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`heal`."""
        return self._cut

    @property
    def open_connections(self) -> int:
        """Connections currently relayed (or waiting for their target)."""
        return len(self._connections)

    def cut(self) -> None:
        """Close every open connection now and refuse new ones until :meth:`heal`."""
        self._cut = True
        for scope in list(self._connections):
            self.stats["cut"] += 1
            scope.cancel()

    def heal(self) -> None:
        """Accept connections again after :meth:`cut` (the other modes are left as they are)."""
        self._cut = False

    def reset(self) -> None:
        """Back to pass mode: no delay, no drop, no duplicates, not cut."""
        self.delay = 0.0
        self.duplicate = 0.0
        self.drop = False
        self.heal()

    # --- serving -----------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and relay until cancelled; ``task_status.started(address)`` once listening.

        Raises:
            OSError: if the listening address cannot be bound.
        """
        async with trio.open_nursery() as nursery:
            listeners: list[trio.SocketListener] = await nursery.start(
                functools.partial(trio.serve_tcp, host=self._host), self._handle, self._port
            )
            host, port = listeners[0].socket.getsockname()[:2]
            self.address = (str(host), int(port))
            task_status.started(self.address)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if self._cut:
                self.stats["refused"] += 1
                return
            self.stats["accepted"] += 1
            with trio.CancelScope() as scope:
                self._connections.add(scope)
                try:
                    await self._relay(client, scope)
                finally:
                    self._connections.discard(scope)
            self.stats["closed"] += 1

    async def _relay(self, client: trio.SocketStream, scope: trio.CancelScope) -> None:
        with trio.move_on_after(TARGET_WAIT):
            await self._target_set.wait()
        target = self._target
        if target is None:
            self.stats["upstream-failed"] += 1
            log.debug("no target within %s s; closing the connection", TARGET_WAIT)
            return
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                upstream = await trio.open_tcp_stream(*target)
        except (OSError, trio.TooSlowError) as exc:
            self.stats["upstream-failed"] += 1
            log.debug("cannot reach %s:%s: %s", target[0], target[1], exc)
            return
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, upstream, scope)
            nursery.start_soon(self._pump, upstream, client, scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        """Relay one direction: a reader stamps chunks with when they may go, a writer sends
        them then, so a delay is latency added to each chunk."""
        send, receive = trio.open_memory_channel[_Item](PIPELINE_DEPTH)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, source, send, scope)
            nursery.start_soon(self._write, receive, sink, scope)

    async def _read(
        self,
        source: trio.SocketStream,
        send: trio.MemorySendChannel[_Item],
        scope: trio.CancelScope,
    ) -> None:
        async with send:
            while True:
                try:
                    chunk = await source.receive_some(CHUNK_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    scope.cancel()  # a reset on one side closes both
                    return
                if self.drop:
                    if chunk:
                        self.stats["dropped"] += 1
                        continue
                    return  # the end is not passed on either
                due = trio.current_time() + self._delay
                if not chunk:
                    await send.send((due, None, False))
                    return
                twice = self._duplicate > 0 and self._rng.random() < self._duplicate
                await send.send((due, chunk, twice))

    async def _write(
        self,
        receive: trio.MemoryReceiveChannel[_Item],
        sink: trio.SocketStream,
        scope: trio.CancelScope,
    ) -> None:
        async with receive:
            async for due, chunk, twice in receive:
                await trio.sleep_until(due)
                try:
                    if chunk is None:
                        await sink.send_eof()
                        return
                    await sink.send_all(chunk)
                    if twice:
                        await sink.send_all(chunk)
                        self.stats["duplicated"] += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    scope.cancel()
                    return
                self.stats["chunks"] += 1
                self.stats["bytes"] += len(chunk)


__all__ = ["CHUNK_SIZE", "CONNECT_TIMEOUT", "TARGET_WAIT", "FaultProxy"]
