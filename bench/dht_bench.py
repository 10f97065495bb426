"""DHT lookup benchmark: p2pnode's trio DHT against the stock ``kademlia`` package.

For each network size N, each implementation runs N nodes on loopback UDP in one process
(p2pnode under trio, the stock package under asyncio in ``bench/stock_kademlia_bench.py``).
Every node joins through up to three random earlier nodes and stores one value (p2pnode: its
signed peer record via ``publish``; stock: ``set`` of random bytes of the same size). Then
random nodes look up random other nodes' values, one at a time, and each lookup is timed.
Every run is a fresh subprocess; the implementations alternate, so both see the same machine
conditions. See ``bench/README.md``.

Usage::

    python bench/dht_bench.py                    # N = 20, 100, 1000; 200 lookups; 3 runs
    python bench/dht_bench.py --quick            # N = 20, 100; 50 lookups; 1 run
    python bench/dht_bench.py --sizes 20,100 --lookups 200 --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from p2pnode.clock import wall_clock_ms
from p2pnode.dht.node import DhtNode, UdpTransport
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import PeerRecord, SignedRecord, dht_key
from p2pnode.dht.storage import RecordStorage
from p2pnode.identity import Identity

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import benchlib

#: Packages whose versions the result file records.
PACKAGES = ("trio", "kademlia", "rpcudp", "pynacl", "u-msgpack-python")

HERE = Path(__file__).resolve().parent
STOCK_SCRIPT = HERE / "stock_kademlia_bench.py"
DEFAULT_JSON = HERE / "results-dht.json"
#: Earlier nodes each newcomer bootstraps through.
BOOTSTRAP_PEERS = 3
#: Seconds one lookup may take before it counts as failed.
LOOKUP_TIMEOUT = 30.0
#: Concurrent publishes while the nodes store their records.
PUBLISH_CONCURRENCY = 16


def raise_open_file_limit() -> None:
    """Every node holds a socket: lift the soft open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- one run of p2pnode's DHT (the worker; runs in its own process) --------------------------


async def join_network(
    nursery: trio.Nursery, identities: list[Identity], rng: random.Random
) -> list[DhtNode]:
    """Start one node per identity, each on its own UDP socket, each joining through up to
    :data:`BOOTSTRAP_PEERS` random earlier nodes. The caller closes the nodes' sockets."""
    members: list[DhtNode] = []
    for index, identity in enumerate(identities):
        transport = await UdpTransport.bind("127.0.0.1", 0)
        protocol = DhtProtocol(
            dht_key(identity.public_key), RecordStorage(), wall_clock_ms=wall_clock_ms
        )
        node = DhtNode(protocol, transport, wall_clock_ms=wall_clock_ms, rng=rng)
        members.append(node)
        await nursery.start(node.serve)
        if index:
            peers = rng.sample(members[:index], min(BOOTSTRAP_PEERS, index))
            with trio.move_on_after(LOOKUP_TIMEOUT):
                await node.bootstrap([peer.address for peer in peers])
    return members


async def publish_all(members: list[DhtNode], records: list[SignedRecord]) -> list[int]:
    """Publish every node's record, :data:`PUBLISH_CONCURRENCY` at a time; returns how many
    remote nodes accepted each."""
    accepted = [0] * len(members)
    limiter = trio.CapacityLimiter(PUBLISH_CONCURRENCY)

    async def publish(index: int) -> None:
        async with limiter:
            with trio.move_on_after(LOOKUP_TIMEOUT):
                accepted[index] = await members[index].publish(records[index])

    async with trio.open_nursery() as publishers:
        for index in range(len(members)):
            publishers.start_soon(publish, index)
    return accepted


