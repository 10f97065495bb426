"""User-facing surfaces benchmark: the ``p2pnode send`` command and the API's send throughput.

Everything runs against real ``p2pnode daemon`` processes: each run starts a fresh pair with
:class:`p2pnode.testnet.Testnet` (own homes, loopback, the first node is the DHT bootstrap of
the second), sends one warm-up message (DHT lookup and link set-up), then measures:

1. **CLI.** Wall time from process start to exit of ``p2pnode send --home H <recipient-id>
   <text>`` (the console script of the venv; by default it waits for the recipient's signed
   receipt), ``--cli-runs`` times. Interleaved with it, the same number of times, the floors it
   is made of: ``python -c pass`` (interpreter start-up), ``p2pnode --version`` (start-up and
   CLI import), ``p2pnode id`` (also reads the identity key file) and ``p2pnode status`` (one
   API round trip to the daemon).
2. **API.** ``POST /v1/messages`` over the Unix socket, as fast as possible, from K concurrent
   clients (threads, each with the project's own :class:`p2pnode.api.client.ApiClient`, which
   is what the CLI uses: stdlib ``http.client``, one connection per request), ``--api-messages``
   messages per K. Reported: messages/s accepted (each POST answers 202 after the durable
   outbox write) and messages/s delivered (until the sender's ``GET /v1/status`` counts all of
   them ``delivered``, i.e. every signed receipt verified and recorded; polled every
   :data:`POLL_S` seconds).

Usage::

    python bench/surfaces.py                       # 3 runs, 30 CLI sends, 5000 API messages
    python bench/surfaces.py --quick               # 1 run, 10 CLI sends, 500 API messages
    python bench/surfaces.py --cli-runs 50 --api-messages 2000 --clients 1,4,8 --runs 5

Results are medians over runs, with the min and max over runs; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.client import HTTPException
from pathlib import Path
from typing import Any, Final

import trio

from p2pnode.api.client import ApiClient, ApiClientError, DaemonNotRunning
from p2pnode.testnet import Testnet, TestNode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import benchlib

#: Packages whose versions the result file records.
PACKAGES = ("p2pnode", "trio", "hypercorn", "starlette", "pynacl", "click")

HERE: Final = Path(__file__).resolve().parent
DEFAULT_JSON: Final = HERE / "results-surfaces.json"
#: Seconds between polls of the sender's status while waiting for deliveries.
POLL_S: Final = 0.05
#: Seconds every delivered-count wait may take before the run is abandoned.
DELIVERY_TIMEOUT_S: Final = 600.0
#: Bytes of every message body sent (the same size as the messaging benchmark's).
BODY_SIZE: Final = 100
#: The commands timed alongside ``p2pnode send`` (name -> argument list after the program).
FLOORS: Final = ("python", "version", "id", "status")
#: Per-K API figures summarised over runs.
API_FIELDS: Final = (
    "accepted_per_s",
    "delivered_per_s",
    "post_ms_p50",
    "post_ms_p99",
    "client_cpu_share",
    "sender_daemon_cpu_share",
    "receiver_daemon_cpu_share",
    "sender_daemon_fds_after_accept",
)


# --- helpers ---------------------------------------------------------------------------------


def cli_program() -> Path:
    """The ``p2pnode`` console script next to this interpreter (what a user of the venv runs).

    Raises:
        SystemExit: if there is none (run this script with the project's ``.venv/bin/python``).
    """
    program = Path(sys.executable).parent / "p2pnode"
    if not program.exists():
        raise SystemExit(
            f"no p2pnode console script next to {sys.executable}; use .venv/bin/python"
        )
    return program


def timed_command(command: list[str]) -> float:
    """Run ``command`` to completion; its wall time in ms from spawn to exit.

    Raises:
        RuntimeError: if it exits with a non-zero status (its stderr is in the message).
    """
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, check=False)
    elapsed = (time.perf_counter() - start) * 1000
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {completed.returncode}: "
            f"{completed.stderr.decode(errors='replace').strip()[-500:]}"
        )
    return elapsed


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (from ``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid(node: TestNode) -> int:
    """The process id of a running daemon of the testnet."""
    assert node.process is not None
    return int(node.process.pid)


def delivered_count(client: ApiClient) -> int:
    """The sender's count of delivered messages (``GET /v1/status``)."""
    return int(client.request("GET", "/v1/status")["outbox"]["delivered"])


# --- the measurements ------------------------------------------------------------------------


def cli_timings(sender: TestNode, recipient: str, count: int) -> dict[str, list[float]]:
    """``count`` timed ``p2pnode send`` invocations, each preceded by one of every floor
    command (interleaved so that a slow phase of the machine hits all of them alike)."""
    program = str(cli_program())
    home = str(sender.home)
    commands = {
        "python": [sys.executable, "-c", "pass"],
        "version": [program, "--version"],
        "id": [program, "id", "--home", home],
        "status": [program, "status", "--home", home],
    }
    samples: dict[str, list[float]] = {name: [] for name in (*FLOORS, "send")}
    for index in range(count):
        for name in FLOORS:
            samples[name].append(timed_command(commands[name]))
        text = f"cli message {index}"
        samples["send"].append(timed_command([program, "send", "--home", home, recipient, text]))
    return samples


def api_throughput(
    sender: TestNode, receiver: TestNode, total: int, clients: int, body: bytes
) -> dict[str, Any]:
    """POST ``total`` messages from ``clients`` threads as fast as they go; time until all are
    accepted and until the sender counts all of them delivered. Also the CPU share (CPU
    seconds per wall second, 1.0 = one core) of this process and of both daemons.

    Raises:
        RuntimeError: if a POST fails, or not all are delivered within DELIVERY_TIMEOUT_S.
    """
    payload = {"to": receiver.id, "body_b64": base64.b64encode(body).decode()}
    status_client = ApiClient(sender.api_socket)
    before = delivered_count(status_client)
    lock = threading.Lock()
    claimed = 0
    latencies: list[float] = []
    errors: list[BaseException] = []
    go = threading.Event()

    def worker() -> None:
        nonlocal claimed
        client = ApiClient(sender.api_socket)
        mine: list[float] = []
        go.wait()
        try:
            while True:
                with lock:
                    if claimed >= total:
                        break
                    claimed += 1
                began = time.perf_counter()
                client.request("POST", "/v1/messages", payload)
                mine.append((time.perf_counter() - began) * 1000)
        except (OSError, HTTPException, ApiClientError, DaemonNotRunning) as exc:
            # Reported after the join, not lost in the thread.
            errors.append(exc)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    pids = {"sender": daemon_pid(sender), "receiver": daemon_pid(receiver)}
    daemon_cpu = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    cpu_before = time.process_time()
    start = time.perf_counter()
    go.set()
    for thread in threads:
        thread.join()
    accepted_at = time.perf_counter()
    sender_fds = len(os.listdir(f"/proc/{pids['sender']}/fd"))
    client_cpu = time.process_time() - cpu_before
    if errors:
        raise RuntimeError(f"a POST /v1/messages failed: {errors[0]!r}")
    deadline = start + DELIVERY_TIMEOUT_S
    while delivered_count(status_client) - before < total:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"not all {total} messages delivered within {DELIVERY_TIMEOUT_S} s")
        time.sleep(POLL_S)
    delivered_at = time.perf_counter()
    for name, pid in pids.items():
        daemon_cpu[name] = (process_cpu_seconds(pid) - daemon_cpu[name]) / (delivered_at - start)
    return {
        "clients": clients,
        "messages": total,
        "accepted_per_s": total / (accepted_at - start),
        "delivered_per_s": total / (delivered_at - start),
        "accept_seconds": accepted_at - start,
        "deliver_seconds": delivered_at - start,
        "post_ms_p50": benchlib.percentile(latencies, 0.50),
        "post_ms_p99": benchlib.percentile(latencies, 0.99),
        "client_cpu_share": client_cpu / (accepted_at - start),
        "sender_daemon_cpu_share": daemon_cpu["sender"],
        # API connections the client closed but the daemon still holds (see README).
        "sender_daemon_fds_after_accept": sender_fds,
        "receiver_daemon_cpu_share": daemon_cpu["receiver"],
    }


