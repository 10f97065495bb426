"""The fault proxy on its own, in front of plain trio TCP servers on loopback.

Each fault is checked for what a test relying on it needs: pass mode relays every byte both
ways, in order, with half-closes; ``delay`` adds latency to each chunk in each direction without
limiting throughput; ``drop`` swallows bytes while keeping connections open; ``duplicate`` writes
chunks twice; ``cut`` closes live connections and refuses new ones until ``heal``. Every wait has
a deadline; "nothing arrived" is shown by a positive event (the proxy counted the chunk it
discarded, or the time the bytes are due has not come), never by waiting and seeing nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from p2pnode.faultproxy import FaultProxy

#: Deadline for anything that should happen promptly on loopback.
DEADLINE = 10.0


@dataclass
class Server:
    """A TCP server on loopback that records what it receives and, if ``echo``, sends it back."""

    echo: bool = True
    address: tuple[str, int] = ("127.0.0.1", 0)
    received: bytearray = field(default_factory=bytearray)
    arrivals: list[tuple[float, bytes]] = field(default_factory=list)
    connections: int = 0
    eofs: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            while chunk := await stream.receive_some(65536):
                self.received += chunk
                self.arrivals.append((trio.current_time(), chunk))
                if self.echo:
                    await stream.send_all(chunk)
            self.eofs += 1
            if self.echo:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass


@asynccontextmanager
async def serving(*, echo: bool = True) -> AsyncIterator[Server]:
    server = Server(echo=echo)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), server.handle, 0
        )
        server.address = listeners[0].socket.getsockname()[:2]
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxying(target: tuple[str, int] | None, **kwargs: int) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(target, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        yield proxy
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def setup(
    *, echo: bool = True, seed: int | None = None
) -> AsyncIterator[tuple[Server, FaultProxy]]:
    async with serving(echo=echo) as server, proxying(server.address, seed=seed) as proxy:
        yield server, proxy


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    assert proxy.address is not None
    return await trio.open_tcp_stream(*proxy.address)


async def receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = bytearray()
    with trio.fail_after(DEADLINE):
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            assert chunk, f"connection closed after {len(data)} of {size} bytes"
            data += chunk
    return bytes(data)


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(DEADLINE):
        while not condition():
            await trio.sleep(0.005)
        return
    pytest.fail(f"timed out waiting for {what}")


async def closed_by_peer(stream: trio.SocketStream) -> bool:
    """True once the peer closed the connection (end of stream or reset), within the deadline;
    any bytes still arriving before that are skipped."""
    with trio.fail_after(DEADLINE):
        while True:
            try:
                if not await stream.receive_some(65536):
                    return True
            except trio.BrokenResourceError:
                return True


async def until(deadline: float, action: Callable[[], Awaitable[bytes]]) -> bytes | None:
    """The result of ``action`` if it completes before trio time ``deadline``, else None."""
    with trio.move_on_at(deadline):
        return await action()
    return None


# --- pass ----------------------------------------------------------------------------------


async def test_pass_relays_every_byte_both_ways_and_the_half_close() -> None:
    payload = os.urandom(1024 * 1024 + 17)  # many chunks, not a multiple of any buffer size
    async with setup() as (server, proxy):
        async with await connect(proxy) as client:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, payload)
                echoed = await receive_exactly(client, len(payload))
            assert echoed == payload
            await client.send_eof()
            # The end of the stream reaches the server, whose own end comes back.
            assert await closed_by_peer(client)
        assert bytes(server.received) == payload
        assert server.eofs == 1
        assert proxy.stats["bytes"] == 2 * len(payload)
        assert proxy.stats["duplicated"] == proxy.stats["dropped"] == 0
        await wait_for(lambda: proxy.open_connections == 0, "the proxy to close the connection")


async def test_target_can_be_set_after_a_connection_arrived() -> None:
    async with serving() as server, proxying(None) as proxy:
        async with await connect(proxy) as client:
            await client.send_all(b"early")
            await wait_for(lambda: proxy.open_connections == 1, "the proxy to accept")
            assert server.connections == 0  # nowhere to relay to yet
            proxy.target = server.address
            assert await receive_exactly(client, 5) == b"early"


async def test_an_unreachable_target_closes_the_connection() -> None:
    with trio.socket.socket() as sock:  # a port nothing listens on once closed
        await sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()
    async with proxying(dead) as proxy, await connect(proxy) as client:
        assert await closed_by_peer(client)
        assert proxy.stats["upstream-failed"] == 1


# --- delay ---------------------------------------------------------------------------------


async def test_delay_adds_latency_to_each_direction() -> None:
    delay = 0.3
    async with setup() as (server, proxy):
        proxy.delay = delay
        async with await connect(proxy) as client:
            sent = trio.current_time()
            await client.send_all(b"ping")
            # The echo cannot be back before it has waited once each way.
            early = await until(sent + 2 * delay - 0.02, lambda: receive_exactly(client, 4))
            assert early is None, "the delayed echo came back too early"
            assert await receive_exactly(client, 4) == b"ping"
            back = trio.current_time()
        (arrived, _), *_ = server.arrivals
        assert arrived - sent >= delay
        assert back - sent >= 2 * delay


async def test_delay_is_latency_not_a_limit_on_throughput() -> None:
    delay, count = 0.3, 10
    async with setup() as (_server, proxy):
        proxy.delay = delay
        async with await connect(proxy) as client:
            start = trio.current_time()
            for i in range(count):
                await client.send_all(b"%02d" % i)
                await trio.sleep(0.02)  # spaces the writes so they are separate chunks
            echoed = await receive_exactly(client, 2 * count)
            took = trio.current_time() - start
        assert echoed == b"".join(b"%02d" % i for i in range(count))
        # One-at-a-time delays would need count * delay in each direction (6 s).
        assert 2 * delay <= took < count * delay


# --- drop ----------------------------------------------------------------------------------


async def test_drop_swallows_bytes_and_keeps_the_connection_open() -> None:
    async with setup() as (server, proxy):
        async with await connect(proxy) as client:
            await client.send_all(b"hello")
            assert await receive_exactly(client, 5) == b"hello"
            proxy.drop = True
            await client.send_all(b"lost")
            await wait_for(lambda: proxy.stats["dropped"] == 1, "the proxy to read and drop it")
            assert bytes(server.received) == b"hello"  # the dropped chunk is gone for good
            assert proxy.open_connections == 1  # still open: a black hole, not a reset
            proxy.drop = False
            await client.send_all(b"back")
            assert await receive_exactly(client, 4) == b"back"
        assert bytes(server.received) == b"helloback"


async def test_drop_accepts_new_connections_and_relays_nothing() -> None:
    async with setup() as (server, proxy):
        proxy.drop = True
        async with await connect(proxy) as client:
            await client.send_all(b"x" * 1000)
            await wait_for(lambda: proxy.stats["dropped"] >= 1, "the proxy to drop the bytes")
            await wait_for(lambda: server.connections == 1, "the upstream connection")
            assert server.received == b""
            assert proxy.stats["bytes"] == 0


# --- duplicate -----------------------------------------------------------------------------


async def test_duplicate_every_chunk() -> None:
    async with setup(echo=False) as (server, proxy):
        proxy.duplicate = 1.0
        async with await connect(proxy) as client:
            for i, byte in enumerate(b"abcdef", start=1):
                await client.send_all(bytes([byte]))
                await wait_for(lambda n=i: len(server.received) == 2 * n, "the chunk twice")
        assert bytes(server.received) == b"aabbccddeeff"
        assert proxy.stats["duplicated"] == 6


async def test_duplicate_some_chunks() -> None:
    count = 40
    async with setup(echo=False, seed=7) as (server, proxy):
        proxy.duplicate = 0.5
        async with await connect(proxy) as client:
            for i in range(count):
                await client.send_all(bytes([i]))
                await wait_for(lambda n=i: proxy.stats["chunks"] == n + 1, "the chunk")
        await wait_for(lambda: len(server.received) == count + proxy.stats["duplicated"], "")
    duplicated = proxy.stats["duplicated"]
    assert 0 < duplicated < count
    # Every byte arrives once or twice, in order.
    runs = [bytes(server.received).count(bytes([i])) for i in range(count)]
    assert set(runs) == {1, 2}
    assert bytes(server.received) == b"".join(bytes([i]) * runs[i] for i in range(count))


# --- cut and heal ----------------------------------------------------------------------------


async def test_cut_closes_connections_and_refuses_new_ones_until_healed() -> None:
    async with setup() as (server, proxy):
        async with await connect(proxy) as live:
            await live.send_all(b"one")
            assert await receive_exactly(live, 3) == b"one"
            proxy.cut()
            assert proxy.is_cut
            assert await closed_by_peer(live)
        assert proxy.stats["cut"] == 1

        async with await connect(proxy) as refused:
            assert await closed_by_peer(refused)
        assert proxy.stats["refused"] == 1
        assert server.connections == 1  # the refused one never reached the server

        proxy.heal()
        async with await connect(proxy) as again:
            await again.send_all(b"two")
            assert await receive_exactly(again, 3) == b"two"
        assert server.connections == 2


async def test_reset_returns_to_pass_mode() -> None:
    async with setup() as (_server, proxy):
        proxy.delay = 5.0
        proxy.drop = True
        proxy.duplicate = 1.0
        proxy.cut()
        proxy.reset()
        assert (proxy.delay, proxy.drop, proxy.duplicate, proxy.is_cut) == (0, False, 0, False)
        async with await connect(proxy) as client:
            await client.send_all(b"plain")
            assert await receive_exactly(client, 5) == b"plain"
            assert proxy.stats["duplicated"] == 0


@pytest.mark.parametrize("delay", [-1.0, float("nan"), float("inf")])
def test_bad_delay_is_refused(delay: float) -> None:
    with pytest.raises(ValueError, match="delay"):
        FaultProxy().delay = delay


@pytest.mark.parametrize("probability", [-0.1, 1.5, float("nan")])
def test_bad_duplicate_probability_is_refused(probability: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        FaultProxy().duplicate = probability
