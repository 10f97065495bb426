"""Messaging benchmark: two nodes as separate processes on loopback, for several message sizes.

For each message size (``--sizes``, default 100, 1024 and 16384 bytes) one run measures:

- the round trip, one message at a time: from ``send`` to the sender holding the verified
  receipt (``rtt``), and on to the delivered state recorded (``send_to_recorded``), p50 and p99,
  with every sample kept in the JSON file;
- right after, the round trip's floor on this machine (``bench/floor.py``: the same crypto and
  one fsynced commit between two bare processes) and the node's p50 over the floor's;
- the crypto ceiling for that size, measured just before the throughput: sign + seal + open +
  verify of the same messages in one process (and with the receipt's sign + verify added), in
  messages per second;
- one-way throughput of messages delivered into the recipient's durable inbox, each
  acknowledged by a signed receipt that the sender has verified and recorded, and its ratio to
  the ceiling measured just before.

Once per run it also measures the link handshake time (TCP connect + SIGMA-I handshake).

Usage::

    python bench/messaging.py [--sizes 100,1024,16384] [--messages 20000] [--rtt 500]
                              [--runs 3] [--quick] [--json PATH]

The receiver is a child process running a :class:`p2pnode.node.NodeService` with its own store
and the default :class:`p2pnode.node.NodeConfig` (as a daemon runs it); the sender runs in this
process. Records are exchanged through a file, not the DHT (the DHT has its own benchmark).
Larger messages are sent in smaller numbers (see :func:`messages_for`) so that every size takes
a few seconds. The figures are medians over ``--runs`` runs with their spread (min, max); the
JSON file also holds every run. ``bench/scaling.py`` reuses the pieces defined here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import trio

from p2pnode import codec
from p2pnode.clock import wall_clock_ms
from p2pnode.dht.records import PeerRecord, SignedRecord, dht_key, verify_record
from p2pnode.envelope import make_receipt, open_message, open_receipt, seal_message
from p2pnode.identity import Identity
from p2pnode.link.manager import HANDSHAKE_BURST, HANDSHAKES_PER_SECOND, LinkManager
from p2pnode.node import NodeConfig, NodeService, StaticDirectory
from p2pnode.ratelimit import TokenBucket
from p2pnode.store import DeliveryState, Store

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import benchlib
import floor

#: Packages whose versions the result file records.
PACKAGES = ("p2pnode", "trio", "pynacl")

#: Messages per throughput measurement are scaled down for sizes above this many bytes (in
#: proportion), so that a 16 KiB size takes seconds rather than a minute.
SCALE_ABOVE_BYTES: Final = 2048
#: ... but never below this many messages.
MIN_MESSAGES: Final = 1000
#: Seconds one message size may take in a run (round trips, ceiling and throughput) before the
#: run is abandoned.
DELIVERY_TIMEOUT: Final = 600.0


# --- shared helpers (also used by scaling.py) ------------------------------------------------


def receiver_limits() -> dict[str, float]:
    """The receiver's rate limits, all at their defaults (a daemon's configuration)."""
    config = NodeConfig()
    return {
        "incoming_per_second_per_peer": config.incoming_per_second,
        "incoming_burst_per_peer": config.incoming_burst,
        "handshakes_per_second_per_address": HANDSHAKES_PER_SECOND,
        "handshake_burst_per_address": HANDSHAKE_BURST,
        "raised": False,
    }


def quantiles(samples: Sequence[float]) -> dict[str, float]:
    """p50 (median) and p99 (the sample at index ``int(0.99 n)``) of a non-empty list, and n."""
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "n": len(ordered),
    }


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of the per-run values of one figure."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rounded_ms(samples: Sequence[float]) -> list[float]:
    """Samples in ms rounded to the microsecond, as kept in the JSON ``raw`` section."""
    return [round(sample, 3) for sample in samples]


def handshake_delays(count: int) -> list[float]:
    """Start times (seconds from now) for ``count`` link handshakes from one address, so that
    none is refused by the receiver's per-address handshake limit.

    Paced by a bucket 10 % slower and 2 tokens smaller than the receiver's, so that clock
    differences and the handshake already made by another node never tip it over.
    """
    bucket = TokenBucket(HANDSHAKES_PER_SECOND * 0.9, HANDSHAKE_BURST - 2)
    delays, now = [], 0.0
    for _ in range(count):
        while not bucket.try_take(now):
            now += max(bucket.wait_time(now), 0.001)
        delays.append(now)
    return delays


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` (indented, keys in insertion order)."""
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def crypto_ceiling(count: int, size: int) -> dict[str, float]:
    """Messages per second for sign+seal+open+verify in one process, and with a receipt signed
    and verified for each message (the node signs one receipt per group commit and peer, so
    that second figure is a lower bound)."""
    now = wall_clock_ms()
    alice, bob = Identity.generate(now), Identity.generate(now)
    xk = bytes(bob.encryption_key.private_key.public_key)
    body = os.urandom(size)
    keys = bob.decryption_keys(now)
    start = time.perf_counter()
    for _ in range(count):
        _, wire = seal_message(alice.signing_key, bob.public_key, xk, body, now_ms=now)
        open_message(wire, own_identity=bob.public_key, decryption_keys=keys, now_ms=now)
    plain = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(count):
        _, wire = seal_message(alice.signing_key, bob.public_key, xk, body, now_ms=now)
        message = open_message(wire, own_identity=bob.public_key, decryption_keys=keys, now_ms=now)
        receipt = make_receipt(bob.signing_key, alice.public_key, [message.id], now_ms=now)
        open_receipt(
            receipt,
            own_identity=alice.public_key,
            peer_identity=bob.public_key,
            message_id=message.id,
        )
    with_receipt = count / (time.perf_counter() - start)
    return {"sign_seal_open_verify_per_s": plain, "with_receipt_per_s": with_receipt}


