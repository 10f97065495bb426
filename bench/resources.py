"""Resource benchmark: a real ``p2pnode daemon``'s memory and database size.

Each run starts real daemons with :class:`p2pnode.testnet.Testnet` (own homes, loopback) and
reads the daemon process's ``VmRSS`` (and peak, ``VmHWM``) from ``/proc/<pid>/status``:

1. **Idle.** A fresh daemon, right after start, and again after link-up: a sender has opened
   a link to it and one warm-up message is delivered.
2. **Messages.** ``--messages`` messages of 100 bytes are sent to it over that link; it
   receives, stores and acknowledges them all. The sender is an in-process
   :class:`p2pnode.node.NodeService` (as in ``bench/messaging.py``: faster than a second
   daemon behind its API, and the receiver's work is the same), given the receiver's signed
   record directly instead of looking it up. RSS is read once every receipt is back, and the
   database (``node.db`` + ``-wal`` + ``-shm`` in the daemon's home) is measured, growth
   scaled to bytes per 100,000 messages. The daemon has no checkpoint command, so the files
   are reported separately while it runs and again after a clean stop (SIGTERM: the store
   closes, SQLite checkpoints the WAL into ``node.db`` and removes it).
3. **Contacts.** A second fresh daemon (so the figure is not mixed with the messages'):
   RSS fresh; after ``--contacts`` ``POST /v1/contacts`` with an empty name, refused with 400
   (the control: as many API connections and requests, nothing stored); after as many valid
   ``POST /v1/contacts`` (random node IDs, names ``c00000``...); and after one
   ``GET /v1/contacts`` listing them all. Requests come from 4 threads, each with the
   project's :class:`p2pnode.api.client.ApiClient` (one connection per request).
4. **Settling.** Unless ``--quick`` or ``--no-settle``: after the control and again at the
   end, the daemon's open file descriptors are watched until the API connections it still
   holds have closed (up to 90 s; the API's keep-alive timeout is 60 s), and RSS is read
   again. The file descriptor count is reported with each reading.

Usage::

    python bench/resources.py                  # 100,000 messages, 10,000 contacts, 1 run
    python bench/resources.py --quick          # 10,000 messages (scaled), 1,000 contacts
    python bench/resources.py --messages 50000 --contacts 5000 --runs 3

One run is the default: RSS and file sizes vary little between runs (the work is the same
every time), unlike the timing benchmarks. Figures are MiB (2**20 bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from http.client import HTTPException
from pathlib import Path
from typing import Any, Final

import trio

from p2pnode.api.client import ApiClient, ApiClientError, DaemonNotRunning
from p2pnode.clock import wall_clock_ms
from p2pnode.dht.records import PeerRecord
from p2pnode.home import NodeHome
from p2pnode.identity import Identity
from p2pnode.keystore import load_identity
from p2pnode.node import NodeConfig, NodeService, StaticDirectory
from p2pnode.nodeid import NodeId
from p2pnode.store import Store
from p2pnode.testnet import Testnet, TestNode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import benchlib

#: Packages whose versions the result file records.
PACKAGES = ("p2pnode", "trio", "hypercorn", "starlette", "pynacl")

HERE: Final = Path(__file__).resolve().parent
DEFAULT_JSON: Final = HERE / "results-resources.json"
MIB: Final = 1024 * 1024
#: Bytes of every message body.
BODY_SIZE: Final = 100
#: Concurrent sending tasks in the in-process sender.
SEND_CONCURRENCY: Final = 200
#: Concurrent API clients adding contacts.
CONTACT_CLIENTS: Final = 4
#: Messages the per-message database figure is scaled to.
PER_MESSAGES: Final = 100_000
#: Seconds to wait for the daemon's lingering API connections to close (hypercorn's
#: keep-alive timeout is 60 s in p2pnode.api.server).
SETTLE_TIMEOUT_S: Final = 90.0
#: Seconds the message phase may take before the run is abandoned.
DELIVERY_TIMEOUT_S: Final = 1800.0


# --- helpers ---------------------------------------------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of process ``pid`` in MiB, and its open file
    descriptors (``fds``: every API connection still open holds one)."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / MIB  # the kernel says kB (KiB)
    return {
        "rss_mib": values["VmRSS"],
        "hwm_mib": values["VmHWM"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


async def wait_connections_closed(pid: int, fds: int) -> float | None:
    """Wait until process ``pid`` holds no more than ``fds`` file descriptors again (the API
    connections it still holds have closed); the seconds it took, or None after
    SETTLE_TIMEOUT_S."""
    start = time.perf_counter()
    with trio.move_on_after(SETTLE_TIMEOUT_S):
        while memory(pid)["fds"] > fds:
            await trio.sleep(0.5)
        return time.perf_counter() - start
    return None


def db_files(home: Path) -> dict[str, int]:
    """Sizes in bytes of the daemon's SQLite files (0 for one that does not exist)."""
    database = NodeHome(home).database
    sizes = {}
    for suffix, name in (("", "db"), ("-wal", "wal"), ("-shm", "shm")):
        try:
            sizes[name] = os.stat(f"{database}{suffix}").st_size
        except FileNotFoundError:
            sizes[name] = 0
    sizes["total"] = sizes["db"] + sizes["wal"] + sizes["shm"]
    return sizes


