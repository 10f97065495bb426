"""The DHT as a service: bind, join, publish our record, persist known peers.

:class:`DhtService` is what the daemon (and a bootstrap node) runs::

    service = DhtService(config, identity=identity)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)       # returns once bound and joined
        record = await service.find_record(peer_identity_key, timeout=5)

Resource handling: :meth:`DhtService.run` owns the UDP socket and every task it starts; they
end when it is cancelled, after the known peers are saved.

Error handling: a seed that does not answer or does not resolve is logged and skipped; a node
that reaches no seed runs as the first node of a new network and says so in the log. Publishing
failures are retried with exponential backoff.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from p2pnode.clock import wall_clock_ms
from p2pnode.dht.node import (
    DEFAULT_LOOKUP_TIMEOUT,
    DhtNode,
    RecordNotFound,
    UdpTransport,
)
from p2pnode.dht.peerbook import load_peers, save_peers
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import REPUBLISH_AFTER_MS, PeerRecord, SignedRecord, dht_key
from p2pnode.dht.storage import RecordStorage
from p2pnode.dht.wire import Address
from p2pnode.identity import Identity

log = logging.getLogger(__name__)

#: Seconds between saves of the known-peers file (it is saved at shutdown too).
PEERS_SAVE_INTERVAL: Final = 300.0
#: First and longest pause before retrying a publish that no node accepted.
PUBLISH_RETRY_MIN: Final = 5.0
PUBLISH_RETRY_MAX: Final = 600.0
#: Seconds to wait for a seed host name to resolve.
RESOLVE_TIMEOUT: Final = 5.0


@dataclass
class DhtConfig:
    """How to run the DHT.

    Attributes:
        listen: UDP address to bind (port 0 picks one).
        seeds: ``(host, port)`` of DHT peers to join through; host names are resolved.
        peers_file: where known peers are persisted (None: not persisted).
        advertised: link addresses to publish in our record (empty: publish nothing; a
            DHT-only node has no record).
        lookup_timeout: default deadline of :meth:`DhtService.find_record`.
    """

    listen: Address = ("127.0.0.1", 0)
    seeds: Sequence[tuple[str, int]] = ()
    peers_file: Path | None = None
    advertised: Sequence[Address] = ()
    lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT
    exempt_loopback: bool = True


class RecordPublisher:
    """Keeps our signed peer record in the DHT: publishes at start, again every
    :data:`REPUBLISH_AFTER_MS` (half the record's lifetime, so it never lapses), and at once
    when the advertised addresses change (:meth:`set_addresses`).

    Sequence numbers are wall-clock milliseconds, kept strictly increasing, so a restarted node
    supersedes its old record without remembering anything.
    """

    def __init__(self, node: DhtNode, identity: Identity, addresses: Sequence[Address]) -> None:
        self._node = node
        self._identity = identity
        self._addresses = tuple(addresses)
        self._changed = trio.Event()
        self._last_seq = 0
        #: The record last published, and how many remote nodes accepted it.
        self.published: SignedRecord | None = None
        self.accepted = 0

    def set_addresses(self, addresses: Sequence[Address]) -> None:
        """Advertise ``addresses`` from now on; republishes at once if they changed."""
        if tuple(addresses) != self._addresses:
            self._addresses = tuple(addresses)
            self._changed.set()

    def set_identity(self, identity: Identity) -> None:
        """Publish records of ``identity`` (the same identity key with a new encryption key)
        from now on; republishes at once.

        Raises:
            ValueError: if ``identity`` has another identity key.
        """
        if identity.public_key != self._identity.public_key:
            raise ValueError("a record publisher publishes for one identity key only")
        self._identity = identity
        self._changed.set()

    def _next_record(self) -> SignedRecord:
        now = self._node.now_ms()
        self._last_seq = max(now, self._last_seq + 1)
        return PeerRecord.create(self._identity, self._addresses, seq=self._last_seq, now_ms=now)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Publish until cancelled; ``task_status.started()`` after the first attempt."""
        retry = PUBLISH_RETRY_MIN
        started = False
        while True:
            self._changed = trio.Event()
            signed = self._next_record()
            self.accepted = await self._node.publish(signed)
            self.published = signed
            if self.accepted:
                log.info(
                    "published our record (seq %d) on %d nodes", signed.record.seq, self.accepted
                )
                pause = REPUBLISH_AFTER_MS / 1000
                retry = PUBLISH_RETRY_MIN
            else:
                log.warning("no DHT node accepted our record; retrying in %.0f s", retry)
                pause, retry = retry, min(retry * 2, PUBLISH_RETRY_MAX)
            if not started:
                task_status.started()
                started = True
            with trio.move_on_after(pause):
                async with trio.open_nursery() as waiters:

                    async def wake_on(wait: Callable[[], Awaitable[None]]) -> None:
                        await wait()
                        waiters.cancel_scope.cancel()

                    waiters.start_soon(wake_on, self._changed.wait)
                    if not self.accepted:
                        # Nobody took it: try again as soon as the table gains a contact.
                        waiters.start_soon(wake_on, self._node.wait_contact_added)


class DhtService:
    """A DHT node with its socket, joining, publishing and peer persistence.

    Args:
        config: see :class:`DhtConfig`.
        identity: the node's identity; its DHT ID is derived from it and its record is
            published. ``None`` runs a DHT-only node with a random ID (a bootstrap node).
    """

    def __init__(self, config: DhtConfig, *, identity: Identity | None = None) -> None:
        self.config = config
        self.identity = identity
        self.node: DhtNode | None = None
        self.publisher: RecordPublisher | None = None
        self._nursery: trio.Nursery | None = None
        #: How many seeds or saved peers answered when joining.
        self.joined_through = 0

    def _require_node(self) -> DhtNode:
        if self.node is None:
            raise RuntimeError("the DHT service is not running")
        return self.node

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, join, start publishing; then report readiness (``task_status.started(self)``)
        and serve until cancelled. Known peers are saved at shutdown.

        Raises:
            OSError: if the listen address cannot be bound.
        """
        node_id = dht_key(self.identity.public_key) if self.identity else os.urandom(20)
        storage = RecordStorage(clock=wall_clock_ms)
        protocol = DhtProtocol(
            node_id,
            storage,
            wall_clock_ms=wall_clock_ms,
            exempt_loopback=self.config.exempt_loopback,
        )
        async with await UdpTransport.bind(*self.config.listen) as transport:
            node = DhtNode(
                protocol, transport, wall_clock_ms=wall_clock_ms, rng=random.SystemRandom()
            )
            self.node = node
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(node.serve)
                    await self._join(node)
                    if self.identity is not None and self.config.advertised:
                        self.publisher = RecordPublisher(
                            node, self.identity, self.config.advertised
                        )
                        await nursery.start(self.publisher.run)
                    if self.config.peers_file is not None:
                        nursery.start_soon(self._save_peers_regularly, node)
                    task_status.started(self)
            finally:
                self._save_peers(node)
                self.node = None

    def set_identity(self, identity: Identity) -> None:
        """Use ``identity`` (the same identity key, a rotated encryption key) from now on; a
        running publisher republishes our record with it at once.

        Raises:
            ValueError: if ``identity`` has another identity key.
        """
        if self.identity is not None and identity.public_key != self.identity.public_key:
            raise ValueError("the DHT service publishes for one identity key only")
        self.identity = identity
        if self.publisher is not None:
            self.publisher.set_identity(identity)

    async def advertise(self, addresses: Sequence[Address]) -> None:
        """Publish (or republish) our record with these link addresses.

        Starts the publisher if it is not running yet; returns after its first attempt.

        Raises:
            RuntimeError: if the service is not running or has no identity.
        """
        if self.identity is None:
            raise RuntimeError("a DHT-only node has no record to publish")
        if self.publisher is not None:
            self.publisher.set_addresses(addresses)
            return
        node = self._require_node()
        assert self._nursery is not None
        self.publisher = RecordPublisher(node, self.identity, addresses)
        await self._nursery.start(self.publisher.run)

    async def _join(self, node: DhtNode) -> None:
        saved = load_peers(self.config.peers_file) if self.config.peers_file else []
        addresses = [c.address for c in saved]
        for host, port in self.config.seeds:
            addresses.extend(await _resolve(host, port))
        addresses = [a for a in dict.fromkeys(addresses) if a != node.address]
        if not addresses:
            log.info("no seeds or known peers: running as the first node of a new DHT")
            return
        self.joined_through = await node.bootstrap(addresses)
        if self.joined_through:
            log.info(
                "joined the DHT through %d of %d peers; %d contacts",
                self.joined_through,
                len(addresses),
                len(node.protocol.table),
            )
        else:
            log.warning(
                "none of %d seeds or known peers answered: running as the first node of a "
                "new DHT until one does",
                len(addresses),
            )

    async def _save_peers_regularly(self, node: DhtNode) -> None:
        while True:
            await trio.sleep(PEERS_SAVE_INTERVAL)
            self._save_peers(node)

    def _save_peers(self, node: DhtNode) -> None:
        if self.config.peers_file is None or not len(node.protocol.table):
            return
        try:
            save_peers(
                self.config.peers_file, node.protocol.table.find_neighbors(node.node_id, 200)
            )
        except OSError as exc:
            log.warning("cannot save known peers to %s: %s", self.config.peers_file, exc)

    async def find_record(
        self, identity_key: bytes, *, timeout: float | None = None
    ) -> SignedRecord:
        """Find a peer's record by its identity key (see :meth:`DhtNode.find_record`).

        Raises:
            RecordNotFound, LookupTimeout: as :meth:`DhtNode.find_record`.
        """
        if self.node is None:
            raise RecordNotFound("the DHT is not running")
        return await self.node.find_record(
            identity_key, timeout=self.config.lookup_timeout if timeout is None else timeout
        )


async def _resolve(host: str, port: int) -> list[Address]:
    """Resolve a seed's host name to addresses (an IP literal resolves to itself)."""
    with trio.move_on_after(RESOLVE_TIMEOUT):
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("cannot resolve seed %s: %s", host, exc)
            return []
        return [
            (str(info[4][0]), int(info[4][1]))
            for info in infos
            if info[0] in (socket.AF_INET, socket.AF_INET6)
        ]
    log.warning("resolving seed %s timed out after %.0f s", host, RESOLVE_TIMEOUT)
    return []