# --- the receiver process ------------------------------------------------------------------


async def receiver_main(workdir: Path) -> None:
    """Child process: run a default-configured node, publish its record to
    ``workdir/receiver.record``, print ``ready``, then answer each ``stats`` line on stdin with
    one JSON line of counters (see :func:`receiver_stats`). Returns when stdin is closed."""
    identity = Identity.generate(wall_clock_ms())
    store = Store.open(workdir / "receiver.db")
    node = NodeService(identity, store, StaticDirectory({}), config=NodeConfig())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            assert node.links.listen_address is not None
            record = PeerRecord.create(
                identity, [node.links.listen_address], seq=1, now_ms=wall_clock_ms()
            )
            (workdir / "receiver.record").write_bytes(record.data)
            print("ready", flush=True)
            await _serve_commands(node)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def receiver_stats(node: NodeService) -> dict[str, Any]:
    """The receiver's counters: node and link statistics (``node["throttled"]`` counts
    envelopes delayed by the per-peer rate limit, ``links["refused:rate-limited"]`` refused
    handshakes), commits, open links and the process's CPU seconds so far."""
    return {
        "node": dict(node.stats),
        "links": dict(node.links.stats),
        "commits": node.worker.commits,
        "open_links": node.links.open_links,
        "cpu_s": time.process_time(),
    }


async def _serve_commands(node: NodeService) -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    pending = b""
    async with stream:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.strip() == b"stats":
                    print(json.dumps(receiver_stats(node)), flush=True)


