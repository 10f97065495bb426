"""DHT lookup benchmark on OpenDHT 4.4.2 (C++, through its ``opendht`` Python binding).

The workload of ``bench/dht_bench.py`` (N nodes on 127.0.0.1 in one process, each on its own
UDP socket, joining through up to 3 random earlier nodes; every node stores one value of the
size of a p2pnode peer record; then timed lookups, one at a time, of a random other node's
value), run on OpenDHT so that its figures can sit in one table with p2pnode's and the stock
``kademlia`` package's. Each run is a fresh ``bench/peers/opendht_worker.py`` process under
the Python of OpenDHT's own virtualenv, ``bench/.venvs/opendht``, which this script creates on
first use (``pip install opendht==4.4.2``). See ``bench/README.md``.

Usage (with the project's virtualenv, ``.venv/bin/python``)::

    python bench/peers/opendht_bench.py              # N = 20, 100, 1000; 200 lookups; 3 runs
    python bench/peers/opendht_bench.py --quick      # N = 20, 100; 50 lookups; 1 run
    python bench/peers/opendht_bench.py --sizes 20,100 --lookups 500 --runs 5 --json out.json

If the wheel does not install on this machine, the JSON file says ``"skipped"`` with the end
of pip's output and the script exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not a package
import benchlib

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
WORKER = HERE / "opendht_worker.py"
VENV = BENCH / ".venvs" / "opendht"
DEFAULT_JSON = BENCH / "results-opendht.json"
#: The measured release (GUIDE section 4 quotes this one); the wheel is cp311 manylinux x86_64.
PACKAGE = "opendht"
VERSION = "4.4.2"
#: Seconds creating the virtualenv and installing the wheel may take.
INSTALL_TIMEOUT = 900.0
#: Seconds the import check of an existing virtualenv may take.
CHECK_TIMEOUT = 60.0
#: Lines of pip's output kept in the JSON when the install fails.
PIP_TAIL_LINES = 15
#: Earlier nodes each newcomer bootstraps through (the worker's constant, for the config).
BOOTSTRAP_PEERS = 3
#: Seconds one lookup may take before it counts as failed (the worker's constant): a lookup
#: that timed out counts at this value in the percentiles, as in ``bench/dht_bench.py``.
LOOKUP_TIMEOUT = 30.0
#: Value size when p2pnode is not importable (about the size of a p2pnode peer record).
FALLBACK_VALUE_BYTES = 283


def venv_python() -> Path:
    """The interpreter of OpenDHT's virtualenv."""
    return VENV / "bin" / "python"


