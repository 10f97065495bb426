"""The link driver over real loopback TCP: dialling, reuse, deadlines, limits, keepalive."""

from __future__ import annotations

import socket

import nacl.signing
import pytest
import trio

from p2pnode.link.connection import PROTOCOL_ID, FrameReceived, LinkConnection, Role
from p2pnode.link.frames import Frame, FrameKind, decode_frame
from p2pnode.link.manager import Link, LinkError, LinkManager


class Peer:
    """A link manager that records the frames it receives."""

    def __init__(self, **options: float) -> None:
        self.key = nacl.signing.SigningKey.generate()
        self.identity = bytes(self.key.verify_key)
        self.frames: list[bytes] = []
        self.manager = LinkManager(self.key, self._on_frame, **options)  # type: ignore[arg-type]

    async def _on_frame(self, link: Link, frame: Frame) -> None:
        self.frames.append(frame.data)

    @property
    def address(self) -> tuple[str, int]:
        assert self.manager.listen_address is not None
        return self.manager.listen_address


async def wait_until(predicate: object) -> None:
    while not predicate():  # type: ignore[operator]
        await trio.sleep(0.01)


async def test_frames_flow_both_ways_over_one_reused_link(nursery: trio.Nursery) -> None:
    alice, bob = Peer(), Peer()
    await nursery.start(alice.manager.serve)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10):
        link = await alice.manager.connect(bob.identity, [bob.address])
        assert link.peer == bob.identity
        link.send(FrameKind.ENVELOPE, b"to bob")
        await wait_until(lambda: bob.frames == [b"to bob"])
        # Bob dials back: he gets the same link, not a second connection.
        back = await bob.manager.connect(alice.identity, [alice.address])
        back.send(FrameKind.ENVELOPE, b"to alice")
        await wait_until(lambda: alice.frames == [b"to alice"])
        assert alice.manager.open_links == 1 and bob.manager.open_links == 1
        assert bob.manager.stats["handshake:initiator"] == 0


async def test_simultaneous_dials_settle_on_one_link(nursery: trio.Nursery) -> None:
    alice, bob = Peer(), Peer()
    await nursery.start(alice.manager.serve)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10):
        links: dict[str, Link] = {}

        async def dial(name: str, src: Peer, dst: Peer) -> None:
            links[name] = await src.manager.connect(dst.identity, [dst.address])

        async with trio.open_nursery() as both:
            both.start_soon(dial, "a", alice, bob)
            both.start_soon(dial, "b", bob, alice)
        await wait_until(lambda: alice.manager.open_links == 1 and bob.manager.open_links == 1)
        kept_a = alice.manager.get(bob.identity)
        kept_b = bob.manager.get(alice.identity)
        assert kept_a is not None and kept_b is not None
        # Both keep the link dialled by the smaller identity key.
        assert kept_a.initiator == kept_b.initiator == min(alice.identity, bob.identity)
        kept_a.send(FrameKind.ENVELOPE, b"over the kept link")
        await wait_until(lambda: bob.frames == [b"over the kept link"])


async def test_dialling_the_wrong_node_fails(nursery: trio.Nursery) -> None:
    alice, bob = Peer(), Peer()
    carol = nacl.signing.SigningKey.generate()
    await nursery.start(alice.manager.serve)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10), pytest.raises(LinkError, match="not the node we dialled"):
        await alice.manager.connect(bytes(carol.verify_key), [bob.address])
    assert alice.manager.open_links == 0


async def test_unreachable_addresses_fail_with_each_reason(nursery: trio.Nursery) -> None:
    alice, bob = Peer(), Peer()
    await nursery.start(alice.manager.serve)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()
    with trio.fail_after(10), pytest.raises(LinkError, match=f"127.0.0.1:{dead[1]}"):
        await alice.manager.connect(bob.identity, [dead])


@pytest.mark.parametrize("trickle", [False, True])
async def test_silent_or_trickling_peer_is_dropped_at_the_handshake_deadline(
    nursery: trio.Nursery, trickle: bool
) -> None:
    bob = Peer(handshake_timeout=0.5)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*bob.address)
        started = trio.current_time()
        if trickle:
            greeting = (len(PROTOCOL_ID) + 32).to_bytes(4, "big") + PROTOCOL_ID
            try:
                for byte in greeting:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)  # a byte every 50 ms: the greeting takes ~1 s
            except trio.BrokenResourceError:
                pass  # cut off mid-greeting, as it should be
        # The responder closes the connection at its deadline without answering.
        data = b""
        try:
            while chunk := await stream.receive_some(1024):
                data += chunk
        except trio.BrokenResourceError:
            pass
        assert data == b""
        assert 0.4 < trio.current_time() - started < 5
        await wait_until(lambda: bob.manager.stats["closed:handshake timed out"] == 1)
        assert bob.manager.pending_handshakes == 0


async def test_unauthenticated_connections_are_capped(nursery: trio.Nursery) -> None:
    bob = Peer(max_handshakes=3, handshake_timeout=5)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10):
        idle = [await trio.open_tcp_stream(*bob.address) for _ in range(3)]
        await wait_until(lambda: bob.manager.pending_handshakes == 3)
        extra = await trio.open_tcp_stream(*bob.address)
        assert await extra.receive_some(10) == b""  # closed at once
        assert bob.manager.stats["refused:too-many-handshakes"] == 1
        for stream in idle:
            await stream.aclose()