class Receiver:
    """The receiver node in a child process (:func:`receiver_main`); a context manager that
    starts it in ``workdir`` and, on exit, stops it (stdin closed, then terminate, then kill).

    Raises:
        RuntimeError: on entry, if the child does not report ready.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Receiver:
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--receiver", str(self.workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert self._process.stdout is not None
            if self._process.stdout.readline().strip() != "ready":
                raise RuntimeError("the receiver did not start")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def peer(self) -> tuple[bytes, SignedRecord]:
        """The receiver's identity key and its verified record."""
        data = (self.workdir / "receiver.record").read_bytes()
        body, _ = codec.decode_signed(data, what="record", max_body=1024)
        key = bytes(codec.decode(body)["ik"])
        return key, verify_record(data, key=dht_key(key), now_ms=wall_clock_ms())

    def stats(self) -> dict[str, Any]:
        """The receiver's counters now (:func:`receiver_stats`); blocks for a pipe round trip."""
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write("stats\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the receiver exited")
        result: dict[str, Any] = json.loads(line)
        return result

    async def stats_async(self) -> dict[str, Any]:
        """:meth:`stats` from trio code (in a thread, so the event loop keeps running)."""
        return await trio.to_thread.run_sync(self.stats)

    async def watch(self) -> None:
        """Raise RuntimeError as soon as the child has exited (run it beside a measurement, so
        that a crashed receiver ends the run instead of leaving it waiting for receipts)."""
        while True:
            process = self._process
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the receiver exited with code {process.returncode}")
            await trio.sleep(0.2)

    def close(self) -> None:
        """Stop the child (idempotent)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            if process.stdout is not None:
                process.stdout.close()


def sender_node(path: Path, receiver_key: bytes, record: SignedRecord) -> tuple[NodeService, Store]:
    """A default-configured node with a fresh identity and its store at ``path``, which knows
    the receiver's record. The caller runs it (``nursery.start(node.run)``) and closes the
    store after it stops."""
    store = Store.open(path)
    node = NodeService(
        Identity.generate(wall_clock_ms()),
        store,
        StaticDirectory({receiver_key: record}),
        config=NodeConfig(),
    )
    return node, store


async def send_many(
    node: NodeService,
    recipient: bytes,
    body: bytes,
    count: int,
    started: dict[bytes, float] | None = None,
) -> None:
    """Send ``count`` copies of ``body`` one after another (each ``send`` returns once the
    outbox row is durable); if ``started`` is given, record each message's ``perf_counter``
    time at the call, by message id."""
    for _ in range(count):
        start = time.perf_counter()
        message_id = await node.send(recipient, body)
        if started is not None:
            started[message_id] = start


def receipt_recorder(times: dict[bytes, float]) -> Callable[[bytes], None]:
    """An ``on_receipt`` hook storing the ``perf_counter`` time of each message's first
    receipt in ``times``."""

    def record(message_id: bytes) -> None:
        times.setdefault(message_id, time.perf_counter())

    return record


# --- the sender (this process) ---------------------------------------------------------------


@dataclass(frozen=True)
class SizePlan:
    """What one run does for one message size."""

    size: int
    messages: int  # throughput measurement
    ceiling_count: int  # crypto ceiling measurement
    rtt: int  # round trips, one at a time


def messages_for(size: int, base: int) -> int:
    """Messages for the throughput measurement of ``size``-byte messages: ``base`` up to
    :data:`SCALE_ABOVE_BYTES`, then in inverse proportion to the size, at least
    :data:`MIN_MESSAGES` (never more than ``base``)."""
    scaled = base * SCALE_ABOVE_BYTES // max(size, SCALE_ABOVE_BYTES)
    return min(base, max(MIN_MESSAGES, scaled))


async def measure_size(
    node: NodeService,
    receiver: Receiver,
    receiver_key: bytes,
    plan: SizePlan,
    concurrency: int,
    workdir: Path,
) -> dict[str, Any]:
    """Round trips, their floor, crypto ceiling and throughput for one message size (see the
    module doc); the floor's database goes in a new folder in ``workdir``."""
    results: dict[str, Any] = {"size_bytes": plan.size, "messages": plan.messages}
    body = os.urandom(plan.size)

    # Round trip, one message at a time: from send() to the receipt verified (two durable
    # commits on the way: the sender's outbox and the receiver's inbox), and on to the
    # delivered state recorded.
    receipts: dict[bytes, float] = {}
    node.on_receipt = receipt_recorder(receipts)
    samples, recorded = [], []
    for _ in range(plan.rtt):
        start = time.perf_counter()
        message_id = await node.send(receiver_key, body)
        entry = await node.wait_for_outcome(message_id)
        recorded.append((time.perf_counter() - start) * 1000)
        samples.append((receipts[message_id] - start) * 1000)
        assert entry.state is DeliveryState.DELIVERED
    node.on_receipt = None
    results["rtt_ms"] = quantiles(samples)
    results["send_to_recorded_ms"] = quantiles(recorded)
    results["rtt_samples_ms"] = rounded_ms(samples)

    # The floor, right after: the same crypto and one fsynced commit between two bare
    # processes (bench/floor.py), as many round trips.
    floor_dir = workdir / f"floor-{plan.size}"
    floor_dir.mkdir()
    floor_samples = await floor.measure(plan.rtt, plan.size, floor_dir)
    results["floor_rtt_ms"] = quantiles(floor_samples)
    results["rtt_over_floor"] = results["rtt_ms"]["p50"] / results["floor_rtt_ms"]["p50"]

    # The ceiling for this size, just before the throughput (this blocks the event loop; the
    # sender node is idle meanwhile and the receiver is another process).
    results |= crypto_ceiling(plan.ceiling_count, plan.size)

    # Throughput: queue everything at once, ``concurrency`` callers each sending in turn as
    # many API clients would; time until every receipt is recorded. The node's own counter is
    # read (an event subscriber could fall behind and miss events).
    before = await receiver.stats_async()
    delivered_before = node.stats["delivered"]
    cpu_before = time.process_time()
    start = time.perf_counter()
    async with trio.open_nursery() as senders:
        chunk = max(1, plan.messages // concurrency)
        for offset in range(0, plan.messages, chunk):
            count = min(chunk, plan.messages - offset)
            senders.start_soon(send_many, node, receiver_key, body, count)
    queued = time.perf_counter()
    while node.stats["delivered"] - delivered_before < plan.messages:
        await trio.sleep(0.005)
    elapsed = time.perf_counter() - start
    sender_cpu = time.process_time() - cpu_before
    after = await receiver.stats_async()
    results["throughput_per_s"] = plan.messages / elapsed
    results["enqueue_per_s"] = plan.messages / (queued - start)
    results["ratio_to_ceiling"] = (
        results["throughput_per_s"] / results["sign_seal_open_verify_per_s"]
    )
    results["sender_cpu_share"] = sender_cpu / elapsed
    results["receiver_cpu_share"] = (after["cpu_s"] - before["cpu_s"]) / elapsed
    results["receiver_throttled"] = after["node"].get("throttled", 0) - before["node"].get(
        "throttled", 0
    )
    return results


async def measure_handshakes(receiver_key: bytes, record: SignedRecord, count: int) -> list[float]:
    """Milliseconds for each of ``count`` fresh links (TCP connect + handshake) from fresh
    identities, paced under the receiver's per-address handshake limit (none is refused)."""
    samples = []
    previous = 0.0
    for delay in handshake_delays(count):
        await trio.sleep(max(0.02, delay - previous))  # and let the last link close first
        previous = delay
        key = Identity.generate(wall_clock_ms()).signing_key

        async def ignore(link: Any, frame: Any) -> None:
            return None

        manager = LinkManager(key, ignore)
        async with trio.open_nursery() as inner:
            await inner.start(manager.serve)
            start = time.perf_counter()
            link = await manager.connect(receiver_key, record.record.addresses)
            samples.append((time.perf_counter() - start) * 1000)
            link.close()
            inner.cancel_scope.cancel()
    return samples


async def sender_run(
    workdir: Path, receiver: Receiver, plans: list[SizePlan], handshakes: int, concurrency: int
) -> dict[str, Any]:
    """One run: every size of ``plans`` in turn over one link, then the handshakes."""
    receiver_key, record = receiver.peer()
    node, store = sender_node(workdir / "sender.db", receiver_key, record)
    results: dict[str, Any] = {"sizes": {}}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receiver.watch)
            await nursery.start(node.run)
            # Warm up: the link and the first message.
            with trio.fail_after(60):
                first = await node.send(receiver_key, b"warm-up")
                await node.wait_for_outcome(first)
            for plan in plans:
                with trio.fail_after(DELIVERY_TIMEOUT):
                    results["sizes"][str(plan.size)] = await measure_size(
                        node, receiver, receiver_key, plan, concurrency, workdir
                    )
            results["sender_commits"] = node.worker.commits
            samples = await measure_handshakes(receiver_key, record, handshakes)
            results["handshake_ms"] = quantiles(samples)
            results["handshake_samples_ms"] = rounded_ms(samples)
            results["receiver_stats"] = await receiver.stats_async()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    return results