async def one_run(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh daemon pair: warm-up, CLI timings, API throughput for each K."""
    async with Testnet(2) as net:
        sender, receiver = net[0], net[1]
        began = time.perf_counter()
        warm = await sender.send(receiver, "warm-up")
        await sender.wait_delivered(warm, timeout=60)
        warm_up_ms = (time.perf_counter() - began) * 1000
        samples = await trio.to_thread.run_sync(cli_timings, sender, receiver.id, args.cli_runs)
        body = os.urandom(BODY_SIZE)
        api = []
        for clients in args.clients:
            api.append(
                await trio.to_thread.run_sync(
                    api_throughput, sender, receiver, args.api_messages, clients, body
                )
            )
    cli = {
        name: {
            "p50": benchlib.percentile(values, 0.50),
            "p99": benchlib.percentile(values, 0.99),
            "samples_ms": [round(v, 3) for v in values],
        }
        for name, values in samples.items()
    }
    return {"warm_up_send_ms": warm_up_ms, "cli_ms": cli, "api": api}


# --- the driver ------------------------------------------------------------------------------


def paired_differences(run: dict[str, Any]) -> dict[str, float]:
    """A run's start-up share of a CLI send, and the median over iterations of ``send``
    minus the ``--version`` and the ``status`` timed just before it in the same iteration
    (paired, so a slow phase of the machine cancels out)."""
    cli = run["cli_ms"]
    send = cli["send"]["samples_ms"]
    pairs = {
        name: [s - f for s, f in zip(send, cli[name]["samples_ms"], strict=True)]
        for name in ("version", "status")
    }
    return {
        "cli_send_startup_share": cli["version"]["p50"] / cli["send"]["p50"],
        "cli_send_minus_version_ms_p50": statistics.median(pairs["version"]),
        "cli_send_minus_status_ms_p50": statistics.median(pairs["status"]),
    }


def summarise(runs: list[dict[str, Any]], clients: list[int]) -> dict[str, float]:
    """Flat medians over runs, each with ``_min`` and ``_max`` over runs."""
    series: dict[str, list[float]] = {}
    for run in runs:
        for name in (*FLOORS, "send"):
            for q in ("p50", "p99"):
                series.setdefault(f"cli_{name}_ms_{q}", []).append(run["cli_ms"][name][q])
        # What part of a CLI send is the process start-up and CLI import (no daemon involved).
        for name, value in paired_differences(run).items():
            series.setdefault(name, []).append(value)
        for entry in run["api"]:
            k = entry["clients"]
            for field in API_FIELDS:
                series.setdefault(f"api_k{k}_{field}", []).append(entry[field])
    results: dict[str, float] = {}
    for name, values in series.items():
        results[name] = statistics.median(values)
        results[f"{name}_min"] = min(values)
        results[f"{name}_max"] = max(values)
    return results


def print_table(results: dict[str, float], clients: list[int]) -> None:
    """The human-readable summary."""
    print(f"{'command':<28} {'p50 ms':>8} {'p99 ms':>8}   (median over runs)")
    labels = {
        "python": "python -c pass",
        "version": "p2pnode --version",
        "id": "p2pnode id",
        "status": "p2pnode status",
        "send": "p2pnode send (waits receipt)",
    }
    for name, label in labels.items():
        p50, p99 = results[f"cli_{name}_ms_p50"], results[f"cli_{name}_ms_p99"]
        print(f"{label:<28} {p50:>8.1f} {p99:>8.1f}")
    print(
        f"start-up + import (--version) is {100 * results['cli_send_startup_share']:.0f} % of a "
        f"send; send - status = {results['cli_send_minus_status_ms_p50']:.1f} ms (paired)"
    )
    print()
    print(
        f"{'API clients':>11} {'accepted/s':>11} {'delivered/s':>12} {'POST p50 ms':>12} "
        f"{'CPU sender/receiver/client':>27}"
    )
    for k in clients:
        cpu = "/".join(
            f"{results[f'api_k{k}_{who}_cpu_share']:.2f}"
            for who in ("sender_daemon", "receiver_daemon", "client")
        )
        print(
            f"{k:>11} {results[f'api_k{k}_accepted_per_s']:>11.0f} "
            f"{results[f'api_k{k}_delivered_per_s']:>12.0f} "
            f"{results[f'api_k{k}_post_ms_p50']:>12.2f} {cpu:>27}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=None, help="fresh daemon pairs (3)")
    parser.add_argument("--cli-runs", type=int, default=None, help="timed CLI sends per run (30)")
    parser.add_argument(
        "--api-messages", type=int, default=None, help="messages per client count (5000)"
    )
    parser.add_argument("--clients", default="1,8", help="concurrent API clients, comma-separated")
    parser.add_argument("--quick", action="store_true", help="1 run, 10 CLI sends, 500 messages")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.cli_runs = args.cli_runs or (10 if args.quick else 30)
    args.api_messages = args.api_messages or (500 if args.quick else 5000)
    args.clients = [int(k) for k in args.clients.split(",")]
    cli_program()  # fail early

    print(
        f"surfaces benchmark: {args.runs} run(s), {args.cli_runs} CLI sends, "
        f"{args.api_messages} API messages per K in {args.clients}",
        flush=True,
    )
    runs = []
    for index in range(args.runs):
        run = trio.run(one_run, args)
        runs.append(run)
        api = ", ".join(
            f"K={e['clients']} {e['accepted_per_s']:.0f} accepted/s "
            f"{e['delivered_per_s']:.0f} delivered/s"
            for e in run["api"]
        )
        print(
            f"run {index + 1}: send p50 {run['cli_ms']['send']['p50']:.1f} ms "
            f"(status {run['cli_ms']['status']['p50']:.1f} ms); {api}",
            flush=True,
        )
    results = summarise(runs, args.clients)
    print()
    print_table(results, args.clients)
    report = {
        "benchmark": "surfaces",
        "date": time.strftime("%Y-%m-%d"),
        "machine": benchlib.machine(PACKAGES),
        "config": {
            "runs": args.runs,
            "cli_runs": args.cli_runs,
            "api_messages": args.api_messages,
            "clients": args.clients,
            "quick": args.quick,
            "body_bytes": BODY_SIZE,
            "status_poll_s": POLL_S,
            "api_client": "p2pnode.api.client.ApiClient (stdlib http.client over the Unix "
            "socket, one connection per request), one per thread",
            "cli": "the venv's p2pnode console script, --home of the sending daemon",
            "source": benchlib.source(),
        },
        "results": results,
        "raw": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
