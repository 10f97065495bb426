"""Scaling benchmark: one receiver node, 1 to 50 sender nodes sending 100-byte messages to it.

For each number of senders (``--senders``, default 1, 10, 50) one run measures:

- **saturation**: every sender queues its share of ``--messages`` at once; the aggregate
  throughput is messages delivered (receipt verified and recorded by the sender) per second
  until the last one. Fairness: each sender's share of the messages delivered by the time half
  of all were, its smallest and largest (equal shares would be 1/N each), and when the first
  and the last sender had all of theirs delivered. The send-to-receipt time of these messages
  is reported too (``queued_latency``), but it is mostly time spent waiting behind the
  sender's own backlog and grows with ``--messages``.
- **latency under load**: the senders then send at a fixed pace, together ``--load`` (default
  0.5) times the throughput just measured, evenly spread, for ``--latency-seconds``; each
  message's time from ``send`` to its receipt verified, p50 and p99, split into the time
  ``send`` took to return (the sender's durable outbox write, ``send_return``) and the time
  from then to the receipt (``after_send``: delivery, the receiver's durable inbox write and
  the receipt).

Processes: the receiver is its own process (the one from ``bench/messaging.py``, a
default-configured :class:`p2pnode.node.NodeService`, with the rate limits a daemon has); all
senders live in this process, each with its own identity, store and link, sharing one trio
loop. On a 2-core machine this gives the receiver one core and all senders together the other,
whatever their number: the senders' side is at most one core, as it is with one sender (a
process per sender would only make 50 processes compete for the same two cores). The JSON file
reports each side's CPU use so that the bottleneck is visible. What co-location does cost: the
senders' stores (one SQLite database each, each committing on its own) and their commits share
one process and one disk, so ``send_return`` grows with the number of senders more than it
would on separate machines; ``after_send`` is the part the receiver and the links account for.

Rate limits: the receiver keeps its defaults. Its per-peer envelope bucket (5,000 per second,
burst 10,000) is reported as binding if it delayed any envelope (``throttled``). Its
per-address handshake limit (5 per second, burst 20) would refuse most of 50 links dialled at
once from 127.0.0.1 (in a real network they come from 50 addresses), so the senders' first
messages are paced under it before anything is timed; ``refused_handshakes`` checks it.

Usage::

    python bench/scaling.py [--senders 1,10,50] [--messages 20000] [--runs 3] [--quick]
                            [--json bench/results-scaling.json]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import trio

from p2pnode.node import NodeService
from p2pnode.store import DeliveryState, Store

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import benchlib
import messaging

#: Message body size, bytes (the size sweep is ``messaging.py``'s).
SIZE: Final = 100
#: Seconds one number of senders may take in a run before the run is abandoned.
RUN_TIMEOUT: Final = 600.0


async def warm_up(nodes: list[NodeService], receiver_key: bytes) -> float:
    """Each sender's link and first message, the dials paced under the receiver's
    per-address handshake limit; returns the seconds it took."""
    start = trio.current_time()

    async def first_message(node: NodeService, delay: float) -> None:
        await trio.sleep_until(start + delay)
        message_id = await node.send(receiver_key, b"warm-up")
        entry = await node.wait_for_outcome(message_id)
        if entry.state is not DeliveryState.DELIVERED:
            raise RuntimeError(f"a warm-up message failed: {entry.last_error}")

    async with trio.open_nursery() as nursery:
        for node, delay in zip(nodes, messaging.handshake_delays(len(nodes)), strict=True):
            nursery.start_soon(first_message, node, delay)
    return trio.current_time() - start


def delivered(nodes: list[NodeService], before: list[int]) -> list[int]:
    """Messages each sender has had delivered since ``before`` (its counter then)."""
    return [node.stats["delivered"] - base for node, base in zip(nodes, before, strict=True)]


async def saturate(
    nodes: list[NodeService],
    receiver: messaging.Receiver,
    receiver_key: bytes,
    per_sender: int,
    concurrency: int,
    receipts: dict[bytes, float],
) -> dict[str, Any]:
    """Every sender queues ``per_sender`` messages at once (``concurrency`` callers in all,
    spread over the senders); throughput, fairness and queued latency until all are
    delivered."""
    body = os.urandom(SIZE)
    target = per_sender * len(nodes)
    callers = max(1, concurrency // len(nodes))
    chunk = math.ceil(per_sender / callers)
    started: dict[bytes, float] = {}
    before = [node.stats["delivered"] for node in nodes]
    finished: list[float | None] = [None] * len(nodes)
    at_half: list[int] = []
    receiver_before = await receiver.stats_async()
    commits_before = sum(node.worker.commits for node in nodes)
    cpu_before = time.process_time()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for node in nodes:
            for offset in range(0, per_sender, chunk):
                count = min(chunk, per_sender - offset)
                nursery.start_soon(messaging.send_many, node, receiver_key, body, count, started)
        while True:
            counts = delivered(nodes, before)
            now = time.perf_counter() - start
            for index, count in enumerate(counts):
                if finished[index] is None and count >= per_sender:
                    finished[index] = now
            total = sum(counts)
            if not at_half and total >= target / 2:
                at_half = counts
            if total >= target:
                break
            await trio.sleep(0.005)
    elapsed = time.perf_counter() - start
    sender_cpu = time.process_time() - cpu_before
    receiver_after = await receiver.stats_async()
    shares = [count / sum(at_half) for count in at_half]
    latencies = [(receipts[key] - sent) * 1000 for key, sent in started.items()]
    return {
        "messages": target,
        "throughput_per_s": target / elapsed,
        "seconds": elapsed,
        "share_min": min(shares),
        "share_max": max(shares),
        "first_finished_s": min(t for t in finished if t is not None),
        "last_finished_s": max(t for t in finished if t is not None),
        "queued_latency_ms": messaging.quantiles(latencies),
        "sender_cpu_share": sender_cpu / elapsed,
        "receiver_cpu_share": (receiver_after["cpu_s"] - receiver_before["cpu_s"]) / elapsed,
        "throttled": _counter(receiver_after, receiver_before, "node", "throttled"),
        "sender_commits": sum(node.worker.commits for node in nodes) - commits_before,
        "receiver_commits": receiver_after["commits"] - receiver_before["commits"],
    }


async def paced(
    nodes: list[NodeService],
    receiver_key: bytes,
    rate: float,
    seconds: float,
    receipts: dict[bytes, float],
) -> dict[str, Any]:
    """Senders together send ``rate`` messages per second for ``seconds``, each at an even
    pace, staggered; send-to-receipt latency of every message. A message is sent at its
    scheduled time whatever happened to the previous ones (open loop)."""
    body = os.urandom(SIZE)
    interval = len(nodes) / rate  # between one sender's messages
    per_sender = max(1, round(seconds / interval))
    started: dict[bytes, float] = {}
    lateness: list[float] = []
    returned: dict[bytes, float] = {}  # when ``send`` returned (the outbox row durable)
    before = [node.stats["delivered"] for node in nodes]
    lead_in = 0.05  # seconds for the pacing tasks to start before the first message is due
    begin = trio.current_time() + lead_in

    async def send_one(node: NodeService) -> None:
        start = time.perf_counter()
        message_id = await node.send(receiver_key, body)
        started[message_id] = start
        returned[message_id] = time.perf_counter()

    async def pace(node: NodeService, first: float, nursery: trio.Nursery) -> None:
        # Each message gets its own task when it is due, so a slow send never delays the
        # next one. (A task per message made up front instead kept thousands of sleeping
        # tasks alive: the garbage collector's full passes over them stalled the event loop
        # for 10-35 ms, and the latency measured was mostly the driver's own.)
        for k in range(per_sender):
            when = first + k * interval
            await trio.sleep_until(when)
            lateness.append((trio.current_time() - when) * 1000)
            nursery.start_soon(send_one, node)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index, node in enumerate(nodes):
            nursery.start_soon(pace, node, begin + interval * index / len(nodes), nursery)
    target = per_sender * len(nodes)
    while sum(delivered(nodes, before)) < target:
        await trio.sleep(0.005)
    elapsed = time.perf_counter() - start - lead_in
    latencies = [(receipts[key] - sent) * 1000 for key, sent in started.items()]
    enqueue = [(returned[key] - sent) * 1000 for key, sent in started.items()]
    after_send = [(receipts[key] - done) * 1000 for key, done in returned.items()]
    return {
        "messages": target,
        "offered_per_s": rate,
        "delivered_per_s": target / elapsed,
        "latency_ms": messaging.quantiles(latencies) | _tail(latencies),
        "send_lateness_p99_ms": messaging.quantiles(lateness)["p99"],
        "send_return_ms": messaging.quantiles(enqueue),
        "after_send_ms": messaging.quantiles(after_send),
    }


def _tail(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p90": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))], "max": ordered[-1]}


def _counter(after: dict[str, Any], before: dict[str, Any], part: str, name: str) -> int:
    return int(after[part].get(name, 0)) - int(before[part].get(name, 0))


async def scaling_run(
    workdir: Path,
    receiver: messaging.Receiver,
    senders: int,
    per_sender: int,
    concurrency: int,
    load: float,
    latency_seconds: float,
) -> dict[str, Any]:
    """One run for one number of senders: warm-up, saturation, then latency under load."""
    receiver_key, record = receiver.peer()
    # All senders' stores share this process's worker-thread limiter; a process of their own
    # would give each its own.
    limiter = trio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, 2 * senders)
    pairs: list[tuple[NodeService, Store]] = []
    receipts: dict[bytes, float] = {}
    results: dict[str, Any] = {"senders": senders}
    try:
        for index in range(senders):
            pairs.append(
                messaging.sender_node(workdir / f"sender-{index}.db", receiver_key, record)
            )
        nodes = [node for node, _ in pairs]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver.watch)
            for node in nodes:
                await nursery.start(node.run)
                node.on_receipt = messaging.receipt_recorder(receipts)
            with trio.fail_after(RUN_TIMEOUT):
                start_stats = await receiver.stats_async()
                results["warm_up_s"] = await warm_up(nodes, receiver_key)
                results["saturation"] = await saturate(
                    nodes, receiver, receiver_key, per_sender, concurrency, receipts
                )
                rate = load * results["saturation"]["throughput_per_s"]
                results["under_load"] = await paced(
                    nodes, receiver_key, rate, latency_seconds, receipts
                )
                end_stats = await receiver.stats_async()
            results["refused_handshakes"] = _counter(
                end_stats, start_stats, "links", "refused:rate-limited"
            )
            results["throttled"] = _counter(end_stats, start_stats, "node", "throttled")
            results["receiver_stats"] = end_stats
            nursery.cancel_scope.cancel()
    finally:
        for _, store in pairs:
            store.close()
    return results


def one_run(
    senders: int, per_sender: int, concurrency: int, load: float, latency_seconds: float
) -> dict[str, Any]:
    """A fresh receiver process and ``senders`` fresh sender nodes."""
    with tempfile.TemporaryDirectory(prefix="p2pnode-scaling-") as tmp:
        workdir = Path(tmp)
        with messaging.Receiver(workdir) as receiver:
            return trio.run(
                scaling_run,
                workdir,
                receiver,
                senders,
                per_sender,
                concurrency,
                load,
                latency_seconds,
            )


#: Figures summarised over runs (JSON ``results.senders[N]``), and where each comes from in a
#: run.
FIGURES: Final = {
    "throughput_per_s": ("saturation", "throughput_per_s"),
    "share_min": ("saturation", "share_min"),
    "share_max": ("saturation", "share_max"),
    "first_finished_s": ("saturation", "first_finished_s"),
    "last_finished_s": ("saturation", "last_finished_s"),
    "queued_latency_p50_ms": ("saturation", "queued_latency_ms", "p50"),
    "queued_latency_p99_ms": ("saturation", "queued_latency_ms", "p99"),
    "sender_cpu_share": ("saturation", "sender_cpu_share"),
    "receiver_cpu_share": ("saturation", "receiver_cpu_share"),
    "sender_commits": ("saturation", "sender_commits"),
    "receiver_commits": ("saturation", "receiver_commits"),
    "offered_per_s": ("under_load", "offered_per_s"),
    "delivered_under_load_per_s": ("under_load", "delivered_per_s"),
    "latency_p50_ms": ("under_load", "latency_ms", "p50"),
    "latency_p99_ms": ("under_load", "latency_ms", "p99"),
    "send_lateness_p99_ms": ("under_load", "send_lateness_p99_ms"),
    "send_return_p50_ms": ("under_load", "send_return_ms", "p50"),
    "send_return_p99_ms": ("under_load", "send_return_ms", "p99"),
    "after_send_p50_ms": ("under_load", "after_send_ms", "p50"),
    "after_send_p99_ms": ("under_load", "after_send_ms", "p99"),
    "warm_up_s": ("warm_up_s",),
    "throttled": ("throttled",),
    "refused_handshakes": ("refused_handshakes",),
}


#: A process using at least this share of one core during saturation is taken as the limit.
CPU_BOUND_SHARE: Final = 0.9


def cpu_bound(receiver_share: float, sender_share: float) -> str:
    """Which process was the limit during saturation: ``"receiver"``, ``"senders"``, ``"both"``
    or ``"neither"`` (then waiting, or other load on the machine, was)."""
    receiver, senders = receiver_share >= CPU_BOUND_SHARE, sender_share >= CPU_BOUND_SHARE
    if receiver and senders:
        return "both"
    return "receiver" if receiver else "senders" if senders else "neither"


def summarise(raw: list[dict[str, Any]], counts: list[int], runs: int) -> dict[str, Any]:
    """The JSON ``results``: per number of senders, each figure's median, min and max."""
    table: dict[str, Any] = {}
    for senders in counts:
        entries = [entry for entry in raw if entry["senders"] == senders]
        if not entries:
            continue
        figures: dict[str, Any] = {
            name: messaging.spread([messaging.dig(entry, path) for entry in entries])
            for name, path in FIGURES.items()
        }
        figures["fair_share"] = 1 / senders
        figures["rate_limit_bound"] = any(entry["throttled"] > 0 for entry in entries)
        figures["cpu_bound"] = cpu_bound(
            figures["receiver_cpu_share"]["median"], figures["sender_cpu_share"]["median"]
        )
        table[str(senders)] = figures
    return {"runs": runs, "senders": table}