def one_run(plans: list[SizePlan], handshakes: int, concurrency: int) -> dict[str, Any]:
    """A fresh receiver process and sender node, every size measured once."""
    with tempfile.TemporaryDirectory(prefix="p2pnode-bench-") as tmp:
        workdir = Path(tmp)
        with Receiver(workdir) as receiver:
            return trio.run(sender_run, workdir, receiver, plans, handshakes, concurrency)


#: Per-size figures summarised over runs (JSON ``results.sizes[size]``), and where each comes
#: from in a run's per-size entry.
SIZE_FIGURES: Final = {
    "throughput_per_s": ("throughput_per_s",),
    "ceiling_per_s": ("sign_seal_open_verify_per_s",),
    "ceiling_with_receipt_per_s": ("with_receipt_per_s",),
    "ratio_to_ceiling": ("ratio_to_ceiling",),
    "rtt_p50_ms": ("rtt_ms", "p50"),
    "rtt_p99_ms": ("rtt_ms", "p99"),
    "floor_rtt_p50_ms": ("floor_rtt_ms", "p50"),
    "floor_rtt_p99_ms": ("floor_rtt_ms", "p99"),
    "rtt_over_floor": ("rtt_over_floor",),
    "send_to_recorded_p50_ms": ("send_to_recorded_ms", "p50"),
    "send_to_recorded_p99_ms": ("send_to_recorded_ms", "p99"),
    "enqueue_per_s": ("enqueue_per_s",),
    "sender_cpu_share": ("sender_cpu_share",),
    "receiver_cpu_share": ("receiver_cpu_share",),
    "receiver_throttled": ("receiver_throttled",),
}


