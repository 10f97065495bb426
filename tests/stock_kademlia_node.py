"""A stock ``kademlia`` node (asyncio) for interoperability tests, run as a subprocess.

Usage: ``python stock_kademlia_node.py [--host 127.0.0.1]``

It starts an unmodified ``kademlia.network.Server`` on a free UDP port of ``--host`` (picked
by the kernel) and prints ``READY <port> <node-id-hex>`` on stdout. Then it answers commands,
one per line on stdin, with one line on stdout:

- ``HAS <key-hex>``: ``STORED <value-hex>`` if this node's own storage holds the raw 20-byte
  DHT key, else ``MISSING``.
- ``GET <key-hex>``: runs the package's own value crawler for the raw key (no local shortcut,
  so the value must come from peers): ``VALUE <value-hex>`` or ``NONE``.

It exits when stdin closes (or on SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from kademlia.crawling import ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node


async def _listen(server: Server, host: str) -> int:
    """Listen on a free port chosen by the kernel (``listen`` passes port 0 through to
    ``create_datagram_endpoint``) and return it."""
    await server.listen(0, interface=host)
    port: int = server.transport.get_extra_info("sockname")[1]
    return port


async def _answer(server: Server, line: str) -> str:
    command, _, argument = line.strip().partition(" ")
    try:
        key = bytes.fromhex(argument)
    except ValueError:
        return "ERROR bad key"
    if command == "HAS":
        value = server.storage.get(key)
        return "MISSING" if value is None else f"STORED {bytes(value).hex()}"
    if command == "GET":
        target = Node(key)
        nearest = server.protocol.router.find_neighbors(target)
        spider = ValueSpiderCrawl(server.protocol, target, nearest, server.ksize, server.alpha)
        found = await spider.find()
        return "NONE" if found is None else f"VALUE {bytes(found).hex()}"
    return f"ERROR unknown command {command!r}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    options = parser.parse_args()

    server = Server()
    port = await _listen(server, options.host)
    print(f"READY {port} {server.node.id.hex()}", flush=True)
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return  # stdin closed: the test is done with us
            print(await _answer(server, line), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
