"""Transport peer benchmark: py-libp2p (TCP + Noise + Yamux) between two processes on loopback.

Measures what GUIDE section 4 quotes for py-libp2p 0.8.1, with the same 100-byte messages that
``bench/messaging.py`` sends through p2pnode, over ONE stream between TWO processes on
127.0.0.1:

- one-way throughput, two ways: (a) plain streaming, counted as messages read by the receiver;
  (b) every message acknowledged by the receiver with a small ack, the sender keeping a window
  of ``--window`` messages outstanding (comparable to p2pnode, which delivers with a receipt per
  message);
- the request/reply round trip of one 100 B message at a time (the receiver echoes it), p50/p99;
- the connect time, from dial through Noise and Yamux until a stream is open, over ``--connects``
  fresh connections, p50/p99, with the library's defaults and with
  ``max_connections_per_peer=1`` (which ends a 250 ms wait inside the library's dial).

Usage (with the project's virtualenv; py-libp2p itself goes into its own one)::

    .venv/bin/python bench/peers/libp2p_bench.py            # 20000 messages, 500 RTTs, 3 runs
    .venv/bin/python bench/peers/libp2p_bench.py --quick    # 3000 messages, 200 RTTs, 1 run

On first use it creates ``bench/.venvs/libp2p`` with ``python -m venv`` and installs the pinned
``libp2p==0.8.1`` there (never into the project's virtualenv). Each run starts
``libp2p_worker.py listen`` and ``libp2p_worker.py dial`` with that virtualenv's Python; each
worker reports one JSON line on stdout. Figures are medians over ``--runs`` runs, with min/max.
See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not a package
import benchlib

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
WORKER = HERE / "libp2p_worker.py"
VENV = BENCH / ".venvs" / "libp2p"
DEFAULT_JSON = BENCH / "results-libp2p.json"
#: The pinned peer implementation.
LIBP2P_VERSION = "0.8.1"
REQUIREMENT = f"libp2p=={LIBP2P_VERSION}"
#: Seconds allowed for creating the virtualenv and for installing into it.
VENV_TIMEOUT = 300.0
PIP_TIMEOUT = 1200.0
#: Seconds the listener may take to print its address, and to exit once told to.
STARTUP_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 20.0
#: Message size (the worker's ``MESSAGE_SIZE``; fixed, as in GUIDE section 4).
MESSAGE_SIZE = 100
#: What GUIDE section 4 quotes, printed next to the measurement.
GUIDE_FIGURES = "~3,200-3,500 msg/s; RTT p50 1.14 ms, p99 2.1 ms; 252 ms to connect"

#: The keys of ``results`` (each also with ``_min`` and ``_max`` across runs).
RESULT_FIELDS = {
    "one_way_per_s": "(a) plain streaming: messages read by the receiver per second",
    "acked_per_s": "(b) messages acknowledged per second, --window outstanding",
    "rtt_p50_ms": "request/reply round trip of one 100 B message, median",
    "rtt_p99_ms": "request/reply round trip, 99th percentile (nearest rank)",
    "connect_p50_ms": "fresh connection to an open stream, library defaults, median",
    "connect_p99_ms": "the same, 99th percentile (nearest rank)",
    "connect_dial_p50_ms": "of that, host.connect (dial + Noise + Yamux), median",
    "connect_stream_p50_ms": "of that, new_stream (Yamux stream + protocol select), median",
    "connect_one_conn_p50_ms": "fresh connection to an open stream, max_connections_per_peer=1",
    "connect_one_conn_p99_ms": "the same, 99th percentile (nearest rank)",
    "connect_one_conn_dial_p50_ms": "of that, host.connect, median",
    "connect_one_conn_stream_p50_ms": "of that, new_stream, median",
    "first_connect_ms": "the benchmark connection's own connect + new_stream (defaults)",
    "one_way_sender_cpu_us_per_msg": "sender process CPU per message in (a), microseconds",
    "acked_sender_cpu_us_per_msg": "sender process CPU per message in (b), microseconds",
}


class WorkerError(RuntimeError):
    """A worker failed, timed out or printed something unexpected."""


# --- the peer virtualenv ---------------------------------------------------------------------


def venv_python() -> Path:
    """The peer virtualenv's interpreter (it may not exist yet)."""
    return VENV / "bin" / "python"