def dig(entry: dict[str, Any], path: Sequence[str]) -> float:
    """The number at ``path`` (a sequence of keys) in nested dicts."""
    value: Any = entry
    for key in path:
        value = value[key]
    return float(value)


def summarise(runs: list[dict[str, Any]], plans: list[SizePlan]) -> dict[str, Any]:
    """The JSON ``results``: per size, each figure's median, min and max over runs."""
    sizes = {}
    for plan in plans:
        entries = [run["sizes"][str(plan.size)] for run in runs]
        sizes[str(plan.size)] = {"messages": plan.messages} | {
            name: spread([dig(entry, path) for entry in entries])
            for name, path in SIZE_FIGURES.items()
        }
    return {
        "runs": len(runs),
        "sizes": sizes,
        "handshake_p50_ms": spread([run["handshake_ms"]["p50"] for run in runs]),
        "handshake_p99_ms": spread([run["handshake_ms"]["p99"] for run in runs]),
    }


def cell(figure: dict[str, float], digits: int) -> str:
    """``median [min-max]`` of a summarised figure, for the stdout tables."""
    return f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}-{figure['max']:.{digits}f}]"


def print_table(results: dict[str, Any]) -> None:
    """The medians (and min-max) per size on stdout."""
    print(f"\nmedian [min-max] of {results['runs']} runs")
    print(
        f"{'size B':>7}  {'delivered msg/s':<18} {'ceiling/s':<18} {'ratio':<17}"
        f" {'rtt p50 ms':<17} {'rtt p99 ms':<17} {'floor p50 ms':<17}"
    )
    for size, figures in results["sizes"].items():
        print(
            f"{size:>7}  {cell(figures['throughput_per_s'], 0):<18}"
            f" {cell(figures['ceiling_per_s'], 0):<18}"
            f" {cell(figures['ratio_to_ceiling'], 2):<17}"
            f" {cell(figures['rtt_p50_ms'], 2):<17} {cell(figures['rtt_p99_ms'], 2):<17}"
            f" {cell(figures['floor_rtt_p50_ms'], 2):<17}"
        )
    print(f"handshake p50 ms {cell(results['handshake_p50_ms'], 2)}")