def print_table(results: dict[str, Any]) -> None:
    """Medians (and min-max) per number of senders on stdout."""
    print(
        f"\n{SIZE} B messages; median [min-max] of {results['runs']} runs, latencies median"
        " of the runs' percentiles"
    )
    print(
        f"{'senders':>7}  {'delivered msg/s':<18} {'share x N':<10} {'load msg/s':>10}"
        f" {'p50 ms':>7} {'p99 ms':>7} {'send() p50':>10} {'after p50':>9}"
        f" {'cpu rx/tx':>9} {'bound':>8} {'throttled':>9}"
    )
    for senders, figures in results["senders"].items():
        n = int(senders)
        median = {name: float(v["median"]) for name, v in figures.items() if isinstance(v, dict)}
        shares = f"{median['share_min'] * n:.2f}-{median['share_max'] * n:.2f}"
        cpu = f"{median['receiver_cpu_share']:.2f}/{median['sender_cpu_share']:.2f}"
        print(
            f"{senders:>7}  {messaging.cell(figures['throughput_per_s'], 0):<18} {shares:<10}"
            f" {median['offered_per_s']:>10.0f} {median['latency_p50_ms']:>7.2f}"
            f" {median['latency_p99_ms']:>7.2f} {median['send_return_p50_ms']:>10.2f}"
            f" {median['after_send_p50_ms']:>9.2f} {cpu:>9} {figures['cpu_bound']:>8}"
            f" {figures['throttled']['max']:>9.0f}"
        )