def installed_version() -> str | None:
    """The ``opendht`` version importable in the virtualenv, or None (no venv, no package, or
    the import failed)."""
    python = venv_python()
    if not python.exists():
        return None
    try:
        completed = subprocess.run(
            [str(python), "-c", "import opendht; print(opendht.version())"],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if completed.returncode != 0:
        return None
    return completed.stdout.strip() or None


def tail(text: str, lines: int = PIP_TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``text``."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def shown(command: list[str]) -> str:
    """A command for a message: the program's file name, then its arguments."""
    return " ".join([Path(command[0]).name, *command[1:]])


def ensure_venv() -> tuple[str | None, str | None]:
    """Make sure ``bench/.venvs/opendht`` exists and imports ``opendht`` at :data:`VERSION`.

    Returns ``(version, None)`` when it does, or ``(None, reason)`` when creating the venv or
    installing the pinned wheel failed; ``reason`` ends with the last lines of the failing
    command's output. Never raises for a failed install; each step is bounded by
    :data:`INSTALL_TIMEOUT`."""
    version = installed_version()
    if version == VERSION:
        return version, None
    steps: list[list[str]] = []
    if not venv_python().exists():
        steps.append([sys.executable, "-m", "venv", str(VENV)])
    steps.append(
        [
            str(venv_python()),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            f"{PACKAGE}=={VERSION}",
        ]
    )
    print(f"installing {PACKAGE}=={VERSION} into {VENV} ...", flush=True)
    for command in steps:
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or "") + (exc.stderr or "")
            if isinstance(output, bytes):
                output = output.decode(errors="replace")
            return None, f"{shown(command)} timed out after {INSTALL_TIMEOUT:.0f} s\n" + tail(
                output
            )
        except OSError as exc:
            return None, f"{command[0]} could not be started: {exc}"
        if completed.returncode != 0:
            return None, (
                f"{shown(command)} exited {completed.returncode}\n"
                + tail(completed.stdout + "\n" + completed.stderr)
            )
    version = installed_version()
    if version != VERSION:
        return None, f"after the install, the venv imports opendht version {version!r}"
    return version, None


def value_size() -> tuple[int, str]:
    """The value size of the workload: a p2pnode peer record's, as ``bench/dht_bench.py``
    gives the stock side; :data:`FALLBACK_VALUE_BYTES` when p2pnode is not importable."""
    try:
        from p2pnode.dht.records import PeerRecord  # noqa: PLC0415 (only the size is needed)
        from p2pnode.identity import Identity  # noqa: PLC0415
    except ImportError:
        return FALLBACK_VALUE_BYTES, "fallback (p2pnode not importable)"
    now = int(time.time() * 1000)
    record = PeerRecord.create(Identity.generate(now), [("127.0.0.1", 40000)], 1, now)
    return len(record.data), "p2pnode PeerRecord"


def run_worker(command: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Run one worker process, killed after ``timeout`` seconds; returns its JSON result (None
    if it produced none) and a note (empty, or why the run failed or how it ended)."""
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:  # subprocess.run has killed the worker
        return None, f"timed out after {timeout:.0f} s (worker killed)"
    lines = completed.stdout.strip().splitlines()
    result: dict[str, Any] | None = None
    if lines:
        try:
            parsed = json.loads(lines[-1])
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and "latencies" in parsed:
            result = parsed
    stderr_tail = tail(completed.stderr, 5)
    if result is None:
        return None, f"exit code {completed.returncode}, no result\n{stderr_tail}".strip()
    if completed.returncode != 0:
        return result, f"exit code {completed.returncode} after the result\n{stderr_tail}".strip()
    return result, ""


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """One run's figures, keyed as in ``bench/dht_bench.py``'s results: p50/p95 over every
    lookup (a lookup without an outcome counts at :data:`LOOKUP_TIMEOUT`), success rate
    (fraction), join and store seconds, fraction of puts OpenDHT reported done."""
    latencies = [LOOKUP_TIMEOUT if x is None else x for x in run["latencies"]]
    return {
        "p50_ms": 1000 * benchlib.percentile(latencies, 0.50),
        "p95_ms": 1000 * benchlib.percentile(latencies, 0.95),
        "success": sum(run["successes"]) / len(run["successes"]),
        "join_s": run["join_seconds"],
        "publish_s": run["publish_seconds"],
        "stores_ok": run["stores_reported_ok"] / run["nodes"],
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of every :func:`summarise` figure (the keys of ``dht_bench.py``), the
    number of runs, and the spread (min and max over runs) of p50, p95 and success."""
    summaries = [summarise(run) for run in runs]
    result: dict[str, Any] = {
        name: statistics.median(summary[name] for summary in summaries) for name in summaries[0]
    }
    result["runs"] = len(runs)
    for name in ("p50_ms", "p95_ms", "success"):
        result[f"{name}_min"] = min(summary[name] for summary in summaries)
        result[f"{name}_max"] = max(summary[name] for summary in summaries)
    return result


def raw_entry(run: dict[str, Any]) -> dict[str, Any]:
    """A run as kept in the JSON file: latencies in ms (None: no outcome in time), success
    count, and everything else the worker reported (as ``dht_bench.py`` keeps its runs)."""
    entry = {k: v for k, v in run.items() if k not in ("latencies", "successes")}
    entry["latencies_ms"] = [None if x is None else round(1000 * x, 3) for x in run["latencies"]]
    entry["successful_lookups"] = sum(run["successes"])
    return entry


def print_table(results: dict[str, dict[str, Any]], sizes: list[int]) -> None:
    """The human-readable table, in ``dht_bench.py``'s layout."""
    header = (
        f"{'N':>5}  {'impl':<8} {'p50 ms':>8} {'p95 ms':>8} {'success':>8} "
        f"{'join s':>7} {'store s':>8} {'runs':>4}"
    )
    print(header)
    print("-" * len(header))
    for size in sizes:
        row = results.get(str(size))
        if row is None:
            print(f"{size:>5}  {'opendht':<8} {'(no completed run)':>30}")
            continue
        print(
            f"{size:>5}  {'opendht':<8} {row['p50_ms']:>8.2f} {row['p95_ms']:>8.2f} "
            f"{100 * row['success']:>7.1f}% {row['join_s']:>7.1f} {row['publish_s']:>8.1f} "
            f"{row['runs']:>4}"
        )


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the JSON report (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def main() -> None:
    """Parse the options, install OpenDHT if needed, run the workers, write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 20,100,1000)")
    parser.add_argument("--lookups", type=int, default=None, help="lookups per run (200)")
    parser.add_argument("--runs", type=int, default=None, help="runs per N (3)")
    parser.add_argument("--quick", action="store_true", help="N = 20,100; 50 lookups; 1 run")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--seed", type=int, default=1, help="run i uses seed + i")
    parser.add_argument(
        "--until",
        choices=("first", "done"),
        default="first",
        help="a lookup ends at the first matching value (default) or at OpenDHT's done callback",
    )
    parser.add_argument(
        "--rate-limit", action="store_true", help="keep OpenDHT's default (per-IP) rate limits"
    )
    options = parser.parse_args()

    sizes = [
        int(s) for s in (options.sizes or ("20,100" if options.quick else "20,100,1000")).split(",")
    ]
    lookups = options.lookups or (50 if options.quick else 200)
    runs = options.runs or (1 if options.quick else 3)
    size_bytes, size_source = value_size()
    config: dict[str, Any] = {
        "sizes": sizes,
        "lookups": lookups,
        "runs": runs,
        "seed": options.seed,
        "bootstrap_peers": BOOTSTRAP_PEERS,
        "lookup_timeout_s": LOOKUP_TIMEOUT,
        "value_bytes": size_bytes,
        "value_bytes_source": size_source,
        "until": options.until,
        "rate_limit": options.rate_limit,
        "timeout_s": options.timeout,
        "package": f"{PACKAGE}=={VERSION}",
        "venv": str(VENV.relative_to(BENCH.parent)),
    }
    report: dict[str, Any] = {
        "benchmark": "dht-lookup-opendht",
        "date": datetime.date.today().isoformat(),
    }

    version, reason = ensure_venv()
    if version is None:
        print(f"skipped: {reason}", file=sys.stderr)
        report |= {
            "machine": benchlib.machine(extra={"packages": {PACKAGE: None}}),
            "config": config,
            "results": {},
            "raw": [],
            "skipped": f"{PACKAGE}=={VERSION} did not install: {reason}",
        }
        write_report(options.json, report)
        return

    raw: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    print(f"OpenDHT {version} lookup benchmark: sizes {sizes}, {lookups} lookups, {runs} run(s)")
    for size in sizes:
        for run_index in range(runs):
            seed = options.seed + run_index
            command = [
                str(venv_python()),
                str(WORKER),
                "--nodes",
                str(size),
                "--lookups",
                str(lookups),
                "--seed",
                str(seed),
                "--value-size",
                str(size_bytes),
                "--until",
                options.until,
            ]
            if options.rate_limit:
                command.append("--rate-limit")
            began = time.perf_counter()
            result, note = run_worker(command, options.timeout)
            if result is None:
                print(f"  ! N={size} run {run_index + 1}/{runs}: {note}", file=sys.stderr)
                failed.append({"nodes": size, "run": run_index + 1, "seed": seed, "reason": note})
                continue
            result["seed"] = seed
            result["wall_seconds"] = time.perf_counter() - began
            if note:
                result["note"] = note
            raw.append(result)
            summary = summarise(result)
            print(
                f"  N={size:<5} run {run_index + 1}/{runs}: "
                f"p50 {summary['p50_ms']:.2f} ms, p95 {summary['p95_ms']:.2f} ms, "
                f"success {100 * summary['success']:.1f} %, "
                f"wall {result['wall_seconds']:.0f} s",
                flush=True,
            )

    results: dict[str, dict[str, Any]] = {}
    for size in sizes:
        runs_here = [run for run in raw if run["nodes"] == size]
        if runs_here:
            results[str(size)] = median_of(runs_here)
    print()
    print_table(results, sizes)

    report |= {
        "machine": benchlib.machine(extra={"packages": {PACKAGE: version}}),
        "config": config,
        # Keyed like dht_bench.py's "results" (implementation, then N as a string).
        "results": {"opendht": results},
        "raw": [raw_entry(run) for run in raw],
    }
    if failed:
        report["failed_runs"] = failed
        missing = [size for size in sizes if str(size) not in results]
        if missing:
            report["skipped"] = f"no completed run for N = {missing}: see failed_runs"
    write_report(options.json, report)


if __name__ == "__main__":
    main()
