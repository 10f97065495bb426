"""Interoperability with the stock ``kademlia`` package over real UDP on loopback.

A stock ``kademlia.network.Server`` (asyncio, unmodified, in a subprocess) is the only
bootstrap node; two p2pnode nodes join through it, publish their signed records and find each
other's. This proves that we speak the package's wire protocol in both directions: the stock
node answers our pings, finds and stores, serves our records back, and its own value crawler
reads records from our nodes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from p2pnode.clock import wall_clock_ms
from p2pnode.dht.node import DhtNode, UdpTransport
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import PeerRecord, SignedRecord, dht_key
from p2pnode.dht.storage import RecordStorage
from p2pnode.dht.wire import Address
from p2pnode.identity import Identity

HELPER = Path(__file__).with_name("stock_kademlia_node.py")
#: Seconds the stock node may take to start (interpreter start and imports included).
STARTUP_DEADLINE = 20.0
#: Seconds any one exchange with the stock node, or one DHT operation, may take.
STEP_DEADLINE = 20.0
#: Seconds to wait for the helper to exit after each way of asking it to.
EXIT_DEADLINE = 5.0


class StockNode:
    """The helper subprocess: a line-based conversation over its stdin and stdout."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""
        self.address: Address = ("127.0.0.1", 0)
        self.node_id = b""

    async def read_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some(4096)
            if not chunk:
                raise EOFError(f"stock node exited (status {self.process.returncode})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")
        with trio.fail_after(STEP_DEADLINE):
            return await self.read_line()

    async def stored_value(self, key: bytes) -> bytes | None:
        """What the stock node holds under ``key`` in its own storage."""
        answer = await self.ask(f"HAS {key.hex()}")
        if answer == "MISSING":
            return None
        word, _, value = answer.partition(" ")
        assert word == "STORED", answer
        return bytes.fromhex(value)

    async def crawl_value(self, key: bytes) -> bytes | None:
        """What the stock node's own value crawler finds for ``key`` among its peers."""
        answer = await self.ask(f"GET {key.hex()}")
        if answer == "NONE":
            return None
        word, _, value = answer.partition(" ")
        assert word == "VALUE", answer
        return bytes.fromhex(value)


@asynccontextmanager
async def stock_node() -> AsyncIterator[StockNode]:
    """Start the stock node and wait for it to be ready; always stop it afterwards (close its
    stdin, then terminate, then kill, each with a deadline)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, str(HELPER), "--host", "127.0.0.1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    node = StockNode(process)
    try:
        with trio.fail_after(STARTUP_DEADLINE):
            word, port, node_id = (await node.read_line()).split()
        assert word == "READY"
        node.address = ("127.0.0.1", int(port))
        node.node_id = bytes.fromhex(node_id)
        yield node
    finally:
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            with trio.move_on_after(EXIT_DEADLINE):
                await process.wait()
            if process.returncode is None:
                process.terminate()
                with trio.move_on_after(EXIT_DEADLINE):
                    await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def start_node(nursery: trio.Nursery, transport: UdpTransport) -> tuple[Identity, DhtNode]:
    identity = Identity.generate(wall_clock_ms())
    protocol = DhtProtocol(
        dht_key(identity.public_key), RecordStorage(), wall_clock_ms=wall_clock_ms
    )
    node = DhtNode(protocol, transport, wall_clock_ms=wall_clock_ms)
    await nursery.start(node.serve)
    return identity, node


def own_record(identity: Identity, node: DhtNode) -> SignedRecord:
    return PeerRecord.create(identity, [node.address], seq=1, now_ms=wall_clock_ms())


async def test_two_nodes_find_each_other_through_a_stock_kademlia_bootstrap() -> None:
    async with (
        stock_node() as stock,
        await UdpTransport.bind("127.0.0.1", 0) as alice_socket,
        await UdpTransport.bind("127.0.0.1", 0) as bob_socket,
        trio.open_nursery() as nursery,
    ):
        alice_identity, alice = await start_node(nursery, alice_socket)
        bob_identity, bob = await start_node(nursery, bob_socket)
        try:
            with trio.fail_after(STEP_DEADLINE):
                # The stock node is the only address either of them knows.
                assert await alice.bootstrap([stock.address]) == 1
                assert await bob.bootstrap([stock.address]) == 1
                assert stock.node_id in alice.protocol.table
                assert stock.node_id in bob.protocol.table

                alice_record = own_record(alice_identity, alice)
                bob_record = own_record(bob_identity, bob)
                assert await alice.publish(alice_record) >= 1
                assert await bob.publish(bob_record) >= 1

            # The stock node accepted and holds both records, byte for byte.
            alice_key = dht_key(alice_identity.public_key)
            bob_key = dht_key(bob_identity.public_key)
            assert await stock.stored_value(alice_key) == alice_record.data
            assert await stock.stored_value(bob_key) == bob_record.data

            with trio.fail_after(STEP_DEADLINE):
                found_by_alice = await alice.find_record(bob_identity.public_key)
                found_by_bob = await bob.find_record(alice_identity.public_key)
            assert found_by_alice.data == bob_record.data
            assert found_by_alice.record.identity_key == bob_identity.public_key
            assert found_by_alice.record.addresses == (bob.address,)
            assert found_by_bob.data == alice_record.data
            assert found_by_bob.record.identity_key == alice_identity.public_key

            # The stock node itself serves the record to our lookups (not only our own peers).
            with trio.fail_after(STEP_DEADLINE):
                _, answers = await alice.run_lookup(bob_key, want_value=True)
            servers = {contact.address for contact, _ in answers}
            assert stock.address in servers
            assert all(record.data == bob_record.data for _, record in answers)

            # And the stock package's own crawler reads our records from our nodes.
            assert await stock.crawl_value(alice_key) == alice_record.data
            assert await stock.crawl_value(bob_key) == bob_record.data
        finally:
            nursery.cancel_scope.cancel()