def main() -> None:
    """Command line entry point (see the module doc and ``--help``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--senders", type=messaging.parse_sizes, default=None, help="numbers of senders (1,10,50)"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per saturation run, all senders (20000)",
    )
    parser.add_argument("--runs", type=int, default=None, help="runs per number of senders (3)")
    parser.add_argument(
        "--load", type=float, default=0.5, help="paced load, fraction of saturation (0.5)"
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=None, help="paced sending time (3)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=200, help="concurrent send callers, all senders"
    )
    parser.add_argument("--quick", action="store_true", help="1 and 10 senders, 1 short run")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("results-scaling.json")
    )
    args = parser.parse_args()
    quick = args.quick
    counts = args.senders or ([1, 10] if quick else [1, 10, 50])
    messages = args.messages or (4000 if quick else 20_000)
    runs = args.runs or (1 if quick else 3)
    latency_seconds = args.latency_seconds or (1.5 if quick else 3.0)

    raw: list[dict[str, Any]] = []
    for index in range(runs):
        for senders in counts:
            per_sender = max(1, messages // senders)
            entry = {"run": index + 1} | one_run(
                senders, per_sender, args.concurrency, args.load, latency_seconds
            )
            raw.append(entry)
            saturation, loaded = entry["saturation"], entry["under_load"]
            print(
                f"run {index + 1}, {senders} senders: {saturation['throughput_per_s']:.0f} msg/s "
                f"delivered, shares {saturation['share_min'] * senders:.2f}-"
                f"{saturation['share_max'] * senders:.2f} x fair; at "
                f"{loaded['offered_per_s']:.0f} msg/s send-to-receipt p50 "
                f"{loaded['latency_ms']['p50']:.2f} ms p99 {loaded['latency_ms']['p99']:.2f} ms; "
                f"throttled {entry['throttled']}, refused handshakes "
                f"{entry['refused_handshakes']}",
                flush=True,
            )

    results = summarise(raw, counts, runs)
    document = {
        "benchmark": "scaling",
        "date": time.strftime("%Y-%m-%d"),
        "machine": benchlib.machine(messaging.PACKAGES),
        "config": {
            "senders": counts,
            "message_size": SIZE,
            "messages": messages,
            "concurrency": args.concurrency,
            "load": args.load,
            "latency_seconds": latency_seconds,
            "runs": runs,
            "quick": quick,
            "processes": "receiver: its own process; senders: all in one other process, one trio "
            "loop, each with its own identity, store and link",
            "sender_thread_limit": "trio's worker-thread limit in the sender process raised to "
            "at least 2 per sender (store commits)",
            "receiver_limits": messaging.receiver_limits(),
            "warm_up": "senders' first messages paced under the receiver's per-address "
            "handshake limit, untimed",
        },
        "results": results,
        "raw": raw,
    }
    messaging.write_json(args.json, document)
    print_table(results)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
