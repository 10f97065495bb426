"""The trio side of links: listening, dialling, one link per peer, keepalive, limits.

Protocol logic lives in :class:`~p2pnode.link.connection.LinkConnection`; this module moves its
bytes over TCP and enforces time and resource limits:

- a connection must finish the handshake within :data:`HANDSHAKE_TIMEOUT` (a peer that says
  nothing, or trickles bytes, is dropped then);
- at most :data:`MAX_HANDSHAKES` unauthenticated connections at once, and new connections from
  one source address are rate-limited before any key agreement or signature is spent on them;
- at most :data:`MAX_LINKS` established links;
- one link per pair of nodes, reused in both directions: when both dial at once, both keep the
  link dialled by the node with the smaller identity key and close the other;
- idle links are kept alive with pings and closed after :data:`IDLE_TIMEOUT` of silence.

Resource handling: every connection task runs in the nursery of :meth:`LinkManager.serve`;
cancelling it closes every link. Error handling: a peer's misbehaviour closes that one link
(logged at debug level and counted in :attr:`LinkManager.stats`); nothing a peer does escapes
as an exception.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import nacl.signing
import trio

from p2pnode.codec import DecodeError
from p2pnode.link.connection import (
    Closed,
    Established,
    Event,
    FrameReceived,
    LinkConnection,
    Role,
)
from p2pnode.link.frames import Frame, FrameKind, decode_frame, encode_frame
from p2pnode.ratelimit import KeyedLimiter

log = logging.getLogger(__name__)

#: Seconds a new connection has to complete the handshake.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds to establish a TCP connection to one address of a peer.
CONNECT_TIMEOUT: Final = 5.0
#: Unauthenticated connections (accepted or dialled, handshake not done) at once.
MAX_HANDSHAKES: Final = 64
#: Established links at once.
MAX_LINKS: Final = 512
#: New inbound connections per source address: sustained rate per second and burst. A
#: handshake costs us a key agreement and a signature; this bounds what one host can make us
#: spend.
HANDSHAKES_PER_SECOND: Final = 5.0
HANDSHAKE_BURST: Final = 20.0
#: Seconds without sending before a keepalive ping; seconds without receiving before the link
#: is considered dead.
KEEPALIVE_INTERVAL: Final = 30.0
IDLE_TIMEOUT: Final = 90.0
#: Bytes read per receive call.
_READ_SIZE: Final = 256 * 1024

FrameHandler = Callable[["Link", Frame], Awaitable[None]]


class LinkError(Exception):
    """A link could not be established or was lost; ``reason`` says why."""


class Link:
    """An established, authenticated link to ``peer`` (its identity key).

    :meth:`send` queues a frame and returns at once (frames queued together go out in one
    write); the frame is on its way, not yet delivered. Use receipts for delivery. A writer task
    sends what is queued; :meth:`flush` sends it at once instead, where the socket takes it.
    """

    def __init__(
        self, connection: LinkConnection, stream: trio.abc.Stream, peer: bytes, initiator: bytes
    ) -> None:
        self.peer = peer
        self.initiator = initiator
        self.connection = connection
        self._stream = stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._unwritten = b""  # taken from the connection by flush(), not taken by the socket
        self._writing = False  # the writer task is in send_all
        self._dirty = trio.Event()
        self.closed = trio.Event()
        self.last_sent = trio.current_time()
        self.last_received = trio.current_time()

    def send(self, kind: FrameKind, data: bytes = b"") -> None:
        """Queue a frame for sending.

        Raises:
            LinkError: if the link is closed.
            ValueError: if ``data`` is too large for a frame.
        """
        if self.closed.is_set() or not self.connection.is_open:
            raise LinkError("the link is closed")
        self.connection.send_frame(encode_frame(kind, data))
        self._dirty.set()

    def flush(self) -> None:
        """Write the frames queued so far now, as far as the socket takes them without
        waiting; the writer task sends the rest.

        A frame on a round trip (an envelope, a receipt) then leaves in the caller's scheduler
        step rather than on the writer task's next turn, after a task switch and ``send_all``'s
        own checkpoints (traced on the 2-core test machine: from sealed to read by the peer
        0.11 ms, against 0.13 ms through the writer task). Call it after queueing a group of
        frames, so that they still go out in one write. Never raises: a socket error is left
        for the writer task, which meets it again and ends the link.
        """
        if self._socket is None or self._writing or self._unwritten:
            return  # the writer task is on it, or this stream has no socket to write to now
        fd = self._socket.fileno()
        if fd < 0:
            return  # closed
        data = self.connection.data_to_send()
        if not data:
            return
        try:
            written = os.write(fd, data)  # trio's sockets are non-blocking
        except OSError:  # BlockingIOError included: the writer task waits for room
            written = 0
        if written:
            self.last_sent = trio.current_time()
        if written < len(data):
            self._unwritten = data[written:]
            self._dirty.set()

    def close(self) -> None:
        """Close the link (orderly: the peer sees a FINAL frame)."""
        if self.connection.is_open:
            self.connection.close()
        self._dirty.set()

    async def _writer(self) -> str | None:
        """Write queued frames until the link closes; returns why writing stopped."""
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            data = self._unwritten + self.connection.data_to_send()
            self._unwritten = b""
            if data:
                self._writing = True
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    return f"connection lost: {exc}"
                finally:
                    self._writing = False
                self.last_sent = trio.current_time()
            if not self.connection.is_open:
                return None


class LinkManager:
    """All of a node's links.

    Args:
        signing_key: our identity key.
        on_frame: awaited for every frame (other than keepalives) that arrives on any link, in
            order per link; while it runs, that link reads nothing more (backpressure).
        on_link: called when a link is up (may be None).
    """

    def __init__(
        self,
        signing_key: nacl.signing.SigningKey,
        on_frame: FrameHandler,
        *,
        on_link: Callable[[Link], None] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_links: int = MAX_LINKS,
        max_handshakes: int = MAX_HANDSHAKES,
        handshakes_per_second: float = HANDSHAKES_PER_SECOND,
        handshake_burst: float = HANDSHAKE_BURST,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._key = signing_key
        self.identity = bytes(signing_key.verify_key)
        self._on_frame = on_frame
        self._on_link = on_link
        self.handshake_timeout = handshake_timeout
        self.max_links = max_links
        self.max_handshakes = max_handshakes
        self.keepalive_interval = keepalive_interval
        self.idle_timeout = idle_timeout
        self._limiter = KeyedLimiter(handshakes_per_second, handshake_burst)
        self._links: dict[bytes, Link] = {}
        self._handshakes = 0
        self._nursery: trio.Nursery | None = None
        self._link_changed = trio.Event()
        #: Counters: handshakes, refusals and link closures by reason.
        self.stats: Counter[str] = Counter()
        self.listen_address: tuple[str, int] | None = None

    # --- queries -----------------------------------------------------------------------------

    def get(self, peer: bytes) -> Link | None:
        """The open link to ``peer``, if any."""
        link = self._links.get(peer)
        return link if link is not None and not link.closed.is_set() else None

    def peers(self) -> list[bytes]:
        """Identity keys of the peers with an open link."""
        return [peer for peer, link in self._links.items() if not link.closed.is_set()]

    @property
    def open_links(self) -> int:
        """How many links are established."""
        return len(self._links)

    @property
    def pending_handshakes(self) -> int:
        """How many connections are still in their handshake."""
        return self._handshakes

    # --- serving -----------------------------------------------------------------------------

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen for links on ``host:port`` (port 0 picks one) until cancelled; reports the
        bound ``(host, port)`` through ``task_status.started``.

        Raises:
            OSError: if the address cannot be bound.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        self.listen_address = (sockname[0], sockname[1])
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(trio.serve_listeners, self._accept, listeners)
            task_status.started(self.listen_address)
            try:
                await trio.sleep_forever()
            finally:
                for link in list(self._links.values()):
                    link.close()

    async def _accept(self, stream: trio.SocketStream) -> None:
        try:
            host = stream.socket.getpeername()[0]
        except OSError:
            await stream.aclose()
            return
        if not self._limiter.try_take(host, trio.current_time()):
            self.stats["refused:rate-limited"] += 1
            await trio.aclose_forcefully(stream)
            return
        await self._run(stream, LinkConnection(Role.RESPONDER, self._key), waiter=None)

    # --- dialling ----------------------------------------------------------------------------

    async def connect(self, peer: bytes, addresses: Sequence[tuple[str, int]]) -> Link:
        """Return the open link to ``peer``, dialling its ``addresses`` in turn if there is none.

        Raises:
            LinkError: if no address yields a link to exactly that peer.
        """
        existing = self.get(peer)
        if existing is not None:
            return existing
        if self._nursery is None:
            raise LinkError("the link manager is not running")
        errors = []
        for host, port in addresses:
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(host, port)
            except (OSError, trio.TooSlowError) as exc:
                errors.append(f"{host}:{port}: {exc or 'timed out'}")
                continue
            send, receive = trio.open_memory_channel[Link | str](1)
            connection = LinkConnection(Role.INITIATOR, self._key, expected_peer=peer)
            self._nursery.start_soon(self._run, stream, connection, send)
            outcome = await receive.receive()
            if isinstance(outcome, Link):
                return self.get(peer) or outcome
            errors.append(f"{host}:{port}: {outcome}")
        raise LinkError("cannot reach the peer: " + ("; ".join(errors) or "no addresses"))

    # --- one connection ----------------------------------------------------------------------

    async def _run(
        self,
        stream: trio.abc.Stream,
        connection: LinkConnection,
        waiter: trio.MemorySendChannel[Link | str] | None,
    ) -> None:
        link: Link | None = None
        reason = "closed"
        try:
            link, early = await self._handshake(stream, connection)
            if waiter is not None:
                waiter.send_nowait(link)
                waiter = None
            reason = await self._serve_link(link, early)
        except LinkError as exc:
            reason = str(exc)
        finally:
            self.stats[f"closed:{reason}"] += 1
            log.debug("link closed: %s", reason)
            if waiter is not None:
                waiter.send_nowait(reason)
            if link is not None:
                self._forget(link)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _handshake(
        self, stream: trio.abc.Stream, connection: LinkConnection
    ) -> tuple[Link, list[Event]]:
        """Run the handshake to completion; returns the link and any events that arrived with
        the last handshake record (frames a peer sent right behind it)."""
        if self._handshakes >= self.max_handshakes:
            self.stats["refused:too-many-handshakes"] += 1
            raise LinkError("too many handshakes in progress")
        self._handshakes += 1
        try:
            with trio.move_on_after(self.handshake_timeout) as scope:
                while True:
                    out = connection.data_to_send()
                    if out:
                        await _send(stream, out)
                    data = await _receive(stream)
                    events = connection.receive_data(data)
                    for index, event in enumerate(events):
                        if isinstance(event, Established):
                            out = connection.data_to_send()
                            if out:
                                await _send(stream, out)
                            link = self._register(connection, stream, event.peer)
                            return link, events[index + 1 :]
                        if isinstance(event, Closed):
                            raise LinkError(event.reason)
            assert scope.cancelled_caught
            raise LinkError("handshake timed out")
        finally:
            self._handshakes -= 1

    def _register(self, connection: LinkConnection, stream: trio.abc.Stream, peer: bytes) -> Link:
        """Make a new link the peer's link, unless it loses to an existing one.

        Returns the new link either way; a losing link is already closing (see
        :meth:`_serve_link`), and :meth:`get` returns the one that was kept.
        """
        initiator = self.identity if connection.role is Role.INITIATOR else peer
        link = Link(connection, stream, peer, initiator)
        self.stats["handshake:" + connection.role.value] += 1
        existing = self.get(peer)
        if existing is not None:
            preferred = min(self.identity, peer)
            if initiator != preferred or existing.initiator == preferred:
                # Both sides keep the link dialled by the smaller identity key.
                self.stats["duplicate-link"] += 1
                link.close()
                return link
            existing.close()
        elif len(self._links) >= self.max_links:
            self.stats["refused:too-many-links"] += 1
            raise LinkError("too many links")
        self._links[peer] = link
        if self._on_link is not None:
            self._on_link(link)
        return link

    def _forget(self, link: Link) -> None:
        link.closed.set()
        if self._links.get(link.peer) is link:
            del self._links[link.peer]

    async def _serve_link(self, link: Link, early: list[Event]) -> str:
        """Read, write and keep the link alive until it ends; returns why it ended."""
        if self._links.get(link.peer) is not link:
            # Lost the duplicate race: flush the FINAL frame and go.
            with trio.move_on_after(1):
                await link._writer()
            return "duplicate link"
        outcome: list[str] = []
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                reason = await link._writer()
                outcome.append(reason or "closed")
                nursery.cancel_scope.cancel()  # nothing more can be written

            nursery.start_soon(write)
            nursery.start_soon(self._keepalive, link)
            reason = await self._reader(link, early)
            outcome.insert(0, reason or "closed by peer")
            link.closed.set()
            link.close()  # queues our FINAL frame; the writer flushes it and ends
            nursery.cancel_scope.deadline = trio.current_time() + 1
        return outcome[0]

    async def _reader(self, link: Link, early: list[Event]) -> str | None:
        """Deliver frames until the link ends; returns an error reason, or None if the peer
        closed it in order."""
        events = early
        while True:
            for event in events:
                if isinstance(event, Closed):
                    return event.reason if event.error else None
                if isinstance(event, FrameReceived):
                    error = await self._dispatch(link, event.payload)
                    if error is not None:
                        return error
            with trio.move_on_after(self.idle_timeout) as idle:
                try:
                    data = await _receive(link._stream)
                except LinkError as exc:
                    return str(exc)
            if idle.cancelled_caught:
                return "idle timeout"
            link.last_received = trio.current_time()
            events = link.connection.receive_data(data)

    async def _dispatch(self, link: Link, payload: bytes) -> str | None:
        try:
            frame = decode_frame(payload)
        except DecodeError as exc:
            return f"malformed frame: {exc.reason}"
        if frame.kind is FrameKind.PING:
            with contextlib.suppress(LinkError):
                link.send(FrameKind.PONG)
        elif frame.kind is not FrameKind.PONG:
            await self._on_frame(link, frame)
        return None

    async def _keepalive(self, link: Link) -> None:
        while not link.closed.is_set():
            idle_for = trio.current_time() - link.last_sent
            await trio.sleep(max(0.0, self.keepalive_interval - idle_for))
            if trio.current_time() - link.last_sent >= self.keepalive_interval:
                try:
                    link.send(FrameKind.PING)
                except LinkError:
                    return


async def _receive(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(_READ_SIZE))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise LinkError(f"connection lost: {exc}") from None


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise LinkError(f"connection lost: {exc}") from None