def pid_of(node: TestNode) -> int:
    """The process id of a running daemon of the testnet."""
    assert node.process is not None
    return int(node.process.pid)


# --- phases ----------------------------------------------------------------------------------


async def message_phase(net: Testnet, count: int, workdir: Path) -> dict[str, Any]:
    """A fresh daemon receives ``count`` messages from an in-process sender; memory and file
    sizes idle, linked, loaded and after a clean stop."""
    receiver = net[0]
    pid = pid_of(receiver)
    out: dict[str, Any] = {"started": memory(pid)}
    # The receiver's signed record, made from its own keys (the DHT has its own benchmark).
    host, _, port = (receiver.links or "").rpartition(":")
    receiver_identity = load_identity(NodeHome(receiver.home), None, wall_clock_ms())
    record = PeerRecord.create(receiver_identity, [(host, int(port))], 1, wall_clock_ms())
    key = receiver.identity_key
    store = Store.open(workdir / "sender.db")
    sender = NodeService(
        Identity.generate(wall_clock_ms()),
        store,
        StaticDirectory({key: record}),
        config=NodeConfig(),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            first = await sender.send(key, b"warm-up")
            await sender.wait_for_outcome(first)
            out["linked"] = memory(pid)
            out["files_linked"] = db_files(receiver.home)
            body = os.urandom(BODY_SIZE)
            delivered_before = sender.stats["delivered"]
            start = time.perf_counter()

            async def send_many(n: int) -> None:
                for _ in range(n):
                    await sender.send(key, body)

            async with trio.open_nursery() as senders:
                per_task, extra = divmod(count, SEND_CONCURRENCY)
                for index in range(SEND_CONCURRENCY):
                    n = per_task + (1 if index < extra else 0)
                    if n:
                        senders.start_soon(send_many, n)
            with trio.fail_after(DELIVERY_TIMEOUT_S):
                while sender.stats["delivered"] - delivered_before < count:
                    await trio.sleep(0.05)
            out["receive_seconds"] = time.perf_counter() - start
            out["loaded"] = memory(pid)
            out["files_loaded"] = db_files(receiver.home)
            status = await receiver.status()
            out["receiver_unread"] = status["unread"]
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    out["exit_status"] = await receiver.stop()
    out["files_stopped"] = db_files(receiver.home)
    return out


def api_requests(node: TestNode, count: int, *, contacts: bool) -> float:
    """``count`` API requests from CONTACT_CLIENTS threads; returns the seconds they took.
    With ``contacts``, each adds a contact (``POST /v1/contacts``, a random node ID named
    ``c00000``...); without, each is the same request with an empty name, which the daemon
    answers 400 (the control: the same connections and requests, nothing stored).

    Raises:
        RuntimeError: if a request fails.
    """
    lock = threading.Lock()
    next_index = 0
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal next_index
        client = ApiClient(node.api_socket)
        try:
            while True:
                with lock:
                    if next_index >= count:
                        return
                    index = next_index
                    next_index += 1
                node_id = str(NodeId.from_key(os.urandom(32)))
                if contacts:
                    client.request("POST", "/v1/contacts", {"name": f"c{index:05d}", "id": node_id})
                    continue
                try:  # the control: an empty name is refused before anything is stored
                    client.request("POST", "/v1/contacts", {"name": "", "id": node_id})
                except ApiClientError as exc:
                    if exc.status != 400:
                        raise
                else:
                    raise RuntimeError("the daemon accepted a contact with an empty name")
        except (OSError, HTTPException, ApiClientError, DaemonNotRunning, RuntimeError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(CONTACT_CLIENTS)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"an API request failed: {errors[0]!r}")
    return time.perf_counter() - start


async def contact_phase(net: Testnet, count: int, *, settle: bool) -> dict[str, Any]:
    """A fresh daemon: memory after ``count`` API requests that store nothing (the control),
    then after ``count`` contacts added and after listing them. With ``settle``, memory is
    read again once the API connections the daemon still holds have closed, after the control
    and at the end."""
    node = await net.add_node()
    pid = pid_of(node)
    out: dict[str, Any] = {"fresh": memory(pid)}
    fds = int(out["fresh"]["fds"])
    out["control_seconds"] = await trio.to_thread.run_sync(
        lambda: api_requests(node, count, contacts=False)
    )
    out["control"] = memory(pid)
    if settle:
        out["control_settle_seconds"] = await wait_connections_closed(pid, fds)
        out["control_settled"] = memory(pid)
    out["files_before"] = db_files(node.home)
    out["add_seconds"] = await trio.to_thread.run_sync(
        lambda: api_requests(node, count, contacts=True)
    )
    out["added"] = memory(pid)
    out["files_added"] = db_files(node.home)
    listed = await node.api("GET", "/v1/contacts", timeout=120)
    if len(listed) != count:
        raise RuntimeError(f"{len(listed)} contacts listed, {count} added")
    out["listed"] = memory(pid)
    if settle:
        out["settle_seconds"] = await wait_connections_closed(pid, fds)
        out["settled"] = memory(pid)
    return out


async def one_run(messages: int, contacts: int, settle: bool) -> dict[str, Any]:
    """Both phases on fresh daemons in a temporary root."""
    with tempfile.TemporaryDirectory(prefix="p2pnode-res-") as tmp:
        async with Testnet(1, root=Path(tmp) / "net") as net:
            run = {"messages": await message_phase(net, messages, Path(tmp))}
            run["contacts"] = await contact_phase(net, contacts, settle=settle)
    return run


# --- the driver ------------------------------------------------------------------------------


def flatten(run: dict[str, Any], messages: int, contacts: int) -> dict[str, float | None]:
    """The figures of one run, flat (see bench/README.md for each name); None for a wait that
    ran out of time."""
    m, c = run["messages"], run["contacts"]
    scale = PER_MESSAGES / messages
    flat: dict[str, float | None] = {
        "rss_started_mib": m["started"]["rss_mib"],
        "rss_idle_linked_mib": m["linked"]["rss_mib"],
        "rss_after_messages_mib": m["loaded"]["rss_mib"],
        "hwm_after_messages_mib": m["loaded"]["hwm_mib"],
        "rss_growth_per_100k_messages_mib": (m["loaded"]["rss_mib"] - m["linked"]["rss_mib"])
        * scale,
        "receive_per_s": messages / m["receive_seconds"],
        "db_bytes_linked": m["files_linked"]["total"],
        "db_bytes_after_messages": m["files_loaded"]["db"],
        "wal_bytes_after_messages": m["files_loaded"]["wal"],
        "shm_bytes_after_messages": m["files_loaded"]["shm"],
        "files_total_bytes_after_messages": m["files_loaded"]["total"],
        "db_bytes_after_stop": m["files_stopped"]["db"],
        "wal_bytes_after_stop": m["files_stopped"]["wal"],
        "db_mib_per_100k_messages_running": (m["files_loaded"]["db"] - m["files_linked"]["db"])
        * scale
        / MIB,
        "db_mib_per_100k_messages_after_stop": (
            m["files_stopped"]["total"] - m["files_linked"]["total"]
        )
        * scale
        / MIB,
        "bytes_per_message_after_stop": (m["files_stopped"]["total"] - m["files_linked"]["total"])
        / messages,
        "rss_contacts_fresh_mib": c["fresh"]["rss_mib"],
        "fds_contacts_fresh": c["fresh"]["fds"],
        "rss_after_control_requests_mib": c["control"]["rss_mib"],
        "fds_after_control_requests": c["control"]["fds"],
        "rss_with_contacts_mib": c["added"]["rss_mib"],
        "fds_with_contacts": c["added"]["fds"],
        "rss_contacts_listed_mib": c["listed"]["rss_mib"],
        "hwm_contacts_listed_mib": c["listed"]["hwm_mib"],
        "rss_growth_contacts_unsettled_mib": c["added"]["rss_mib"] - c["control"]["rss_mib"],
        "contacts_files_growth_bytes": c["files_added"]["total"] - c["files_before"]["total"],
        "contacts_add_per_s": contacts / c["add_seconds"],
    }
    if "settled" in c:
        flat |= {
            "rss_after_control_settled_mib": c["control_settled"]["rss_mib"],
            "control_settle_seconds": c["control_settle_seconds"],
            "rss_contacts_settled_mib": c["settled"]["rss_mib"],
            "fds_contacts_settled": c["settled"]["fds"],
            "settle_seconds": c["settle_seconds"],
            "rss_growth_contacts_mib": c["settled"]["rss_mib"] - c["control_settled"]["rss_mib"],
        }
    return flat


def print_table(r: dict[str, Any], messages: int, contacts: int) -> None:
    """The human-readable summary."""

    def row(label: str, rss: str, peak: str | None = None, fds: str | None = None) -> None:
        if r.get(rss) is None:
            return  # not measured in this configuration
        cells = [f"{r[rss]:>8.1f}"]
        cells.append(f"{r[peak]:>8.1f}" if peak and r.get(peak) is not None else f"{'':>8}")
        cells.append(f"{r[fds]:>6.0f}" if fds and r.get(fds) is not None else f"{'':>6}")
        print(f"{label:<46} {' '.join(cells)}".rstrip())

    print(f"{'daemon RSS (MiB)':<46} {'RSS':>8} {'peak':>8} {'fds':>6}")
    row("just started", "rss_started_mib")
    row("idle, linked", "rss_idle_linked_mib")
    row(f"after {messages:,} messages received", "rss_after_messages_mib", "hwm_after_messages_mib")
    row("fresh daemon", "rss_contacts_fresh_mib", fds="fds_contacts_fresh")
    row(
        f"... after {contacts:,} refused POSTs (control)",
        "rss_after_control_requests_mib",
        fds="fds_after_control_requests",
    )
    row("... once those connections closed", "rss_after_control_settled_mib")
    row(f"... then {contacts:,} contacts added", "rss_with_contacts_mib", fds="fds_with_contacts")
    row("... and listed once", "rss_contacts_listed_mib", "hwm_contacts_listed_mib")
    row("... once the connections closed", "rss_contacts_settled_mib", fds="fds_contacts_settled")
    scaled = "" if messages == PER_MESSAGES else f" (scaled from {messages:,})"
    print()
    print(f"database per 100,000 messages received{scaled}:")
    print(
        f"  running: node.db grew {r['db_mib_per_100k_messages_running']:.1f} MiB; the files "
        f"are now db {r['db_bytes_after_messages'] / MIB:.1f} + wal "
        f"{r['wal_bytes_after_messages'] / MIB:.1f} + shm "
        f"{r['shm_bytes_after_messages'] / MIB:.2f} MiB (not scaled)"
    )
    print(
        f"  after a clean stop (WAL checkpointed): {r['db_mib_per_100k_messages_after_stop']:.1f} "
        f"MiB, {r['bytes_per_message_after_stop']:.0f} bytes per message"
    )
    print(
        f"received at {r['receive_per_s']:.0f} msg/s; "
        f"contacts added at {r['contacts_add_per_s']:.0f}/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=None, help="messages received (100000)")
    parser.add_argument("--contacts", type=int, default=None, help="contacts added (10000)")
    parser.add_argument("--runs", type=int, default=1, help="runs; medians are reported (1)")
    parser.add_argument(
        "--quick", action="store_true", help="10,000 messages, 1,000 contacts, no settling"
    )
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="do not wait for lingering API connections to close (up to 2 x 60 s)",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args()
    messages = args.messages or (10_000 if args.quick else 100_000)
    contacts = args.contacts or (1_000 if args.quick else 10_000)
    settle = not (args.quick or args.no_settle)

    print(
        f"resources benchmark: {messages} messages, {contacts} contacts, {args.runs} run(s)",
        flush=True,
    )
    raw, flat = [], []
    for index in range(args.runs):
        run = trio.run(one_run, messages, contacts, settle)
        raw.append(run)
        flat.append(flatten(run, messages, contacts))
        f = flat[-1]
        print(
            f"run {index + 1}: RSS idle {f['rss_idle_linked_mib']:.1f} MiB, after messages "
            f"{f['rss_after_messages_mib']:.1f} MiB, with contacts "
            f"{f['rss_with_contacts_mib']:.1f} MiB; "
            f"{f['db_mib_per_100k_messages_after_stop']:.1f} MiB db per 100k messages",
            flush=True,
        )
    results: dict[str, float | None] = {}
    for name in flat[0]:
        values = [v for f in flat if (v := f[name]) is not None]
        results[name] = statistics.median(values) if values else None
        results[f"{name}_min"] = min(values) if values else None
        results[f"{name}_max"] = max(values) if values else None

    print()
    print_table(results, messages, contacts)
    report = {
        "benchmark": "resources",
        "date": time.strftime("%Y-%m-%d"),
        "machine": benchlib.machine(PACKAGES),
        "config": {
            "messages": messages,
            "contacts": contacts,
            "runs": args.runs,
            "quick": args.quick,
            "body_bytes": BODY_SIZE,
            "per_100k_scaled_from_messages": messages,
            "per_100k_is_scaled": messages != PER_MESSAGES,
            "sender": "in-process NodeService, receiver's record given directly",
            "contact_clients": CONTACT_CLIENTS,
            "settle": settle,
            "settle_timeout_s": SETTLE_TIMEOUT_S,
            "units": "RSS in MiB (2**20 bytes), files in bytes unless the name says mib",
            "source": benchlib.source(),
        },
        "results": results,
        "raw": raw,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