def installed_version(python: Path) -> str | None:
    """The ``libp2p`` version installed for ``python``, or None if none is (or it fails)."""
    if not python.exists():
        return None
    try:
        completed = subprocess.run(
            [python, "-c", "from importlib.metadata import version; print(version('libp2p'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def ensure_venv() -> tuple[Path | None, str | None]:
    """Create ``bench/.venvs/libp2p`` and install :data:`REQUIREMENT` into it if needed.

    Returns ``(python, None)`` when the pinned version is installed, else ``(None, reason)``
    with the last lines of the failing command's output.
    """
    python = venv_python()
    if installed_version(python) == LIBP2P_VERSION:
        return python, None
    steps: list[list[str | Path]] = []
    if not python.exists():
        steps.append([sys.executable, "-m", "venv", VENV])
    steps.append([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", REQUIREMENT])
    for command in steps:
        print(f"setting up the peer virtualenv: {' '.join(map(str, command[1:]))}", flush=True)
        limit = VENV_TIMEOUT if command[0] == sys.executable else PIP_TIMEOUT
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=limit, check=False
            )
        except subprocess.TimeoutExpired:
            return None, f"{' '.join(map(str, command[1:]))}: no result in {limit:.0f} s"
        if completed.returncode != 0:
            lines = (completed.stdout + completed.stderr).strip().splitlines()
            tail = [line for line in lines if not line.startswith("WARNING:")][-8:] or lines[-8:]
            return None, f"{' '.join(map(str, command[1:]))} failed: " + " | ".join(tail)
    found = installed_version(python)
    if found != LIBP2P_VERSION:
        return None, f"after installing {REQUIREMENT}, the virtualenv has libp2p {found}"
    return python, None


# --- one run ---------------------------------------------------------------------------------


class LineReader:
    """Reads a child's stdout lines on a thread, so the driver can wait with a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def next_json(self, timeout: float) -> dict[str, Any]:
        """The next line that is a JSON object; :class:`WorkerError` on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise WorkerError(f"the listener printed nothing in {timeout:.0f} s") from None
            if line is None:
                raise WorkerError("the listener exited before printing its result")
            if line.startswith("{"):
                record: dict[str, Any] = json.loads(line)
                return record


def stderr_tail(handle: IO[bytes], lines: int = 8) -> str:
    """The last ``lines`` lines written to a child's stderr file."""
    handle.seek(0)
    text = handle.read().decode("utf-8", "replace").strip().splitlines()
    return " | ".join(text[-lines:])


def run_timeout(options: argparse.Namespace) -> float:
    """Seconds a whole dialer run may take (generous; each phase has its own limit too)."""
    return 120.0 + options.messages / 100 + options.rtt / 20 + options.connects * 10


def one_run(python: Path, options: argparse.Namespace) -> dict[str, Any]:
    """Start a listener and a dialer, return the dialer's samples plus the listener's report.

    Both processes are stopped before this returns, whatever happens; a failure raises
    :class:`WorkerError` with the tail of the failing worker's stderr.
    """
    limit = run_timeout(options)
    with tempfile.TemporaryFile() as listener_err:
        listener = subprocess.Popen(
            [python, WORKER, "listen", "--lifetime", str(limit + STARTUP_TIMEOUT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=listener_err,
            text=True,
        )
        try:
            assert listener.stdout is not None and listener.stdin is not None
            lines = LineReader(listener.stdout)
            try:
                ready = lines.next_json(STARTUP_TIMEOUT)
            except WorkerError as error:
                raise WorkerError(f"{error}: {stderr_tail(listener_err)}") from None
            command = [
                python,
                WORKER,
                "dial",
                ready["addr"],
                "--messages",
                str(options.messages),
                "--rtt",
                str(options.rtt),
                "--connects",
                str(options.connects),
                "--window",
                str(options.window),
                "--timeout",
                str(limit / 2),
            ]
            try:
                dialer = subprocess.run(
                    command, capture_output=True, text=True, timeout=limit, check=False
                )  # run() kills the dialer if it times out
            except subprocess.TimeoutExpired:
                raise WorkerError(f"the dialer did not finish in {limit:.0f} s") from None
            if dialer.returncode != 0:
                tail = " | ".join(dialer.stderr.strip().splitlines()[-8:])
                raise WorkerError(f"the dialer failed ({dialer.returncode}): {tail}")
            result: dict[str, Any] = json.loads(dialer.stdout.strip().splitlines()[-1])
            result["rtt_ms"] = [round(sample, 4) for sample in result["rtt_ms"]]
            for samples in result["connects"].values():
                for sample in samples:
                    for key, value in sample.items():
                        sample[key] = round(value, 3)
            listener.stdin.close()
            result["listener"] = lines.next_json(SHUTDOWN_TIMEOUT)
            listener.wait(timeout=SHUTDOWN_TIMEOUT)
            return result
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.wait(timeout=SHUTDOWN_TIMEOUT)


# --- summaries -------------------------------------------------------------------------------


def summarise(run: dict[str, Any]) -> dict[str, float]:
    """The :data:`RESULT_FIELDS` of one run."""
    default = run["connects"]["default"]
    single = run["connects"]["one_conn_per_peer"]

    def column(samples: list[dict[str, float]], key: str) -> list[float]:
        return [sample[key] for sample in samples]

    one_way, acked = run["one_way"], run["acked"]
    return {
        "one_way_per_s": one_way["per_s"],
        "acked_per_s": acked["per_s"],
        "rtt_p50_ms": benchlib.percentile(run["rtt_ms"], 0.50),
        "rtt_p99_ms": benchlib.percentile(run["rtt_ms"], 0.99),
        "connect_p50_ms": benchlib.percentile(column(default, "total_ms"), 0.50),
        "connect_p99_ms": benchlib.percentile(column(default, "total_ms"), 0.99),
        "connect_dial_p50_ms": benchlib.percentile(column(default, "connect_ms"), 0.50),
        "connect_stream_p50_ms": benchlib.percentile(column(default, "new_stream_ms"), 0.50),
        "connect_one_conn_p50_ms": benchlib.percentile(column(single, "total_ms"), 0.50),
        "connect_one_conn_p99_ms": benchlib.percentile(column(single, "total_ms"), 0.99),
        "connect_one_conn_dial_p50_ms": benchlib.percentile(column(single, "connect_ms"), 0.50),
        "connect_one_conn_stream_p50_ms": benchlib.percentile(
            column(single, "new_stream_ms"), 0.50
        ),
        "first_connect_ms": run["first_connect_ms"],
        "one_way_sender_cpu_us_per_msg": 1e6 * one_way["sender_cpu_s"] / one_way["messages"],
        "acked_sender_cpu_us_per_msg": 1e6 * acked["sender_cpu_s"] / acked["messages"],
    }


def combine(summaries: list[dict[str, float]]) -> dict[str, float]:
    """Median of each field over the runs, plus ``<field>_min`` and ``<field>_max``."""
    combined: dict[str, float] = {}
    for name in RESULT_FIELDS:
        values = [summary[name] for summary in summaries]
        combined[name] = statistics.median(values)
        combined[f"{name}_min"] = min(values)
        combined[f"{name}_max"] = max(values)
    return combined


def print_table(results: dict[str, Any], runs: int, window: int) -> None:
    """The medians (and min-max over runs) as a short table."""

    def row(label: str, name: str, unit: str, digits: int) -> None:
        value, low, high = results[name], results[f"{name}_min"], results[f"{name}_max"]
        print(
            f"  {label:<44} {value:>10,.{digits}f} {unit:<6} "
            f"[{low:,.{digits}f} - {high:,.{digits}f}]"
        )

    print(
        f"\npy-libp2p {LIBP2P_VERSION}, {results['transport']} + {results['security']} + "
        f"{results['muxer']}, {MESSAGE_SIZE} B messages, median of {runs} run(s) [min - max]"
    )
    row("(a) one-way streaming, read by receiver", "one_way_per_s", "msg/s", 0)
    row(f"(b) acked, window {window}", "acked_per_s", "msg/s", 0)
    row("round trip p50", "rtt_p50_ms", "ms", 3)
    row("round trip p99", "rtt_p99_ms", "ms", 3)
    row("connect to open stream p50 (defaults)", "connect_p50_ms", "ms", 1)
    row("connect to open stream p99 (defaults)", "connect_p99_ms", "ms", 1)
    row("connect p50, max_connections_per_peer=1", "connect_one_conn_p50_ms", "ms", 1)
    row("connect p99, max_connections_per_peer=1", "connect_one_conn_p99_ms", "ms", 1)
    print(f"  GUIDE section 4 quotes: {GUIDE_FIGURES}")


# --- main ------------------------------------------------------------------------------------


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the JSON report (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def main() -> int:
    """Run the benchmark; returns the exit status (1 if skipped or no run completed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=None, help="per throughput run (20000)")
    parser.add_argument("--rtt", type=int, default=None, help="timed round trips per run (500)")
    parser.add_argument("--connects", type=int, default=None, help="fresh connections (20)")
    parser.add_argument("--runs", type=int, default=None, help="runs; medians reported (3)")
    parser.add_argument("--window", type=int, default=64, help="outstanding messages in (b)")
    parser.add_argument("--quick", action="store_true", help="3000 messages, 200 RTTs, 5, 1 run")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    options = parser.parse_args()
    quick = {"messages": 3000, "rtt": 200, "connects": 5, "runs": 1}
    full = {"messages": 20_000, "rtt": 500, "connects": 20, "runs": 3}
    for name, value in (quick if options.quick else full).items():
        if getattr(options, name) is None:
            setattr(options, name, value)

    config = {
        "implementation": REQUIREMENT,
        "venv": str(VENV.relative_to(BENCH.parent)),
        "message_bytes": MESSAGE_SIZE,
        "messages": options.messages,
        "rtt": options.rtt,
        "connects": options.connects,
        "runs": options.runs,
        "window": options.window,
        "quick": options.quick,
    }
    report: dict[str, Any] = {
        "benchmark": "transport-peer-libp2p",
        "date": time.strftime("%Y-%m-%d"),
        "machine": benchlib.machine(),
        "config": config,
    }
    python, reason = ensure_venv()
    if python is None:
        print(f"skipped: {reason}", file=sys.stderr)
        report |= {"results": {}, "raw": [], "skipped": reason}
        write_report(options.json, report)
        return 1

    print(
        f"py-libp2p transport benchmark: {options.messages} messages, {options.rtt} round "
        f"trips, {options.connects} connects per configuration, {options.runs} run(s)"
    )
    raw: list[dict[str, Any]] = []
    failures: list[str] = []
    for index in range(options.runs):
        began = time.perf_counter()
        load_before = os.getloadavg()[0]
        try:
            run = one_run(python, options)
        except (WorkerError, subprocess.TimeoutExpired, json.JSONDecodeError, KeyError) as error:
            failures.append(f"run {index + 1}: {error}")
            print(f"  ! run {index + 1} failed: {error}", file=sys.stderr)
            continue
        run["wall_seconds"] = time.perf_counter() - began
        run["loadavg_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
        run["summary"] = summarise(run)
        raw.append(run)
        s = run["summary"]
        print(
            f"  run {index + 1}/{options.runs}: one-way {s['one_way_per_s']:,.0f} msg/s, "
            f"acked {s['acked_per_s']:,.0f} msg/s, RTT p50 {s['rtt_p50_ms']:.2f} ms "
            f"p99 {s['rtt_p99_ms']:.2f} ms, connect p50 {s['connect_p50_ms']:.1f} ms "
            f"({s['connect_one_conn_p50_ms']:.1f} ms with max_connections_per_peer=1), "
            f"wall {run['wall_seconds']:.0f} s, load {load_before:.1f}",
            flush=True,
        )

    if not raw:
        reason = "no run completed: " + "; ".join(failures)
        report |= {"results": {}, "raw": [], "skipped": reason}
        write_report(options.json, report)
        return 1
    connection = raw[0]["connection"]
    results: dict[str, Any] = {
        "runs_completed": len(raw),
        "transport": connection.get("transport"),
        "security": connection.get("security"),
        "muxer": connection.get("muxer"),
    }
    results |= combine([run["summary"] for run in raw])
    report["machine"]["peer_packages"] = raw[0]["versions"]
    report |= {
        "results": results,
        "fields": RESULT_FIELDS,
        "guide_section_4": GUIDE_FIGURES,
        "failures": failures,
        "raw": raw,
    }
    print_table(results, len(raw), options.window)
    write_report(options.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