def parse_sizes(text: str) -> list[int]:
    """Comma-separated message sizes in bytes."""
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    """Command line entry point (see the module doc and ``--help``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--receiver", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--sizes", type=parse_sizes, default=None, help="message sizes, bytes (100,1024,16384)"
    )
    parser.add_argument("--size", type=int, help="one size (same as --sizes N)")
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per throughput measurement up to 2 KiB, fewer above (20000)",
    )
    parser.add_argument("--rtt", type=int, default=None, help="round trips per size (500)")
    parser.add_argument("--handshakes", type=int, default=None, help="per run (50)")
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent send callers")
    parser.add_argument(
        "--ceiling-count", type=int, default=None, help="crypto ceiling messages (3000)"
    )
    parser.add_argument("--runs", type=int, default=None, help="runs; medians reported (3)")
    parser.add_argument(
        "--quick", action="store_true", help="sizes 100 and 16384, fewer messages, 1 run"
    )
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("results-messaging.json")
    )
    args = parser.parse_args()
    if args.receiver is not None:
        trio.run(receiver_main, args.receiver)
        return

    quick = args.quick
    sizes = args.sizes or (
        [args.size] if args.size else [100, 16384] if quick else [100, 1024, 16384]
    )
    base = args.messages or (5000 if quick else 20_000)
    rtt = args.rtt or (200 if quick else 500)
    handshakes = args.handshakes or (18 if quick else 50)
    ceiling = args.ceiling_count or (1000 if quick else 3000)
    runs_wanted = args.runs or (1 if quick else 3)
    plans = [
        SizePlan(size, messages_for(size, base), messages_for(size, ceiling), rtt) for size in sizes
    ]

    runs: list[dict[str, Any]] = []
    for index in range(runs_wanted):
        run = one_run(plans, handshakes, args.concurrency)
        runs.append(run)
        for plan in plans:
            result = run["sizes"][str(plan.size)]
            print(
                f"run {index + 1}, {plan.size} B: {result['throughput_per_s']:.0f} msg/s "
                f"delivered (ceiling {result['sign_seal_open_verify_per_s']:.0f}/s, ratio "
                f"{result['ratio_to_ceiling']:.2f}); round trip p50 "
                f"{result['rtt_ms']['p50']:.2f} ms p99 {result['rtt_ms']['p99']:.2f} ms",
                flush=True,
            )
        print(f"run {index + 1}: handshake p50 {run['handshake_ms']['p50']:.2f} ms", flush=True)

    results = summarise(runs, plans)
    document = {
        "benchmark": "messaging",
        "date": time.strftime("%Y-%m-%d"),
        "machine": benchlib.machine(PACKAGES),
        "config": {
            "sizes": sizes,
            "plans": [asdict(plan) for plan in plans],
            "base_messages": base,
            "handshakes": handshakes,
            "concurrency": args.concurrency,
            "runs": runs_wanted,
            "quick": quick,
            "receiver_limits": receiver_limits(),
        },
        "results": results,
        "raw": runs,
    }
    write_json(args.json, document)
    print_table(results)
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
