"""One run of the DHT lookup benchmark on OpenDHT (the ``opendht`` wheel's Python binding).

Run by ``bench/peers/opendht_bench.py`` with the Python of OpenDHT's own virtualenv
(``bench/.venvs/opendht``); it never imports p2pnode. Usage::

    python bench/peers/opendht_worker.py --nodes 100 --lookups 200 --seed 1 --value-size 283

The workload is the one of ``bench/dht_bench.py`` and ``bench/stock_kademlia_bench.py``:

1. **Join.** ``--nodes`` ``DhtRunner`` instances start one after another in this one process,
   each bound to its own UDP socket on 127.0.0.1; each pings up to three random earlier nodes
   (``DhtRunner.ping``, OpenDHT's bootstrap by address) and the join waits until they answered.
2. **Store.** Every node ``put``s one value of ``--value-size`` random bytes under its own key
   (``InfoHash.get("node-<i>")``), 16 puts in flight at a time; a put is done when OpenDHT
   reports it announced.
3. **Lookups.** ``--lookups`` times, one at a time, a node ``get``s a random other node's value
   and the latency is timed with ``perf_counter``; success means the exact bytes came back.

OpenDHT's ``get`` first answers from the seeker's own storage and only then searches the
network. So that every lookup crosses the network, the seeker is a node that does not hold the
key (checked in its ``getStorageLog()`` just before the lookup) and, where possible, has not
looked the key up before in this run. With ``--until first`` (the default, like the stock
``kademlia`` crawler, which stops at the first value) the get callback returns ``False`` once
the expected value arrived, which ends the get (OpenDHT's documented way to stop a get); with
``--until done`` the latency runs until OpenDHT's done callback (the search reached the nodes
closest to the key).

Every node runs with OpenDHT's rate limits off (``DhtConfig.setRateLimit(-1, -1)``): all nodes
share the address 127.0.0.1, and the per-IP limiter would otherwise treat the whole network as
one peer (OpenDHT's own localhost tests and tools do the same).

Prints one JSON object on stdout: per-lookup latencies (seconds, ``null`` for no answer within
:data:`OPERATION_TIMEOUT`) and successes, setup timings and counters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sys
import threading
import time
from typing import Any

import opendht

#: Earlier nodes each newcomer bootstraps through (as in ``bench/dht_bench.py``).
BOOTSTRAP_PEERS = 3
#: Seconds one join, put or lookup may take before it counts as failed (as the other sides).
OPERATION_TIMEOUT = 30.0
#: Puts in flight while the nodes store their values (as the other sides).
STORE_CONCURRENCY = 16
#: Seconds the worker waits for all nodes to report their shutdown before it exits anyway.
SHUTDOWN_TIMEOUT = 30.0
#: Seconds to wait, outside the timed part, for a finished get's done callback.
DONE_GRACE = 5.0
#: One line per key in ``DhtRunner.getStorageLog()``: ``Storage <40 hex digits> ...``.
STORAGE_LINE = re.compile(r"^Storage ([0-9a-f]{40})\b", re.MULTILINE)
#: Order of the counters ``DhtRunner.getNodeMessageStats()`` returns (OpenDHT's message types).
MESSAGE_KINDS = ("ping", "find", "get", "listen", "put")


def raise_open_file_limit() -> None:
    """Every node holds a socket: lift the soft open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def thread_count() -> int:
    """Threads of this process (Linux ``/proc``); 0 where that is not available."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def node_config(rate_limit: bool) -> opendht.DhtConfig:
    """A fresh node configuration: threaded (the binding's default), rate limits off unless
    ``rate_limit``."""
    config = opendht.DhtConfig()
    if not rate_limit:
        config.setRateLimit(-1, -1)
    return config


def start_node(rate_limit: bool) -> opendht.DhtRunner:
    """Start one node on its own UDP socket on 127.0.0.1 (port chosen by the kernel)."""
    runner = opendht.DhtRunner()
    runner.run(port=0, ipv4="127.0.0.1", config=node_config(rate_limit))
    return runner


def join(runner: opendht.DhtRunner, peers: list[opendht.DhtRunner]) -> int:
    """Ping ``peers`` from ``runner`` (OpenDHT adds every node that answers to its routing table)
    and wait, at most :data:`OPERATION_TIMEOUT` seconds, for the answers; returns how many
    answered."""
    answered: list[bool] = []
    condition = threading.Condition()

    def on_pong(ok: bool) -> None:
        with condition:
            answered.append(bool(ok))
            condition.notify_all()

    for peer in peers:
        runner.ping(peer.getBound(), on_pong)
    with condition:
        condition.wait_for(lambda: len(answered) == len(peers), timeout=OPERATION_TIMEOUT)
        return sum(answered)


def store_all(
    runners: list[opendht.DhtRunner], keys: list[opendht.InfoHash], values: list[bytes]
) -> tuple[list[bool], int]:
    """Put every node's value under its key, :data:`STORE_CONCURRENCY` puts in flight; returns
    which puts OpenDHT reported done with success, and how many puts never reported within
    :data:`OPERATION_TIMEOUT` seconds of the last one started."""
    stored = [False] * len(runners)
    reported = [False] * len(runners)
    slots = threading.BoundedSemaphore(STORE_CONCURRENCY)
    condition = threading.Condition()

    def on_done_for(index: int) -> Any:
        def on_done(ok: bool, _nodes: Any) -> None:
            with condition:
                if reported[index]:
                    return
                reported[index] = True
                stored[index] = bool(ok)
                condition.notify_all()
            slots.release()

        return on_done

    for index, runner in enumerate(runners):
        # A put that never reports keeps its slot; after the timeout the next one starts anyway.
        slots.acquire(timeout=OPERATION_TIMEOUT)
        runner.put(keys[index], opendht.Value(values[index]), on_done_for(index))
    with condition:
        condition.wait_for(lambda: all(reported), timeout=OPERATION_TIMEOUT)
        return list(stored), reported.count(False)


def holds_key(runner: opendht.DhtRunner, key_hex: str) -> bool:
    """Whether ``runner`` has the key in its own storage (so ``get`` would answer locally)."""
    return key_hex in STORAGE_LINE.findall(runner.getStorageLog())


def choose_seeker(
    runners: list[opendht.DhtRunner],
    owner: int,
    key_hex: str,
    searched: set[tuple[int, int]],
    rng: random.Random,
) -> tuple[int, str]:
    """A random node other than ``owner`` that does not store ``owner``'s key and, if one exists,
    has not looked it up before; returns its index and ``"fresh"``, ``"repeat"`` (every
    non-holder already looked the key up) or ``"holder"`` (every other node stores the key:
    that lookup is answered locally and is counted apart)."""
    others = [index for index in range(len(runners)) if index != owner]
    rng.shuffle(others)
    repeat: int | None = None
    for index in others:
        if holds_key(runners[index], key_hex):
            continue
        if (index, owner) not in searched:
            return index, "fresh"
        if repeat is None:
            repeat = index
    if repeat is not None:
        return repeat, "repeat"
    return others[0], "holder"


def timed_get(
    runner: opendht.DhtRunner, key: opendht.InfoHash, expected: bytes, until: str
) -> tuple[float | None, bool]:
    """One get, timed; returns the latency in seconds (``None``: no outcome within
    :data:`OPERATION_TIMEOUT`) and whether the exact ``expected`` bytes came back.

    With ``until == "first"`` the get ends (its value callback returns ``False``) when the
    expected value arrives; with ``"done"`` it runs until OpenDHT's done callback. Either way
    the call then waits, untimed and at most :data:`DONE_GRACE` seconds, for the done callback,
    so that lookups do not overlap."""
    condition = threading.Condition()
    state = {"matched": False, "done": False}

    def on_value(value: opendht.Value) -> bool:
        with condition:
            if value.data == expected:
                state["matched"] = True
                condition.notify_all()
                return until != "first"
        return True

    def on_done(_ok: bool, _nodes: Any) -> None:
        with condition:
            state["done"] = True
            condition.notify_all()

    def finished() -> bool:
        return state["done"] or (until == "first" and state["matched"])

    began = time.perf_counter()
    runner.get(key, on_value, on_done)
    with condition:
        ended = condition.wait_for(finished, timeout=OPERATION_TIMEOUT)
        latency = time.perf_counter() - began if ended else None
        matched = state["matched"]
        condition.wait_for(lambda: state["done"], timeout=DONE_GRACE)
    return latency, matched


def shutdown_all(runners: list[opendht.DhtRunner]) -> int:
    """Ask every node to shut down and wait, at most :data:`SHUTDOWN_TIMEOUT` seconds, for all
    of them; returns how many did not report in time."""
    pending = [len(runners)]
    condition = threading.Condition()

    def on_shutdown() -> None:
        with condition:
            pending[0] -= 1
            condition.notify_all()

    for runner in runners:
        runner.shutdown(on_shutdown)
    with condition:
        condition.wait_for(lambda: pending[0] == 0, timeout=SHUTDOWN_TIMEOUT)
        return pending[0]


def run(options: argparse.Namespace, runners: list[opendht.DhtRunner]) -> dict[str, Any]:
    """One run: join, store, timed lookups; the result as a JSON-ready dict.

    Every node started is appended to ``runners`` as soon as it runs, so that the caller can
    shut all of them down even when the run fails half-way (see :func:`main`)."""
    rng = random.Random(options.seed)
    nodes: int = options.nodes

    started = time.perf_counter()
    unanswered_joins = 0
    for index in range(nodes):
        runner = start_node(options.rate_limit)
        runners.append(runner)
        if index:
            peers = rng.sample(runners[:index], min(BOOTSTRAP_PEERS, index))
            if join(runner, peers) < len(peers):
                unanswered_joins += 1
    joined = time.perf_counter()
    threads = thread_count()

    keys = [opendht.InfoHash.get(f"node-{index}") for index in range(nodes)]
    values = [rng.randbytes(options.value_size) for _ in range(nodes)]
    stored, unreported = store_all(runners, keys, values)
    published = time.perf_counter()

    latencies: list[float | None] = []
    successes: list[bool] = []
    seeker_kinds = {"fresh": 0, "repeat": 0, "holder": 0}
    not_fresh: dict[str, list[int]] = {"repeat": [], "holder": []}
    searched: set[tuple[int, int]] = set()
    for lookup in range(options.lookups):
        owner = rng.randrange(nodes)
        key_hex = keys[owner].toString().decode()
        seeker, kind = choose_seeker(runners, owner, key_hex, searched, rng)
        seeker_kinds[kind] += 1
        if kind in not_fresh:
            not_fresh[kind].append(lookup)
        searched.add((seeker, owner))
        latency, matched = timed_get(runners[seeker], keys[owner], values[owner], options.until)
        latencies.append(latency)
        successes.append(matched)
    looked_up = time.perf_counter()

    messages = [0] * len(MESSAGE_KINDS)
    for runner in runners:
        for position, count in enumerate(runner.getNodeMessageStats()[: len(MESSAGE_KINDS)]):
            messages[position] += count
    holders = sum(len(STORAGE_LINE.findall(runner.getStorageLog())) for runner in runners)
    return {
        "implementation": "opendht",
        "nodes": nodes,
        "lookups": options.lookups,
        "latencies": latencies,
        "successes": successes,
        "stores_reported_ok": sum(stored),
        "stores_unreported": unreported,
        "join_seconds": joined - started,
        "publish_seconds": published - joined,
        "lookup_seconds": looked_up - published,
        "record_bytes": options.value_size,
        "until": options.until,
        "rate_limit": options.rate_limit,
        "joins_with_unanswered_ping": unanswered_joins,
        "seekers": seeker_kinds,
        "repeat_lookups": not_fresh["repeat"],
        "holder_lookups": not_fresh["holder"],
        "copies_per_key": holders / nodes,
        "threads": threads,
        "requests_sent": dict(zip(MESSAGE_KINDS, messages, strict=True)),
        "opendht_version": opendht.version(),
    }


def main() -> None:
    """Parse the options, do one run, print its JSON line, shut the nodes down (bounded), exit.

    The process ends with ``os._exit`` once the result is printed and flushed: the nodes'
    threads are C++ threads, and a node that did not report its shutdown within
    :data:`SHUTDOWN_TIMEOUT` must not keep the process (and the driver) waiting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--value-size", type=int, default=283)
    parser.add_argument("--until", choices=("first", "done"), default="first")
    parser.add_argument(
        "--rate-limit", action="store_true", help="keep OpenDHT's default rate limits"
    )
    options = parser.parse_args()
    if options.nodes < 2:
        parser.error("--nodes must be at least 2")
    raise_open_file_limit()
    code = 0
    runners: list[opendht.DhtRunner] = []
    try:
        result = run(options, runners)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    except Exception as exc:  # noqa: BLE001 (reported, then the nodes are still shut down)
        print(f"worker failed: {exc!r}", file=sys.stderr)
        code = 1
    finally:
        sys.stdout.flush()
        not_stopped = shutdown_all(runners)
        if not_stopped:
            print(f"{not_stopped} node(s) did not report their shutdown", file=sys.stderr)
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