async def time_lookups(
    members: list[DhtNode], records: list[SignedRecord], lookups: int, rng: random.Random
) -> tuple[list[float | None], list[bool]]:
    """Time ``lookups`` lookups, one at a time, of a random node's record from a random other
    node; returns the latencies and whether each returned exactly the published record."""
    latencies: list[float | None] = []
    successes: list[bool] = []
    for _ in range(lookups):
        seeker, owner = rng.sample(range(len(members)), 2)
        expected = records[owner]
        began = time.perf_counter()
        try:
            found = await members[seeker].find_record(
                expected.record.identity_key, timeout=LOOKUP_TIMEOUT
            )
        except (LookupError, TimeoutError):
            found = None
        latencies.append(time.perf_counter() - began)
        successes.append(found is not None and found.data == expected.data)
    return latencies, successes


async def run_ours(nodes: int, lookups: int, seed: int) -> dict[str, Any]:
    """One run of p2pnode's side: join, publish, timed lookups."""
    rng = random.Random(seed)
    identities = [Identity.generate(wall_clock_ms()) for _ in range(nodes)]
    members: list[DhtNode] = []
    try:
        async with trio.open_nursery() as nursery:
            started = time.perf_counter()
            members = await join_network(nursery, identities, rng)
            joined = time.perf_counter()
            records = [
                PeerRecord.create(identity, [node.address], seq=1, now_ms=wall_clock_ms())
                for identity, node in zip(identities, members, strict=True)
            ]
            accepted = await publish_all(members, records)
            published = time.perf_counter()
            latencies, successes = await time_lookups(members, records, lookups, rng)
            nursery.cancel_scope.cancel()
    finally:
        for node in members:
            node.transport.close()  # type: ignore[attr-defined]  # a UdpTransport here
    counters: dict[str, int] = {}
    for node in members:
        for name, count in node.protocol.stats.items():
            if name.startswith(("drop:", "store:", "timeout", "retransmit", "request:")):
                counters[name] = counters.get(name, 0) + count
    return {
        "implementation": "ours",
        "nodes": nodes,
        "lookups": lookups,
        "latencies": latencies,
        "successes": successes,
        "stores_reported_ok": sum(1 for count in accepted if count),
        "join_seconds": joined - started,
        "publish_seconds": published - joined,
        "record_bytes": round(statistics.mean(len(r.data) for r in records)),
        "protocol_stats": counters,
    }


def worker_main(options: argparse.Namespace) -> None:
    raise_open_file_limit()
    result = trio.run(run_ours, options.nodes, options.lookups, options.seed)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


# --- the driver ----------------------------------------------------------------------------


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """p50/p95 over every lookup (a lookup that timed out counts at the timeout) and the
    success rate."""
    latencies = [LOOKUP_TIMEOUT if x is None else x for x in run["latencies"]]
    return {
        "p50_ms": 1000 * benchlib.percentile(latencies, 0.50),
        "p95_ms": 1000 * benchlib.percentile(latencies, 0.95),
        "success": sum(run["successes"]) / len(run["successes"]),
        "join_s": run["join_seconds"],
        "publish_s": run["publish_seconds"],
        "stores_ok": run["stores_reported_ok"] / run["nodes"],
    }


