"""Messaging benchmark: two nodes as separate processes on loopback.

Reports, from one run:

- the crypto ceiling: sign + seal + open + verify of the same 100-byte messages in one process
  (and with the receipt's sign + verify added), in messages per second;
- one-way throughput of messages delivered into the recipient's durable inbox, each
  acknowledged by a signed receipt that the sender has verified and recorded;
- the send-to-delivered round trip (one message at a time): from ``send`` to the sender knowing
  the message delivered, p50 and p99;
- the link handshake time (TCP connect + SIGMA-I handshake), p50 and p99.

Usage::

    python bench/messaging.py [--messages 20000] [--size 100] [--rtt 500] [--runs 3] [--json PATH]

The receiver is a child process running a :class:`p2pnode.node.NodeService` with its own store;
the sender runs in this process. Records are exchanged through a file, not the DHT (the DHT has
its own benchmark). The figures are medians over ``--runs`` runs; the machine description is
included in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from p2pnode import codec
from p2pnode.clock import wall_clock_ms
from p2pnode.dht.records import PeerRecord, dht_key, verify_record
from p2pnode.envelope import make_receipt, open_message, open_receipt, seal_message
from p2pnode.identity import Identity
from p2pnode.link.manager import LinkManager
from p2pnode.node import NodeConfig, NodeService, StaticDirectory
from p2pnode.store import DeliveryState, Store


def crypto_ceiling(count: int, size: int) -> dict[str, float]:
    """Messages per second for sign+seal+open+verify (and with the receipt) in one process."""
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
        receipt = make_receipt(bob.signing_key, message, now_ms=now)
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
    identity = Identity.generate(wall_clock_ms())
    store = Store.open(workdir / "receiver.db")
    node = NodeService(identity, store, StaticDirectory({}), config=NodeConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        assert node.links.listen_address is not None
        record = PeerRecord.create(
            identity, [node.links.listen_address], seq=1, now_ms=wall_clock_ms()
        )
        (workdir / "receiver.record").write_bytes(record.data)
        print("ready", flush=True)
        await trio.sleep_forever()


# --- the sender (this process) ---------------------------------------------------------------


async def sender_run(
    workdir: Path, messages: int, size: int, rtt_count: int, handshakes: int, concurrency: int
) -> dict[str, Any]:
    data = (workdir / "receiver.record").read_bytes()
    receiver_key = _identity_of(data)
    record = verify_record(data, key=dht_key(receiver_key), now_ms=wall_clock_ms())
    identity = Identity.generate(wall_clock_ms())
    store = Store.open(workdir / f"sender-{time.monotonic_ns()}.db")
    node = NodeService(
        identity, store, StaticDirectory({receiver_key: record}), config=NodeConfig()
    )
    results: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        # Warm up: the link and the first message.
        first = await node.send(receiver_key, b"warm-up")
        await node.wait_for_outcome(first)

        # Round trip, one message at a time: from send() to the receipt verified (two durable
        # commits on the way: the sender's outbox and the receiver's inbox), and on to the
        # delivered state recorded (a third).
        receipts: dict[bytes, float] = {}
        node.on_receipt = lambda message_id: receipts.setdefault(message_id, time.perf_counter())
        samples, recorded = [], []
        body = os.urandom(size)
        for _ in range(rtt_count):
            start = time.perf_counter()
            message_id = await node.send(receiver_key, body)
            entry = await node.wait_for_outcome(message_id)
            recorded.append((time.perf_counter() - start) * 1000)
            samples.append((receipts[message_id] - start) * 1000)
            assert entry.state is DeliveryState.DELIVERED
        node.on_receipt = None
        results["rtt_ms"] = _quantiles(samples)
        results["send_to_recorded_ms"] = _quantiles(recorded)

        # Throughput: queue everything at once, time until every receipt is recorded. The
        # node's own counter is read (an event subscriber could fall behind and miss events).
        delivered_before = node.stats["delivered"]
        start = time.perf_counter()
        async with trio.open_nursery() as senders:
            # ``concurrency`` callers each sending in turn, as many API clients would.
            chunk = max(1, messages // concurrency)
            for offset in range(0, messages, chunk):
                count = min(chunk, messages - offset)
                senders.start_soon(_send_many, node, receiver_key, body, count)
        queued = time.perf_counter()
        with trio.fail_after(600):
            while node.stats["delivered"] - delivered_before < messages:
                await trio.sleep(0.005)
        elapsed = time.perf_counter() - start
        results["throughput_per_s"] = messages / elapsed
        results["enqueue_per_s"] = messages / (queued - start)
        results["commits"] = node.worker.commits

        # Handshakes: fresh links from a fresh identity each time, paced under the receiver's
        # per-address handshake rate limit (5 per second) so that none is refused.
        samples = []
        for _ in range(handshakes):
            await trio.sleep(0.25)
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
        results["handshake_ms"] = _quantiles(samples)
        nursery.cancel_scope.cancel()
    store.close()
    return results


async def _send_many(node: NodeService, recipient: bytes, body: bytes, count: int) -> None:
    for _ in range(count):
        await node.send(recipient, body)


def _identity_of(record: bytes) -> bytes:
    body, _ = codec.decode_signed(record, what="record", max_body=1024)
    fields = codec.decode(body)
    return bytes(fields["ik"])


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50": statistics.median(ordered),
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "n": len(ordered),
    }


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="p2pnode-bench-") as tmp:
        workdir = Path(tmp)
        receiver = subprocess.Popen(
            [sys.executable, __file__, "--receiver", str(workdir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None
            if receiver.stdout.readline().strip() != "ready":
                raise RuntimeError("the receiver did not start")
            ceiling = crypto_ceiling(args.ceiling_count, args.size)
            measured = trio.run(
                sender_run,
                workdir,
                args.messages,
                args.size,
                args.rtt,
                args.handshakes,
                args.concurrency,
            )
        finally:
            receiver.terminate()
            receiver.wait(timeout=10)
    measured |= ceiling
    measured["ratio_to_ceiling"] = (
        measured["throughput_per_s"] / ceiling["sign_seal_open_verify_per_s"]
    )
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receiver", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--rtt", type=int, default=500)
    parser.add_argument("--handshakes", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=200, help="concurrent senders")
    parser.add_argument("--ceiling-count", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("results-messaging.json")
    )
    args = parser.parse_args()
    if args.receiver is not None:
        trio.run(receiver_main, args.receiver)
        return
    runs = []
    for index in range(args.runs):
        result = one_run(args)
        runs.append(result)
        print(
            f"run {index + 1}: {result['throughput_per_s']:.0f} msg/s delivered "
            f"(ceiling {result['sign_seal_open_verify_per_s']:.0f}/s, ratio "
            f"{result['ratio_to_ceiling']:.2f}); round trip p50 {result['rtt_ms']['p50']:.2f} ms "
            f"p99 {result['rtt_ms']['p99']:.2f} ms; handshake p50 "
            f"{result['handshake_ms']['p50']:.2f} ms",
            flush=True,
        )

    def median(path: list[str]) -> float:
        values = []
        for run in runs:
            value: Any = run
            for key in path:
                value = value[key]
            values.append(float(value))
        return statistics.median(values)

    summary = {
        "size_bytes": args.size,
        "messages": args.messages,
        "runs": args.runs,
        "throughput_per_s": median(["throughput_per_s"]),
        "ceiling_per_s": median(["sign_seal_open_verify_per_s"]),
        "ceiling_with_receipt_per_s": median(["with_receipt_per_s"]),
        "ratio_to_ceiling": median(["ratio_to_ceiling"]),
        "rtt_p50_ms": median(["rtt_ms", "p50"]),
        "rtt_p99_ms": median(["rtt_ms", "p99"]),
        "send_to_recorded_p50_ms": median(["send_to_recorded_ms", "p50"]),
        "send_to_recorded_p99_ms": median(["send_to_recorded_ms", "p99"]),
        "handshake_p50_ms": median(["handshake_ms", "p50"]),
        "handshake_p99_ms": median(["handshake_ms", "p99"]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "date": time.strftime("%Y-%m-%d"),
        "all_runs": runs,
    }
    args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "all_runs"}, indent=2))


if __name__ == "__main__":
    main()
