"""One run of the DHT lookup benchmark on the stock ``kademlia`` package (asyncio).

Run by ``bench/dht_bench.py`` as a subprocess (the stock package needs its own asyncio event
loop; p2pnode's side runs under trio). Usage::

    python bench/stock_kademlia_bench.py --nodes 100 --lookups 200 --seed 1 --value-size 283

Starts ``--nodes`` unmodified ``kademlia.network.Server`` instances on 127.0.0.1 in this one
process, each joining through up to three random earlier nodes; each stores one value of
``--value-size`` random bytes under its own key with ``set``; then ``--lookups`` times a random
node fetches a random other node's value over the network and the latency is timed. The fetch
is exactly what ``Server.get`` does for a key it does not hold itself (the package's
``ValueSpiderCrawl``), so every lookup crosses the network, as p2pnode's ``find_record`` does.

Prints one JSON object on stdout: per-lookup latencies (seconds, ``null`` for no answer in
time) and successes, plus setup timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import sys
import time
from typing import Any

from kademlia.crawling import ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.utils import digest

#: Earlier nodes each newcomer bootstraps through.
BOOTSTRAP_PEERS = 3
#: Seconds one set or one lookup may take before it counts as failed (rpcudp's own request
#: timeout is 5 s; a crawl makes several rounds).
OPERATION_TIMEOUT = 30.0
#: Concurrent ``set`` calls while the nodes store their values.
STORE_CONCURRENCY = 16


def raise_open_file_limit() -> None:
    """Every node holds a socket: lift the soft open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def lookup(server: Server, key: str) -> Any:
    """``Server.get(key)`` minus its local-storage shortcut: always a network lookup."""
    target = Node(digest(key))
    nearest = server.protocol.router.find_neighbors(target)
    if not nearest:
        return None
    spider = ValueSpiderCrawl(server.protocol, target, nearest, server.ksize, server.alpha)
    return await spider.find()


async def run(nodes: int, lookups: int, seed: int, value_size: int) -> dict[str, Any]:
    rng = random.Random(seed)
    servers: list[Server] = []
    try:
        started = time.perf_counter()
        for index in range(nodes):
            server = Server()
            await server.listen(0, interface="127.0.0.1")
            servers.append(server)
            if index:
                peers = rng.sample(servers[:index], min(BOOTSTRAP_PEERS, index))
                addresses = [
                    ("127.0.0.1", peer.transport.get_extra_info("sockname")[1]) for peer in peers
                ]
                await asyncio.wait_for(server.bootstrap(addresses), OPERATION_TIMEOUT)
        joined = time.perf_counter()

        values = [rng.randbytes(value_size) for _ in range(nodes)]
        stored = [False] * nodes
        limiter = asyncio.Semaphore(STORE_CONCURRENCY)

        async def store(index: int) -> None:
            async with limiter:
                try:
                    stored[index] = bool(
                        await asyncio.wait_for(
                            servers[index].set(f"node-{index}", values[index]),
                            OPERATION_TIMEOUT,
                        )
                    )
                except (TimeoutError, ValueError):  # set_digest raises ValueError (GUIDE s. 5)
                    stored[index] = False

        await asyncio.gather(*(store(index) for index in range(nodes)))
        published = time.perf_counter()

        latencies: list[float | None] = []
        successes: list[bool] = []
        for _ in range(lookups):
            seeker, owner = rng.sample(range(nodes), 2)
            began = time.perf_counter()
            try:
                found = await asyncio.wait_for(
                    lookup(servers[seeker], f"node-{owner}"), OPERATION_TIMEOUT
                )
            except TimeoutError:
                latencies.append(None)
                successes.append(False)
                continue
            except Exception:  # noqa: BLE001 (one malformed reply makes get() raise: a miss)
                found = None
            latencies.append(time.perf_counter() - began)
            successes.append(found == values[owner])
        return {
            "implementation": "stock",
            "nodes": nodes,
            "lookups": lookups,
            "latencies": latencies,
            "successes": successes,
            "stores_reported_ok": sum(stored),
            "join_seconds": joined - started,
            "publish_seconds": published - joined,
        }
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--value-size", type=int, default=300)
    options = parser.parse_args()
    logging.disable(logging.CRITICAL)  # the package logs every RPC at info/debug
    raise_open_file_limit()
    result = asyncio.run(run(options.nodes, options.lookups, options.seed, options.value_size))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