def run_worker(command: list[str], timeout: float) -> dict[str, Any] | None:
    """Run one benchmark subprocess; None (reported) if it failed or ran out of time."""
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        print(f"  ! timed out after {timeout:.0f} s: {' '.join(command[1:])}", file=sys.stderr)
        return None
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-5:]
        print(f"  ! failed ({completed.returncode}): {' '.join(command[1:])}", file=sys.stderr)
        for line in tail:
            print(f"    {line}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def raw_entry(run: dict[str, Any]) -> dict[str, Any]:
    """A run as kept in the JSON file: latencies in ms (None: timed out), success count."""
    entry = {k: v for k, v in run.items() if k not in ("latencies", "successes")}
    entry["latencies_ms"] = [None if x is None else round(1000 * x, 3) for x in run["latencies"]]
    entry["successful_lookups"] = sum(run["successes"])
    return entry


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summaries = [summarise(run) for run in runs]
    return {
        name: statistics.median(summary[name] for summary in summaries) for name in summaries[0]
    } | {"runs": len(runs)}


def print_table(results: dict[str, dict[str, dict[str, Any]]], sizes: list[int]) -> None:
    header = (
        f"{'N':>5}  {'impl':<6} {'p50 ms':>8} {'p95 ms':>8} {'success':>8} "
        f"{'join s':>7} {'store s':>8} {'runs':>4}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        for implementation in ("ours", "stock"):
            row = results.get(implementation, {}).get(str(size))
            if row is None:
                print(f"{size:>5}  {implementation:<6} {'(no completed run)':>30}")
                continue
            print(
                f"{size:>5}  {implementation:<6} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} "
                f"{100 * row['success']:>7.1f}% {row['join_s']:>7.1f} {row['publish_s']:>8.1f} "
                f"{row['runs']:>4}"
            )
        ours = results.get("ours", {}).get(str(size))
        stock = results.get("stock", {}).get(str(size))
        if ours and stock:
            print(f"{'':>5}  p50 ours/stock = {ours['p50_ms'] / stock['p50_ms']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 20,100,1000)")
    parser.add_argument("--lookups", type=int, default=None, help="lookups per run (200)")
    parser.add_argument("--runs", type=int, default=None, help="runs per N and side (3)")
    parser.add_argument("--quick", action="store_true", help="N = 20,100; 50 lookups; 1 run")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--only", choices=("ours", "stock"), help="measure one side only")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--seed", type=int, default=1)
    # Worker mode (internal): one run of p2pnode's side, JSON on stdout.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        worker_main(options)
        return

    sizes = [
        int(s) for s in (options.sizes or ("20,100" if options.quick else "20,100,1000")).split(",")
    ]
    lookups = options.lookups or (50 if options.quick else 200)
    runs = options.runs or (1 if options.quick else 3)
    sides = [options.only] if options.only else ["ours", "stock"]

    now = int(time.time() * 1000)
    value_size = len(PeerRecord.create(Identity.generate(now), [("127.0.0.1", 40000)], 1, now).data)

    raw: list[dict[str, Any]] = []
    print(f"DHT lookup benchmark: sizes {sizes}, {lookups} lookups, {runs} run(s) per side")
    for size in sizes:
        for run_index in range(runs):
            seed = options.seed + run_index
            for side in sides:
                common = ["--nodes", str(size), "--lookups", str(lookups), "--seed", str(seed)]
                if side == "ours":
                    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *common]
                else:
                    command = [
                        sys.executable,
                        str(STOCK_SCRIPT),
                        *common,
                        "--value-size",
                        str(value_size),
                    ]
                began = time.perf_counter()
                result = run_worker(command, options.timeout)
                if result is None:
                    continue
                result["seed"] = seed
                result["wall_seconds"] = time.perf_counter() - began
                raw.append(result)
                summary = summarise(result)
                print(
                    f"  N={size:<5} {side:<5} run {run_index + 1}/{runs}: "
                    f"p50 {summary['p50_ms']:.2f} ms, p95 {summary['p95_ms']:.2f} ms, "
                    f"success {100 * summary['success']:.1f} %, "
                    f"wall {result['wall_seconds']:.0f} s",
                    flush=True,
                )

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for side in sides:
        for size in sizes:
            runs_here = [r for r in raw if r["implementation"] == side and r["nodes"] == size]
            if runs_here:
                results.setdefault(side, {})[str(size)] = median_of(runs_here)
    print()
    print_table(results, sizes)

    report = {
        "benchmark": "dht-lookup",
        "date": time.strftime("%Y-%m-%d"),
        "machine": benchlib.machine(PACKAGES),
        "config": {
            "sizes": sizes,
            "lookups": lookups,
            "runs": runs,
            "bootstrap_peers": BOOTSTRAP_PEERS,
            "lookup_timeout_s": LOOKUP_TIMEOUT,
            "stock_value_bytes": value_size,
        },
        "results": results,
        "raw": [raw_entry(run) for run in raw],
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {options.json}")


if __name__ == "__main__":
    main()