async def test_established_links_are_capped(nursery: trio.Nursery) -> None:
    bob = Peer(max_links=2)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10):
        peers = [Peer(), Peer()]
        for peer in peers:
            await nursery.start(peer.manager.serve)
            await peer.manager.connect(bob.identity, [bob.address])
        third = Peer()
        await nursery.start(third.manager.serve)
        with pytest.raises(LinkError):
            link = await third.manager.connect(bob.identity, [bob.address])
            await wait_until(link.closed.is_set)
            raise LinkError("closed by the capped peer")
        assert bob.manager.open_links == 2
        assert bob.manager.stats["refused:too-many-links"] == 1


async def test_connections_from_one_address_are_rate_limited(nursery: trio.Nursery) -> None:
    bob = Peer(handshakes_per_second=0.01, handshake_burst=2)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10):
        for _ in range(2):
            first = Peer()
            await nursery.start(first.manager.serve)
            await first.manager.connect(bob.identity, [bob.address])
        late = Peer()
        await nursery.start(late.manager.serve)
        with pytest.raises(LinkError):
            await late.manager.connect(bob.identity, [bob.address])
        assert bob.manager.stats["refused:rate-limited"] == 1


async def test_idle_link_is_kept_alive_and_a_dead_one_is_dropped(nursery: trio.Nursery) -> None:
    alice = Peer(keepalive_interval=0.1, idle_timeout=0.5)
    bob = Peer(keepalive_interval=0.1, idle_timeout=0.5)
    await nursery.start(alice.manager.serve)
    await nursery.start(bob.manager.serve)
    with trio.fail_after(10):
        link = await alice.manager.connect(bob.identity, [bob.address])
        # Pings keep an otherwise silent link open well past the idle timeout.
        await trio.sleep(1.5)
        assert not link.closed.is_set() and alice.manager.open_links == 1

    # A peer that stops answering (its handler hangs, so it reads nothing more and answers
    # no ping) is dropped at the idle timeout.
    silent = Peer(keepalive_interval=1000, idle_timeout=1000)

    async def hang(link: Link, frame: Frame) -> None:
        await trio.sleep_forever()

    silent.manager._on_frame = hang
    await nursery.start(silent.manager.serve)
    watcher = Peer(keepalive_interval=0.1, idle_timeout=0.5)
    await nursery.start(watcher.manager.serve)
    with trio.fail_after(10):
        link = await watcher.manager.connect(silent.identity, [silent.address])
        link.send(FrameKind.ENVELOPE, b"the last thing it reads")
        started = trio.current_time()
        await wait_until(lambda: watcher.manager.stats["closed:idle timeout"] == 1)
        assert link.closed.is_set() and watcher.manager.open_links == 0
        assert trio.current_time() - started < 3


def _established_pair() -> tuple[LinkConnection, LinkConnection]:
    """Two sans-I/O connections with the handshake done (bytes moved by hand)."""
    alice, bob = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    dialler = LinkConnection(Role.INITIATOR, alice, expected_peer=bytes(bob.verify_key))
    listener = LinkConnection(Role.RESPONDER, bob)
    while (out := dialler.data_to_send()) or (back := listener.data_to_send()):
        if out:
            listener.receive_data(out)
        else:
            dialler.receive_data(back)
    assert dialler.peer == bytes(bob.verify_key) and listener.peer == bytes(alice.verify_key)
    return dialler, listener


def _frames_in(connection: LinkConnection, data: bytes) -> list[bytes]:
    return [
        decode_frame(event.payload).data
        for event in connection.receive_data(data)
        if isinstance(event, FrameReceived)
    ]


def _link_over_socketpair() -> tuple[Link, socket.socket, LinkConnection]:
    """A link whose writer task is not running, over one end of a socket pair; the other end
    (a blocking stdlib socket) and the peer's connection read what it writes."""
    ours, theirs = socket.socketpair()
    dialler, listener = _established_pair()
    assert dialler.peer is not None and listener.peer is not None
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    # The peer is the listener; the initiator, our own key (the listener's peer).
    return Link(dialler, stream, dialler.peer, listener.peer), theirs, listener


async def test_flush_writes_queued_frames_at_once_without_the_writer_task() -> None:
    link, theirs, peer = _link_over_socketpair()
    with theirs:
        link.send(FrameKind.ENVELOPE, b"first")
        link.send(FrameKind.RECEIPT, b"second")
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(65536)  # queued only: nothing is written until a flush or the writer
        link.flush()
        theirs.setblocking(True)
        theirs.settimeout(5)
        received: list[bytes] = []
        while len(received) < 2:
            received += _frames_in(peer, theirs.recv(65536))
        assert received == [b"first", b"second"]


async def test_what_a_flush_could_not_write_is_sent_by_the_writer_task_in_order() -> None:
    link, theirs, peer = _link_over_socketpair()
    payloads = [bytes([i]) * 16_000 for i in range(64)]  # 1 MB: more than the socket takes
    with theirs:
        for payload in payloads:
            link.send(FrameKind.ENVELOPE, payload)
        link.flush()
        link.send(FrameKind.ENVELOPE, b"after the flush")
        link.flush()  # the first flush's rest must go first: this one leaves it all queued
        theirs.setblocking(False)
        received = _frames_in(peer, theirs.recv(1 << 22))
        assert 0 < len(received) < len(payloads)  # the socket took part of it
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link._writer)
                while len(received) < len(payloads) + 1:
                    await trio.lowlevel.wait_readable(theirs)
                    received += _frames_in(peer, theirs.recv(1 << 20))
                nursery.cancel_scope.cancel()
        assert received == [*payloads, b"after the flush"]
