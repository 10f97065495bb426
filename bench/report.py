"""Benchmark report: every benchmark's result file in one JSON file, BENCHMARKS.md and plots.

Reads ``bench/results-*.json`` and ``bench/sim/report.json`` and writes:

- ``bench/results.json``: ``{"date", "machine", "benchmarks": {name: that file's content},
  "status": {name: how it ran}, "targets": [...]}`` (see :func:`build_report`);
- ``BENCHMARKS.md`` at the repository root: machine, how to reproduce, the targets (met or
  missed, with the lead's profile summary from ``bench/profiles/<target>.md`` for a missed
  one), then one section per benchmark with its figures (median over runs and min-max);
- ``bench/plots/rtt.png``, ``dht.png`` and ``scaling.png`` (each only if its data exists).

A missing, unreadable or skipped result file never stops the report: that benchmark is shown
as "not run", "failed" or "skipped", and the targets that need it as not measured.

``make bench`` runs each benchmark through this script's ``--run`` mode, which records the
command's exit status and time in ``.run/bench/<name>.json``; the report then marks a
benchmark that failed as failed even when an older result file is still in place.

Usage::

    python bench/report.py                           # the report from the files in bench/
    python bench/report.py --run NAME -- CMD ARG...  # run one benchmark, record how it ended
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
import benchlib
import plots
from plots import Chart, Mark, Series

BENCH: Final = Path(__file__).resolve().parent
ROOT: Final = BENCH.parent
#: Where ``--run`` records how each benchmark command ended (git-ignored, ``make clean``).
RUNS_DIR: Final = ROOT / ".run" / "bench"
#: A result file whose modification time is this many seconds before its recorded run's
#: start was not written by that run.
MTIME_SLACK_S: Final = 1.0

OK: Final = "ok"
PARTIAL: Final = "partial"
SKIPPED: Final = "skipped"
FAILED: Final = "failed"
NOT_RUN: Final = "not run"
#: Statuses whose figures the report uses.
USABLE: Final = (OK, PARTIAL)


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its name in the report, result file (relative to ``bench/``), the
    command that makes it and a section title."""

    name: str
    file: str
    script: str
    title: str


BENCHMARKS: Final = (
    Benchmark("messaging", "results-messaging.json", "bench/messaging.py", "Messaging"),
    Benchmark("scaling", "results-scaling.json", "bench/scaling.py", "Scaling with senders"),
    Benchmark("surfaces", "results-surfaces.json", "bench/surfaces.py", "CLI and API"),
    Benchmark("resources", "results-resources.json", "bench/resources.py", "Resources"),
    Benchmark("dht", "results-dht.json", "bench/dht_bench.py", "DHT lookups"),
    Benchmark("opendht", "results-opendht.json", "bench/peers/opendht_bench.py", "OpenDHT"),
    Benchmark("libp2p", "results-libp2p.json", "bench/peers/libp2p_bench.py", "py-libp2p"),
    Benchmark("sim", "sim/report.json", "python -m p2pnode.sim", "DHT simulation"),
)


# --- reading values safely -------------------------------------------------------------------


def dig(obj: Any, *path: str | int) -> Any:
    """The value at ``path`` in nested dicts and lists, or None where any step is missing."""
    for key in path:
        if isinstance(obj, dict):
            obj = obj[key] if key in obj else obj.get(str(key))
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Figure:
    """One figure over runs: the median and, when known, the smallest and largest run."""

    median: float
    low: float | None = None
    high: float | None = None

    def scaled(self, factor: float) -> Figure:
        """The figure multiplied by ``factor``."""
        return Figure(
            self.median * factor,
            None if self.low is None else self.low * factor,
            None if self.high is None else self.high * factor,
        )


def spread_figure(obj: Any, *path: str | int) -> Figure | None:
    """A ``{"median", "min", "max"}`` dict (or a bare number) at ``path`` as a Figure."""
    value = dig(obj, *path)
    if isinstance(value, dict):
        median = number(value.get("median"))
        if median is None:
            return None
        return Figure(median, number(value.get("min")), number(value.get("max")))
    median = number(value)
    return None if median is None else Figure(median)


def flat_figure(results: Any, key: str) -> Figure | None:
    """A figure kept flat as ``key``, ``key_min`` and ``key_max`` in ``results``."""
    median = number(dig(results, key))
    if median is None:
        return None
    return Figure(median, number(dig(results, f"{key}_min")), number(dig(results, f"{key}_max")))


def nearest_rank(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty sequence (as ``dht_bench.py`` computes it)."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def over_runs(values: Sequence[float]) -> Figure | None:
    """Median, min and max of per-run values; None for no values."""
    if not values:
        return None
    return Figure(statistics.median(values), min(values), max(values))


# --- formatting ------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for the tables: thousands separated, ``digits`` decimals; "-" for None."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def fmt_figure(figure: Figure | None, digits: int = 2, unit: str = "") -> str:
    """``median (min-max)`` of a figure, the range left out when unknown or a single run."""
    if figure is None:
        return "-"
    text = fmt(figure.median, digits) + (f" {unit}" if unit else "")
    if figure.low is not None and figure.high is not None and figure.low != figure.high:
        text += f" ({fmt(figure.low, digits)}-{fmt(figure.high, digits)})"
    return text


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column (``l`` or ``r``, default ``l``)."""
    marks = [
        "---:" if (align[index : index + 1] or "l") == "r" else "---"
        for index in range(len(header))
    ]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --- machine and result files ----------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """This machine now: CPU count (and the CPUs this process may use), CPU model, platform,
    Python, kernel, memory, and the load average (1, 5, 15 minutes) at report time."""
    memory = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory = round(int(line.split()[1]) / 2**20, 1)  # kB to GiB
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": benchlib.cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "memory_gib": memory,
        "loadavg": load,
    }


def discover(bench_dir: Path) -> list[Benchmark]:
    """The known benchmarks, then any other ``results-*.json`` in ``bench_dir`` (its name is
    the part after ``results-``; the combined ``results.json`` is not one)."""
    known = list(BENCHMARKS)
    files = {bench.file for bench in known}
    for path in sorted(bench_dir.glob("results-*.json")):
        if path.name not in files:
            name = path.stem.removeprefix("results-")
            known.append(Benchmark(name, path.name, "", name))
    return known


def read_record(runs_dir: Path | None, name: str) -> dict[str, Any] | None:
    """The ``--run`` record of benchmark ``name``, or None if there is none (or unreadable)."""
    if runs_dir is None:
        return None
    try:
        record = json.loads((runs_dir / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def load_benchmark(
    bench: Benchmark, bench_dir: Path, runs_dir: Path | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """How benchmark ``bench`` ran, and its file's content (None when there is nothing usable
    to show).

    The status is ``ok``, ``partial`` (skipped for some configurations), ``skipped`` (the
    file says why), ``failed`` (its recorded run ended with an error or wrote no file, or the
    file is unreadable) or ``not run`` (no file and no record).
    """
    path = bench_dir / bench.file
    record = read_record(runs_dir, bench.name)
    info: dict[str, Any] = {"file": f"bench/{bench.file}", "script": bench.script}
    mtime = path.stat().st_mtime if path.is_file() else None
    if record is not None:
        finished = number(record.get("finished")) or 0.0
        if mtime is not None and mtime > finished + MTIME_SLACK_S:
            record = None  # the file was written again after the recorded run
        else:
            info["exit_status"] = record.get("exit_status")
            info["seconds"] = record.get("seconds")
            info["command"] = record.get("command")
    exit_status = info.get("exit_status")
    started = number(record.get("started")) if record else None
    if record is not None and (
        mtime is None or (started is not None and mtime < started - MTIME_SLACK_S)
    ):
        info["status"] = FAILED
        info["reason"] = (
            f"exit status {exit_status}" if exit_status else "the run wrote no result file"
        )
        if mtime is not None:
            info["reason"] += "; an older result file is left out"
        return info, None
    if mtime is None:
        info["status"] = NOT_RUN
        info["reason"] = f"no bench/{bench.file}"
        return info, None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        info |= {"status": FAILED, "reason": f"unreadable result file: {error}"}
        return info, None
    if not isinstance(content, dict):
        info |= {"status": FAILED, "reason": "the result file is not a JSON object"}
        return info, None
    info["date"] = content.get("date") or datetime.date.fromtimestamp(mtime).isoformat()
    info["quick"] = bool(dig(content, "config", "quick"))
    info["runs"] = runs_of(content)
    if content.get("skipped"):
        has_results = bool(content.get("results"))
        info |= {"status": PARTIAL if has_results else SKIPPED, "reason": str(content["skipped"])}
    elif exit_status not in (None, 0):
        info |= {"status": FAILED, "reason": f"exit status {exit_status}"}
    else:
        info["status"] = OK
    return info, content


def runs_of(content: dict[str, Any]) -> int | None:
    """How many runs a result file's medians are over, where it says."""
    for path in (("results", "runs"), ("results", "runs_completed"), ("config", "runs")):
        value = dig(content, *path)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raw = content.get("raw")
    return len(raw) if isinstance(raw, list) else None


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What a target's measurement found: the figure, where it comes from, and extra detail."""

    figure: Figure
    source: str
    details: str = ""


Contents = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Target:
    """A goal from the issues: ``met(measured median)`` decides it."""

    name: str  # also the file name of its profile summary, bench/profiles/<name>.md
    title: str
    goal: str
    unit: str
    digits: int
    met: Callable[[float], bool]
    measure: Callable[[Contents], Measured | None]


def _messaging(figure_name: str, *, size: str = "100") -> Callable[[Contents], Measured | None]:
    def measure(contents: Contents) -> Measured | None:
        figure = spread_figure(contents.get("messaging"), "results", "sizes", size, figure_name)
        if figure is None:
            return None
        return Measured(figure, f"bench/results-messaging.json: results.sizes.{size}.{figure_name}")

    return measure


def _handshake(contents: Contents) -> Measured | None:
    figure = spread_figure(contents.get("messaging"), "results", "handshake_p50_ms")
    if figure is None:
        return None
    return Measured(figure, "bench/results-messaging.json: results.handshake_p50_ms")


def dht_rows(content: dict[str, Any] | None) -> dict[tuple[str, int], dict[str, Any]]:
    """Per implementation and network size: p50, p95 and success (fraction) of every run,
    from the ``raw`` runs of a DHT result file (``results`` medians where raw is missing)."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    if content is None:
        return rows
    timeout_ms = 1000 * (number(dig(content, "config", "lookup_timeout_s")) or 30.0)
    for run in content.get("raw") or []:
        implementation, nodes = dig(run, "implementation"), number(dig(run, "nodes"))
        latencies = dig(run, "latencies_ms")
        if not isinstance(implementation, str) or nodes is None or not isinstance(latencies, list):
            continue
        values = [timeout_ms if (ms := number(x)) is None else ms for x in latencies]
        lookups = number(dig(run, "lookups")) or len(values)
        successes = number(dig(run, "successful_lookups"))
        if not values or successes is None or not lookups:
            continue
        row = rows.setdefault((implementation, int(nodes)), {"p50": [], "p95": [], "success": []})
        row["p50"].append(nearest_rank(values, 0.5))
        row["p95"].append(nearest_rank(values, 0.95))
        row["success"].append(successes / lookups)
    results = content.get("results")
    for implementation, by_size in (results or {}).items() if isinstance(results, dict) else ():
        for size, summary in by_size.items() if isinstance(by_size, dict) else ():
            if not size.isdigit() or (implementation, int(size)) in rows:
                continue
            p50, p95 = number(dig(summary, "p50_ms")), number(dig(summary, "p95_ms"))
            success = number(dig(summary, "success"))
            if p50 is not None and p95 is not None and success is not None:
                rows[(implementation, int(size))] = {
                    "p50": [p50],
                    "p95": [p95],
                    "success": [success],
                    "from_results": True,
                }
    return rows


def _dht_success(contents: Contents) -> Measured | None:
    row = dht_rows(contents.get("dht")).get(("ours", 1000))
    if row is None:
        return None
    worst = min(row["success"])
    successes = over_runs(row["success"])
    assert successes is not None
    return Measured(
        Figure(100 * worst, 100 * (successes.low or worst), 100 * (successes.high or worst)),
        "bench/results-dht.json: raw runs of ours at N = 1000 (successful_lookups / lookups)",
        f"lowest of {len(row['success'])} run(s)",
    )


def _sim_success(contents: Contents) -> Measured | None:
    for entry in dig(contents.get("sim"), "results") or []:
        if number(dig(entry, "nodes")) == 1000:
            rate = number(dig(entry, "success_rate"))
            if rate is None:
                return None
            loss, churn = (
                dig(contents["sim"], "parameters", "loss"),
                dig(contents["sim"], "parameters", "churn"),
            )
            return Measured(
                Figure(100 * rate),
                "bench/sim/report.json: results[nodes=1000].success_rate",
                f"{dig(entry, 'successes')}/{dig(entry, 'lookups')} lookups, simulated loss "
                f"{loss}, churn {churn}",
            )
    return None


def _dht_vs_stock(contents: Contents) -> Measured | None:
    rows = dht_rows(contents.get("dht"))
    ours, stock = rows.get(("ours", 1000)), rows.get(("stock", 1000))
    if ours is None or stock is None:
        return None
    mine, theirs = statistics.median(ours["p50"]), statistics.median(stock["p50"])
    return Measured(
        Figure(mine / theirs),
        "bench/results-dht.json: p50 of ours / p50 of stock at N = 1000 (medians over runs)",
        f"p2pnode {fmt(mine)} ms, stock kademlia {fmt(theirs)} ms",
    )


def _libp2p_throughput(contents: Contents) -> Measured | None:
    ours = spread_figure(contents.get("messaging"), "results", "sizes", "100", "throughput_per_s")
    acked = flat_figure(dig(contents.get("libp2p"), "results"), "acked_per_s")
    one_way = flat_figure(dig(contents.get("libp2p"), "results"), "one_way_per_s")
    if ours is None or acked is None or not acked.median:
        return None
    details = (
        f"p2pnode delivered with receipts {fmt(ours.median, 0)} msg/s, py-libp2p acknowledged "
        f"{fmt(acked.median, 0)} msg/s"
    )
    if one_way is not None and one_way.median:
        details += (
            f"; py-libp2p one-way {fmt(one_way.median, 0)} msg/s "
            f"(p2pnode / one-way = {ours.median / one_way.median:.2f})"
        )
    return Measured(
        Figure(ours.median / acked.median),
        "bench/results-messaging.json results.sizes.100.throughput_per_s / "
        "bench/results-libp2p.json results.acked_per_s",
        details,
    )


def _libp2p_rtt(contents: Contents) -> Measured | None:
    ours = spread_figure(contents.get("messaging"), "results", "sizes", "100", "rtt_p50_ms")
    theirs = flat_figure(dig(contents.get("libp2p"), "results"), "rtt_p50_ms")
    if ours is None or theirs is None or not theirs.median:
        return None
    return Measured(
        Figure(ours.median / theirs.median),
        "bench/results-messaging.json results.sizes.100.rtt_p50_ms / "
        "bench/results-libp2p.json results.rtt_p50_ms",
        f"p2pnode {fmt(ours.median)} ms (to a verified signed receipt), "
        f"py-libp2p {fmt(theirs.median)} ms (echo)",
    )


TARGETS: Final = (
    Target(
        "throughput-100b",
        "Messaging throughput, 100 B, delivered with receipts",
        "≥ 4,000 msg/s",
        "msg/s",
        0,
        lambda v: v >= 4000,
        _messaging("throughput_per_s"),
    ),
    Target(
        "ratio-to-ceiling-100b",
        "Throughput / crypto ceiling, 100 B",
        "≥ 0.75",
        "",
        2,
        lambda v: v >= 0.75,
        _messaging("ratio_to_ceiling"),
    ),
    Target(
        "rtt-p50-100b",
        "Round trip p50, 100 B",
        "≤ 1.5 ms",
        "ms",
        2,
        lambda v: v <= 1.5,
        _messaging("rtt_p50_ms"),
    ),
    Target(
        "rtt-p99-100b",
        "Round trip p99, 100 B",
        "≤ 3 ms",
        "ms",
        2,
        lambda v: v <= 3.0,
        _messaging("rtt_p99_ms"),
    ),
    Target(
        "handshake-p50",
        "Link handshake p50 (TCP connect + handshake)",
        "≤ 5 ms",
        "ms",
        2,
        lambda v: v <= 5.0,
        _handshake,
    ),
    Target(
        "dht-success-1000",
        "DHT lookup success at N = 1000 (every run)",
        "100 %",
        "%",
        1,
        lambda v: v >= 100.0 - 1e-9,
        _dht_success,
    ),
    Target(
        "dht-sim-success-1000",
        "DHT lookup success at N = 1000, simulated loss and churn",
        "100 %",
        "%",
        1,
        lambda v: v >= 100.0 - 1e-9,
        _sim_success,
    ),
    Target(
        "dht-p50-vs-stock-1000",
        "DHT lookup p50 at N = 1000, p2pnode / stock kademlia",
        "≤ 1.0",
        "",
        2,
        lambda v: v <= 1.0,
        _dht_vs_stock,
    ),
    Target(
        "libp2p-throughput",
        "Throughput, p2pnode delivered / py-libp2p acknowledged",
        "> 1.0",
        "",
        2,
        lambda v: v > 1.0,
        _libp2p_throughput,
    ),
    Target(
        "libp2p-rtt-p50",
        "Round trip p50, p2pnode / py-libp2p",
        "< 1.0",
        "",
        2,
        lambda v: v < 1.0,
        _libp2p_rtt,
    ),
)


def evaluate_targets(contents: Contents) -> list[dict[str, Any]]:
    """Every target of :data:`TARGETS` against ``contents`` (usable result files by
    benchmark name): ``name``, ``title``, ``target``, ``measured`` (the median, or None when
    not measured), ``min``/``max`` over runs where known, ``unit``, ``met`` (True, False, or
    None when not measured), ``source`` and ``details``."""
    out = []
    for target in TARGETS:
        try:
            measured = target.measure(contents)
        except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as error:
            measured = None
            source, details = "", f"could not be read: {error!r}"
        else:
            source = measured.source if measured else ""
            details = measured.details if measured else ""
        value = measured.figure.median if measured else None
        out.append(
            {
                "name": target.name,
                "title": target.title,
                "target": target.goal,
                "measured": value,
                "min": measured.figure.low if measured else None,
                "max": measured.figure.high if measured else None,
                "unit": target.unit,
                "met": None if value is None else bool(target.met(value)),
                "source": source,
                "details": details,
                "digits": target.digits,
            }
        )
    return out


# --- the combined report ---------------------------------------------------------------------


def build_report(bench_dir: Path = BENCH, runs_dir: Path | None = RUNS_DIR) -> dict[str, Any]:
    """The combined report: ``date`` (today), ``machine`` (:func:`machine_info`),
    ``benchmarks`` (name -> the result file's content, or ``{"status", "reason"}`` when there
    is no usable file), ``status`` (name -> how it ran, see :func:`load_benchmark`) and
    ``targets`` (:func:`evaluate_targets` over the usable files)."""
    benchmarks: dict[str, Any] = {}
    status: dict[str, Any] = {}
    usable: Contents = {}
    for bench in discover(bench_dir):
        info, content = load_benchmark(bench, bench_dir, runs_dir)
        info["title"] = bench.title
        status[bench.name] = info
        if content is None:
            benchmarks[bench.name] = {"status": info["status"], "reason": info.get("reason")}
        else:
            benchmarks[bench.name] = content
            if info["status"] in USABLE:
                usable[bench.name] = content
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine_info(),
        "benchmarks": benchmarks,
        "status": status,
        "targets": evaluate_targets(usable),
    }


def usable_contents(report: dict[str, Any]) -> Contents:
    """The benchmarks of ``report`` whose figures are shown (status ok or partial)."""
    return {
        name: report["benchmarks"][name]
        for name, info in report["status"].items()
        if info.get("status") in USABLE and isinstance(report["benchmarks"].get(name), dict)
    }


# --- plots -----------------------------------------------------------------------------------


def messaging_rtt_samples(content: dict[str, Any] | None, size: str = "100") -> list[float]:
    """Every raw round-trip sample (ms) of ``size``-byte messages over all runs."""
    samples: list[float] = []
    for run in dig(content, "raw") or []:
        for value in dig(run, "sizes", size, "rtt_samples_ms") or []:
            if (ms := number(value)) is not None:
                samples.append(ms)
    return samples


def libp2p_rtt_samples(content: dict[str, Any] | None) -> list[float]:
    """Every raw round-trip sample (ms) of py-libp2p over all runs."""
    samples: list[float] = []
    for run in dig(content, "raw") or []:
        for value in dig(run, "rtt_ms") or []:
            if (ms := number(value)) is not None:
                samples.append(ms)
    return samples


def rtt_chart(contents: Contents) -> Chart | None:
    """The round-trip CDF of 100 B messages (p2pnode, and py-libp2p where it has samples)."""
    ours = messaging_rtt_samples(contents.get("messaging"))
    theirs = libp2p_rtt_samples(contents.get("libp2p"))
    series = []
    if ours:
        runs = len(dig(contents["messaging"], "raw") or [])
        series.append(
            Series(
                f"p2pnode, send to verified receipt ({len(ours)} samples, {runs} runs)",
                plots.cdf_points(ours),
                markers=False,
            )
        )
    if theirs:
        runs = len(dig(contents["libp2p"], "raw") or [])
        series.append(
            Series(
                f"py-libp2p echo ({len(theirs)} samples, {runs} runs)",
                plots.cdf_points(theirs),
                markers=False,
            )
        )
    if not series:
        return None
    low = min(sample for sample in ours + theirs if sample > 0)
    return Chart(
        "Round trip of one 100 B message: cumulative distribution",
        series,
        "round trip, ms",
        "fraction of round trips",
        log_x=True,
        y_range=(0.0, 1.0),
        x_marks=(Mark(1.5, "p50 target", label_at=0.65), Mark(3.0, "p99 target", label_at=0.8)),
        y_marks=(Mark(0.5, "p50", label_at=low), Mark(0.99, "p99", label_at=low)),
    )


def dht_charts(contents: Contents) -> list[Chart]:
    """Lookup p50 and p95 against network size (one series per implementation), and success
    against size (with the simulation's), for the DHT plot."""
    rows = dht_rows(contents.get("dht")) | dht_rows(contents.get("opendht"))
    names = {"ours": "p2pnode", "stock": "stock kademlia", "opendht": "OpenDHT"}
    implementations = [name for name in names if any(key[0] == name for key in rows)]
    implementations += sorted({key[0] for key in rows} - set(names))
    sizes = sorted({key[1] for key in rows})
    charts = []
    for field, what in (("p50", "median"), ("p95", "95th percentile")):
        series = []
        for implementation in implementations:
            points, spreads = [], []
            for size in sizes:
                row = rows.get((implementation, size))
                if row is None:
                    continue
                figure = over_runs(row[field])
                assert figure is not None
                points.append((float(size), figure.median))
                spreads.append((figure.low or figure.median, figure.high or figure.median))
            series.append(Series(names.get(implementation, implementation), points, spreads))
        charts.append(
            Chart(
                f"Lookup latency, {what} (whiskers: min-max over runs)",
                series,
                "network size N (nodes)",
                f"{field} ms",
                log_x=True,
                x_ticks=sizes or None,
                y_range=(0.0, None),
            )
        )
    success = []
    for implementation in implementations:
        points = []
        for size in sizes:
            row = rows.get((implementation, size))
            if row is not None:
                points.append((float(size), 100 * min(row["success"])))
        success.append(Series(names.get(implementation, implementation), points))
    sim_points = []
    for entry in dig(contents.get("sim"), "results") or []:
        nodes, rate = number(dig(entry, "nodes")), number(dig(entry, "success_rate"))
        if nodes is not None and rate is not None:
            sim_points.append((nodes, 100 * rate))
    if sim_points:
        success.append(
            Series("p2pnode simulated, loss + churn", sorted(sim_points), dash=6),
        )
    all_sizes = sorted(set(sizes) | {int(x) for x, _ in sim_points})
    lowest = min((y for item in success for _, y in item.points), default=100.0)
    charts.append(
        Chart(
            "Lookup success (lowest run)",
            success,
            "network size N (nodes)",
            "success %",
            log_x=True,
            x_ticks=all_sizes or None,
            y_range=(min(90.0, math.floor(lowest)), 100.5),
            y_marks=(Mark(100.0, "target 100 %"),),
        )
    )
    return [chart for chart in charts if chart.has_data()]


def scaling_charts(contents: Contents) -> list[Chart]:
    """Throughput and latency against concurrent senders (scaling.py), and against message
    size (messaging.py), for the charts whose data exists."""
    charts = []
    by_senders = dig(contents.get("scaling"), "results", "senders")
    if isinstance(by_senders, dict):
        counts = sorted(int(key) for key in by_senders if str(key).isdigit())

        def series_of(label: str, field: str, dash: int = 0) -> Series:
            points, spreads = [], []
            for count in counts:
                figure = spread_figure(by_senders, str(count), field)
                if figure is not None:
                    points.append((float(count), figure.median))
                    spreads.append((figure.low or figure.median, figure.high or figure.median))
            return Series(label, points, spreads, dash=dash)

        charts.append(
            Chart(
                "Delivered throughput, all senders together, 100 B",
                [series_of("delivered msg/s (saturation)", "throughput_per_s")],
                "concurrent senders",
                "msg/s",
                log_x=True,
                x_ticks=counts or None,
                y_range=(0.0, None),
            )
        )
        charts.append(
            Chart(
                "Send to receipt at half the saturation rate",
                [
                    series_of("p50", "latency_p50_ms"),
                    series_of("p99", "latency_p99_ms", dash=6),
                ],
                "concurrent senders",
                "ms",
                log_x=True,
                x_ticks=counts or None,
                y_range=(0.0, None),
            )
        )
    sizes_doc = dig(contents.get("messaging"), "results", "sizes")
    if isinstance(sizes_doc, dict):
        sizes = sorted(int(key) for key in sizes_doc if str(key).isdigit())

        def by_size(label: str, field: str, dash: int = 0) -> Series:
            points, spreads = [], []
            for size in sizes:
                figure = spread_figure(sizes_doc, str(size), field)
                if figure is not None:
                    points.append((float(size), figure.median))
                    spreads.append((figure.low or figure.median, figure.high or figure.median))
            return Series(label, points, spreads, dash=dash)

        charts.append(
            Chart(
                "One link: throughput against message size",
                [
                    by_size("delivered msg/s", "throughput_per_s"),
                    by_size("crypto ceiling msg/s", "ceiling_per_s", dash=6),
                ],
                "message size, bytes",
                "msg/s",
                log_x=True,
                x_ticks=sizes or None,
                y_range=(0.0, None),
                y_marks=(Mark(4000.0, "target 4,000 msg/s at 100 B"),),
            )
        )
        charts.append(
            Chart(
                "One link: round trip against message size (targets at 100 B: 1.5 / 3 ms)",
                [by_size("p50", "rtt_p50_ms"), by_size("p99", "rtt_p99_ms", dash=6)],
                "message size, bytes",
                "ms",
                log_x=True,
                x_ticks=sizes or None,
                y_range=(0.0, None),
            )
        )
    return [chart for chart in charts if chart.has_data()]


def _measured_line(report: dict[str, Any], names: Sequence[str]) -> str:
    """Which result files a figure draws on, their dates, and whether any was a quick run."""
    parts, quick = [], False
    for name in names:
        info = report["status"].get(name, {})
        if info.get("status") in USABLE:
            parts.append(f"{name} {info.get('date')}")
            quick = quick or bool(info.get("quick"))
    cpus = report["machine"].get("cpus")
    line = f"measured: {', '.join(parts)} / {cpus} CPUs"
    return line + (" / QUICK RUN" if quick else "")


def write_plots(report: dict[str, Any], plot_dir: Path) -> dict[str, Path]:
    """Write ``rtt.png``, ``dht.png`` and ``scaling.png`` into ``plot_dir`` (each only if it
    has data; an older file of that name is removed otherwise); returns name -> path of the
    plots written."""
    contents = usable_contents(report)
    plot_dir.mkdir(parents=True, exist_ok=True)
    rtt = rtt_chart(contents)
    figures = {
        "rtt": ([rtt] if rtt else [], "Round trip latency", ("messaging", "libp2p"), 460),
        "dht": (
            dht_charts(contents),
            "DHT lookups against network size",
            ("dht", "opendht", "sim"),
            380,
        ),
        "scaling": (
            scaling_charts(contents),
            "p2pnode messaging: senders and message sizes",
            ("scaling", "messaging"),
            380,
        ),
    }
    written = {}
    for name, (charts, title, sources, height) in figures.items():
        path = plot_dir / f"{name}.png"
        if not charts:
            path.unlink(missing_ok=True)
            continue
        subtitle = [_measured_line(report, sources)]
        path.write_bytes(
            plots.figure_png(charts, title=title, subtitle=subtitle, chart_height=height)
        )
        written[name] = path
    return written


# --- BENCHMARKS.md ---------------------------------------------------------------------------


def _status_cell(info: dict[str, Any]) -> str:
    status = str(info.get("status"))
    if status in (OK,):
        return "ok"
    reason = info.get("reason")
    label = "**not run**" if status == NOT_RUN else f"**{status}**"
    return f"{label}: {reason}" if reason else label


def _image(plots_written: dict[str, Path], name: str, md_dir: Path, alt: str) -> str:
    path = plots_written.get(name)
    if path is None:
        return f"_No {name}.png: its data is missing._"
    relative = os.path.relpath(path, md_dir)
    return f"[![{alt}]({relative})]({relative})"


def section_messaging(content: dict[str, Any], images: Callable[[str, str], str]) -> list[str]:
    """The messaging benchmark: per message size, and the handshake."""
    sizes = dig(content, "results", "sizes") or {}
    rows = []
    for size in sorted(sizes, key=lambda key: int(key) if str(key).isdigit() else 0):
        entry = sizes[size]
        rows.append(
            [
                f"{int(size):,} B" if str(size).isdigit() else str(size),
                fmt_figure(spread_figure(entry, "throughput_per_s"), 0),
                fmt_figure(spread_figure(entry, "ceiling_per_s"), 0),
                fmt_figure(spread_figure(entry, "ratio_to_ceiling"), 2),
                fmt_figure(spread_figure(entry, "rtt_p50_ms"), 2),
                fmt_figure(spread_figure(entry, "rtt_p99_ms"), 2),
                fmt_figure(spread_figure(entry, "floor_rtt_p50_ms"), 2),
                fmt_figure(spread_figure(entry, "rtt_over_floor"), 2),
                fmt_figure(spread_figure(entry, "send_to_recorded_p50_ms"), 2),
                fmt(number(dig(entry, "messages")), 0),
            ]
        )
    out = [
        table(
            [
                "size",
                "delivered msg/s",
                "crypto ceiling msg/s",
                "ratio",
                "round trip p50 ms",
                "round trip p99 ms",
                "floor p50 ms",
                "round trip / floor",
                "send to recorded p50 ms",
                "messages",
            ],
            rows,
            "lrrrrrrrrr",
        ),
        "",
        f"Link handshake (TCP connect + handshake, fresh identity): p50 "
        f"{fmt_figure(spread_figure(content, 'results', 'handshake_p50_ms'), 2, 'ms')}, p99 "
        f"{fmt_figure(spread_figure(content, 'results', 'handshake_p99_ms'), 2, 'ms')}.",
        "",
        "How to read: two nodes, each in its own process, on 127.0.0.1. *Delivered* counts "
        "messages stored in the recipient's durable inbox whose signed receipt the sender has "
        "verified and recorded; *crypto ceiling* is sign + seal + open + verify of the same "
        "messages in one process, measured just before, and *ratio* is delivered / ceiling "
        "(both from the same run). *Round trip* is one message at a time, from `send` to the "
        "verified receipt; *send to recorded* goes on to the delivered state being stored. "
        "*Floor* is the same round trip between two bare processes, measured right after: "
        "the same crypto and one fsynced SQLite commit on a thread, no link encryption, store "
        "schema or delivery machinery (`bench/floor.py`); *round trip / floor* is the ratio "
        "of the two p50s.",
        "",
        images("rtt", "Round trip CDF"),
    ]
    return out


def section_scaling(content: dict[str, Any], images: Callable[[str, str], str]) -> list[str]:
    """The scaling benchmark: per number of concurrent senders."""
    by_senders = dig(content, "results", "senders") or {}
    rows = []
    for key in sorted(by_senders, key=lambda k: int(k) if str(k).isdigit() else 0):
        entry = by_senders[key]
        count = number(int(key)) if str(key).isdigit() else None
        low, high = (
            number(dig(entry, "share_min", "median")),
            number(dig(entry, "share_max", "median")),
        )
        fairness = (
            f"{low * count:.2f}-{high * count:.2f}"
            if low is not None and high is not None and count
            else "-"
        )
        cpu_rx = number(dig(entry, "receiver_cpu_share", "median"))
        cpu_tx = number(dig(entry, "sender_cpu_share", "median"))
        rows.append(
            [
                str(key),
                fmt_figure(spread_figure(entry, "throughput_per_s"), 0),
                fairness,
                fmt(number(dig(entry, "offered_per_s", "median")), 0),
                fmt_figure(spread_figure(entry, "latency_p50_ms"), 1),
                fmt_figure(spread_figure(entry, "latency_p99_ms"), 1),
                f"{fmt(cpu_rx)} / {fmt(cpu_tx)}",
                str(dig(entry, "cpu_bound") or "-"),
                fmt(number(dig(entry, "throttled", "max")), 0),
            ]
        )
    return [
        table(
            [
                "senders",
                "delivered msg/s",
                "share x N (min-max)",
                "paced load msg/s",
                "p50 ms under load",
                "p99 ms under load",
                "CPU receiver / senders",
                "CPU-bound",
                "throttled",
            ],
            rows,
            "rrrrrrrlr",
        ),
        "",
        "How to read: one receiver process; all senders share one other process, each with its "
        "own identity, store and link. *Delivered msg/s* is the saturation rate of all senders "
        "together (100 B, receipts verified); *share x N* is each sender's share of the "
        "messages delivered by half-time times N (1.00 is perfectly fair). The latency columns "
        "are send to verified receipt while the senders together send at *paced load* (half "
        "the saturation rate). CPU is the share of one core each side used while saturated.",
        "",
        images("scaling", "Throughput and latency against senders and message size"),
    ]


SURFACE_COMMANDS: Final = (
    ("python", "`python -c pass` (interpreter start-up)"),
    ("version", "`p2pnode --version` (start-up + CLI import)"),
    ("id", "`p2pnode id`"),
    ("status", "`p2pnode status` (one API round trip)"),
    ("send", "`p2pnode send` (waits for the receipt)"),
)


def section_surfaces(content: dict[str, Any], images: Callable[[str, str], str]) -> list[str]:
    """The surfaces benchmark: CLI command times and API throughput."""
    results = content.get("results") or {}
    cli = [
        [
            label,
            fmt_figure(flat_figure(results, f"cli_{name}_ms_p50"), 1),
            fmt_figure(flat_figure(results, f"cli_{name}_ms_p99"), 1),
        ]
        for name, label in SURFACE_COMMANDS
    ]
    clients = sorted(
        {
            int(m.group(1))
            for key in results
            if (m := re.fullmatch(r"api_k(\d+)_accepted_per_s", key))
        }
    )
    api = [
        [
            str(k),
            fmt_figure(flat_figure(results, f"api_k{k}_accepted_per_s"), 0),
            fmt_figure(flat_figure(results, f"api_k{k}_delivered_per_s"), 0),
            fmt_figure(flat_figure(results, f"api_k{k}_post_ms_p50"), 1),
            fmt_figure(flat_figure(results, f"api_k{k}_post_ms_p99"), 1),
        ]
        for k in clients
    ]
    return [
        table(["command", "p50 ms", "p99 ms"], cli, "lrr"),
        "",
        table(
            ["API clients", "accepted msg/s", "delivered msg/s", "POST p50 ms", "POST p99 ms"],
            api,
            "rrrrr",
        ),
        "",
        "How to read: real `p2pnode daemon` processes. CLI rows are wall time from process "
        "start to exit; the first rows are the floors a `send` is made of. API rows: "
        "`POST /v1/messages` over the Unix socket from K concurrent clients; *accepted* is "
        "answered after the durable outbox write, *delivered* counts signed receipts.",
    ]


RESOURCE_ROWS: Final = (
    ("rss_started_mib", "daemon RSS, just started", "MiB", 1),
    ("rss_idle_linked_mib", "daemon RSS, idle with one link", "MiB", 1),
    ("rss_after_messages_mib", "daemon RSS after the messages", "MiB", 1),
    ("rss_growth_per_100k_messages_mib", "RSS growth per 100,000 messages", "MiB", 1),
    ("db_mib_per_100k_messages_after_stop", "database per 100,000 messages (stopped)", "MiB", 1),
    ("bytes_per_message_after_stop", "database bytes per message (stopped)", "B", 0),
    ("receive_per_s", "messages received per second", "msg/s", 0),
    ("rss_contacts_fresh_mib", "fresh daemon RSS (contacts phase)", "MiB", 1),
    ("rss_after_control_requests_mib", "after as many refused API requests (control)", "MiB", 1),
    ("rss_with_contacts_mib", "after the contacts were added", "MiB", 1),
    ("rss_growth_contacts_mib", "contacts' RSS growth, connections settled", "MiB", 1),
    ("contacts_add_per_s", "contacts added per second", "/s", 0),
)


def section_resources(content: dict[str, Any], images: Callable[[str, str], str]) -> list[str]:
    """The resources benchmark: memory and database size."""
    results = content.get("results") or {}
    config = content.get("config") or {}
    rows = [
        [label, fmt_figure(flat_figure(results, key), digits, unit)]
        for key, label, unit, digits in RESOURCE_ROWS
        if flat_figure(results, key) is not None
    ]
    return [
        table(["figure", "value"], rows, "lr"),
        "",
        f"How to read: a real daemon receives {fmt(number(config.get('messages')), 0)} messages "
        f"of 100 B; a second one gets {fmt(number(config.get('contacts')), 0)} contacts. RSS is "
        "`VmRSS` from /proc; per-100,000 figures are scaled from the messages sent. The "
        "refused requests are the control for the contacts (same connections, nothing stored).",
    ]


DHT_NAMES: Final = {"ours": "p2pnode", "stock": "stock kademlia 2.2.3", "opendht": "OpenDHT"}


def section_dht(contents: Contents, images: Callable[[str, str], str]) -> list[str]:
    """DHT lookups of every implementation (dht_bench.py and OpenDHT), then the simulation."""
    rows = dht_rows(contents.get("dht")) | dht_rows(contents.get("opendht"))
    order = list(DHT_NAMES)
    body = []
    for implementation, size in sorted(
        rows,
        key=lambda key: (
            key[1],
            order.index(key[0]) if key[0] in order else len(order),
            key[0],
        ),
    ):
        row = rows[(implementation, size)]
        success = over_runs([100 * s for s in row["success"]])
        body.append(
            [
                f"{size:,}",
                DHT_NAMES.get(implementation, implementation),
                fmt_figure(over_runs(row["p50"]), 2),
                fmt_figure(over_runs(row["p95"]), 2),
                fmt_figure(success, 1),
                str(len(row["p50"])),
            ]
        )
    out = []
    if body:
        out += [
            table(["N", "implementation", "p50 ms", "p95 ms", "success %", "runs"], body, "rlrrrr"),
            "",
        ]
        ratios = []
        for size in sorted({key[1] for key in rows}):
            ours, stock = rows.get(("ours", size)), rows.get(("stock", size))
            if ours and stock:
                ratio = statistics.median(ours["p50"]) / statistics.median(stock["p50"])
                ratios.append(f"N = {size:,}: {ratio:.2f}")
        if ratios:
            out += [
                "p50 p2pnode / stock kademlia (below 1: p2pnode faster): " + "; ".join(ratios),
                "",
            ]
        out += [
            "How to read: all N nodes of one implementation in one process on 127.0.0.1, one "
            "UDP socket each; a random node looks up a random other node's value, one lookup at "
            "a time. p50 and p95 are nearest-rank over one run's lookups, then the median (and "
            "min-max) over runs; success is the share of lookups that returned the right value. "
            "A p2pnode lookup collects and verifies 3 signed copies; the stock crawler and "
            "OpenDHT stop at the first value. See bench/README.md.",
            "",
        ]
    else:
        out += ["_No DHT lookup results._", ""]
    sim = contents.get("sim")
    sim_rows = []
    for entry in dig(sim, "results") or []:
        sim_rows.append(
            [
                fmt(number(dig(entry, "nodes")), 0),
                fmt(number(dig(entry, "live")), 0),
                f"{fmt(100 * (number(dig(entry, 'success_rate')) or 0), 1)} "
                f"({dig(entry, 'successes')}/{dig(entry, 'lookups')})",
                fmt(number(dig(entry, "hops", "mean")), 2),
                fmt(number(dig(entry, "datagrams", "mean")), 1),
                fmt(number(dig(entry, "latency_ms", "median")), 1),
                fmt(number(dig(entry, "latency_ms", "p95")), 1),
            ]
        )
    if sim_rows:
        params = dig(sim, "parameters") or {}
        out += [
            f"Simulation (`python -m p2pnode.sim`, not part of `make bench`): loss "
            f"{params.get('loss')}, churn {params.get('churn')}, one-way latency "
            f"{params.get('latency_s')} s, virtual time; details in bench/sim/results.md.",
            "",
            table(
                [
                    "N",
                    "live",
                    "success %",
                    "mean hops",
                    "mean datagrams",
                    "median latency ms",
                    "p95 latency ms",
                ],
                sim_rows,
                "rrrrrrr",
            ),
            "",
        ]
    out.append(images("dht", "DHT lookup latency and success against network size"))
    return out


def section_libp2p(contents: Contents, images: Callable[[str, str], str]) -> list[str]:
    """py-libp2p's transport figures beside p2pnode's (messaging.py, 100 B)."""
    results = dig(contents.get("libp2p"), "results") or {}
    ours = dig(contents.get("messaging"), "results") or {}
    delivered = spread_figure(ours, "sizes", "100", "throughput_per_s")
    rows = [
        [
            "throughput, acknowledged (py-libp2p: 8-byte ack each, window "
            f"{dig(contents.get('libp2p'), 'config', 'window') or '-'}; p2pnode: signed receipts)",
            fmt_figure(flat_figure(results, "acked_per_s"), 0, "msg/s"),
            fmt_figure(delivered, 0, "msg/s"),
        ],
        [
            "throughput, one-way (py-libp2p: no acknowledgement; p2pnode: delivered as above)",
            fmt_figure(flat_figure(results, "one_way_per_s"), 0, "msg/s"),
            fmt_figure(delivered, 0, "msg/s"),
        ],
        [
            "round trip p50 (py-libp2p: echo; p2pnode: verified receipt)",
            fmt_figure(flat_figure(results, "rtt_p50_ms"), 2, "ms"),
            fmt_figure(spread_figure(ours, "sizes", "100", "rtt_p50_ms"), 2, "ms"),
        ],
        [
            "round trip p99",
            fmt_figure(flat_figure(results, "rtt_p99_ms"), 2, "ms"),
            fmt_figure(spread_figure(ours, "sizes", "100", "rtt_p99_ms"), 2, "ms"),
        ],
        [
            "connect p50 (py-libp2p defaults / max_connections_per_peer=1; p2pnode: handshake)",
            f"{fmt_figure(flat_figure(results, 'connect_p50_ms'), 1)} / "
            f"{fmt_figure(flat_figure(results, 'connect_one_conn_p50_ms'), 1)} ms",
            fmt_figure(spread_figure(ours, "handshake_p50_ms"), 2, "ms"),
        ],
    ]
    stack = " + ".join(
        str(results.get(key)) for key in ("transport", "security", "muxer") if results.get(key)
    )
    return [
        table(["100 B messages", "py-libp2p", "p2pnode"], rows, "lrr"),
        "",
        f"How to read: py-libp2p {dig(contents.get('libp2p'), 'config', 'implementation') or ''}"
        f" ({stack or 'stack unknown'}) over one stream between two processes on 127.0.0.1, "
        "from its own virtualenv. It does no signing, sealing or durable storage here, only "
        "Noise's transport encryption. The two benchmarks ran at different times: compare them "
        "on a quiet machine (see each file's date and load average). The default connect time "
        "includes py-libp2p's fixed 250 ms dial wait (bench/README.md).",
    ]


def section_generic(content: dict[str, Any], images: Callable[[str, str], str]) -> list[str]:
    """Any other result file: its flat numeric results."""
    results = content.get("results")
    rows = [
        [key, fmt(number(value), 3)]
        for key, value in (results.items() if isinstance(results, dict) else ())
        if number(value) is not None and not key.endswith(("_min", "_max"))
    ]
    return [table(["figure", "value"], rows, "lr") if rows else "_No flat figures._"]


def target_rows(targets: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The rows of the targets table."""
    rows = []
    for target in targets:
        digits = int(target.get("digits", 2))
        value = target.get("measured")
        if value is None:
            measured, verdict = "not run", "not run"
        else:
            low, high = target.get("min"), target.get("max")
            measured = fmt_figure(Figure(value, low, high), digits, target.get("unit", ""))
            verdict = "met" if target.get("met") else "**MISSED**"
        if target.get("details"):
            measured += f"; {target['details']}"
        rows.append([target["title"], f"`{target['name']}`", target["target"], measured, verdict])
    return rows


def measured_on(report: dict[str, Any]) -> str:
    """The machines (CPU count and model, Python) the usable result files were measured on,
    each with the benchmarks measured there."""
    machines: dict[str, list[str]] = {}
    for name, content in usable_contents(report).items():
        machine = content.get("machine")
        if not isinstance(machine, dict):
            continue
        cpus = machine.get("cpus") or machine.get("nproc")
        text = f"{cpus} x {machine.get('cpu_model') or 'unknown CPU'}"
        if machine.get("python"):
            text += f", Python {machine['python']}"
        machines.setdefault(text, []).append(name)
    if not machines:
        return "unknown"
    return "; ".join(f"{text} ({', '.join(names)})" for text, names in machines.items())


def render_markdown(
    report: dict[str, Any],
    plots_written: dict[str, Path],
    md_path: Path,
    profiles_dir: Path,
) -> str:
    """BENCHMARKS.md for ``report``: title, date, machine, how to reproduce, the targets (with
    profile summaries of missed ones), the benchmarks' status, then one section each."""
    machine = report["machine"]
    status = report["status"]
    contents = usable_contents(report)

    def images(name: str, alt: str) -> str:
        return _image(plots_written, name, md_path.parent, alt)

    quick = sorted(name for name, info in status.items() if info.get("quick"))
    load = machine.get("loadavg")
    out = [
        "# p2pnode benchmarks",
        "",
        f"Generated by `bench/report.py` on {report['date']} from the result files in `bench/` "
        "(combined in `bench/results.json`). Benchmarks are measurements, not tests: figures "
        "depend on the machine and its load; compare ratios measured in the same run.",
        "",
    ]
    if quick:
        out += [
            f"> **Quick run** (`--quick`) for: {', '.join(quick)}. These figures come from a "
            "short subset with one run and are only indicative.",
            "",
        ]
    out += [
        "## Machine",
        "",
        f"- CPU: {machine.get('cpus')} x {machine.get('cpu_model') or 'unknown model'}"
        + (
            f" ({machine.get('usable_cpus')} usable)"
            if machine.get("usable_cpus") not in (None, machine.get("cpus"))
            else ""
        ),
        f"- Memory: {machine.get('memory_gib')} GiB",
        f"- Platform: {machine.get('platform')} (kernel {machine.get('kernel')}), Python "
        f"{machine.get('python')}",
        "- Load average at report time (1, 5, 15 min): "
        + (" / ".join(f"{x:.2f}" for x in load) if load else "unknown"),
        "",
        "This is the machine the report was generated on. The result files were measured on: "
        + measured_on(report)
        + " (each file's `machine` in bench/results.json).",
        "",
        "## How to reproduce",
        "",
        "```sh",
        "make bench            # every benchmark in turn, then this report (tens of minutes)",
        "make bench QUICK=1    # --quick for each: a short subset, about a minute in all",
        ".venv/bin/python bench/report.py   # only the report, from the result files present",
        "```",
        "",
        "Run on an otherwise idle machine. A benchmark that fails does not stop the others; it "
        "is shown below as failed. Each benchmark's options are in bench/README.md.",
        "",
        "## Targets",
        "",
        table(
            ["target", "name", "goal", "measured: median (min-max over runs)", "met"],
            target_rows(report["targets"]),
            "llllr",
        ),
        "",
        "A ratio target divides two figures, each a median over its own runs; *not run* means "
        "a result it needs is missing, failed or skipped. For a missed target, the summary of "
        "its profile in `bench/profiles/<name>.md` follows.",
        "",
    ]
    missed = [target for target in report["targets"] if target.get("met") is False]
    if missed:
        out += ["### Missed targets", ""]
        for target in missed:
            out += [f"#### {target['title']} (`{target['name']}`)", ""]
            profile = profiles_dir / f"{target['name']}.md"
            try:
                text = profile.read_text(encoding="utf-8").strip()
            except OSError:
                text = ""
            out += [text or "profile: not yet summarised", ""]
    out += ["## Benchmarks run", ""]
    rows = []
    for name, info in status.items():
        seconds = number(info.get("seconds"))
        rows.append(
            [
                name,
                f"`{info.get('script')}`" if info.get("script") else "-",
                _status_cell(info),
                str(info.get("date") or "-"),
                str(info.get("runs") if info.get("runs") is not None else "-"),
                "yes" if info.get("quick") else "no",
                fmt(seconds, 0) if seconds is not None else "-",
            ]
        )
    out += [
        table(["benchmark", "script", "status", "date", "runs", "quick", "time s"], rows),
        "",
        "*Time s* is the wall time of the last `make bench` run of that benchmark (- when it "
        "was run otherwise).",
        "",
    ]

    def section(title: str, names: Sequence[str], body: Callable[[], list[str]]) -> None:
        out.extend([f"## {title}", ""])
        for name in names:
            info = status.get(name, {"status": NOT_RUN, "reason": "unknown"})
            runs = info.get("runs")
            out.append(
                f"`{info.get('script') or name}`: {_status_cell(info)}"
                + (f"; {info.get('date')}" if info.get("date") else "")
                + (
                    f"; median of {runs} runs (min-max over runs in brackets)"
                    if isinstance(runs, int) and runs > 1
                    else "; one run"
                    if runs == 1
                    else ""
                )
                + ("; **quick**" if info.get("quick") else "")
                + "."
            )
        out.append("")
        if any(name in contents for name in names):
            out.extend(body())
        else:
            out.append("_Not run: no figures._")
        out.append("")

    section(
        "Messaging: throughput, round trip, handshake",
        ["messaging"],
        lambda: section_messaging(contents["messaging"], images),
    )
    section(
        "Scaling: concurrent senders",
        ["scaling"],
        lambda: section_scaling(contents["scaling"], images),
    )
    section(
        "User surfaces: CLI and API",
        ["surfaces"],
        lambda: section_surfaces(contents["surfaces"], images),
    )
    section(
        "Resources: memory and database size",
        ["resources"],
        lambda: section_resources(contents["resources"], images),
    )
    section(
        "DHT lookups: p2pnode, stock kademlia, OpenDHT",
        ["dht", "opendht", "sim"],
        lambda: section_dht(contents, images),
    )
    section(
        "Transport: p2pnode and py-libp2p",
        ["libp2p"],
        lambda: section_libp2p(contents, images),
    )
    known = {bench.name for bench in BENCHMARKS}
    for name in status:
        if name not in known:
            section(
                f"Other: {name}",
                [name],
                lambda name=name: section_generic(contents[name], images),  # type: ignore[misc]
            )
    return "\n".join(out).rstrip() + "\n"


# --- entry points ----------------------------------------------------------------------------


def write_outputs(
    report: dict[str, Any],
    *,
    json_path: Path,
    md_path: Path,
    plot_dir: Path,
    profiles_dir: Path,
) -> dict[str, Path]:
    """Write the combined JSON, the plots and the Markdown; returns the plots written."""
    written = write_plots(report, plot_dir)
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(report, written, md_path, profiles_dir), encoding="utf-8")
    return written


def run_and_record(name: str, command: Sequence[str], runs_dir: Path) -> int:
    """Run one benchmark ``command`` and record its exit status and wall time in
    ``runs_dir/<name>.json``. Returns 0 whatever the command did (so that ``make bench`` goes
    on to the next benchmark) after saying on stderr when it failed."""
    started = time.time()
    began = time.perf_counter()
    try:
        status = subprocess.run(list(command), check=False).returncode
    except OSError as error:
        print(f"bench: {name}: could not start: {error}", file=sys.stderr)
        status = 127
    record = {
        "name": name,
        "command": list(command),
        "started": started,
        "finished": time.time(),
        "seconds": round(time.perf_counter() - began, 1),
        "exit_status": status,
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if status != 0:
        print(
            f"bench: {name} FAILED (exit status {status}); going on with the next benchmark",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module doc and ``--help``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bench-dir", type=Path, default=BENCH, help="where the results are")
    parser.add_argument("--json", type=Path, default=BENCH / "results.json")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=BENCH / "plots")
    parser.add_argument("--profiles", type=Path, default=BENCH / "profiles")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR, help="--run records")
    parser.add_argument("--run", metavar="NAME", help="run the command after -- and record it")
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("--run needs a command after --")
        return run_and_record(args.run, command, args.runs_dir)
    if args.command:
        parser.error(f"unexpected arguments: {args.command}")
    report = build_report(args.bench_dir, args.runs_dir)
    written = write_outputs(
        report,
        json_path=args.json,
        md_path=args.markdown,
        plot_dir=args.plots,
        profiles_dir=args.profiles,
    )
    for target in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not run"}[target["met"]]
        value = target["measured"]
        shown = "-" if value is None else f"{value:,.{target['digits']}f} {target['unit']}"
        print(f"{target['title']:<60} {target['target']:>14}  {shown:>16}  {verdict}")
    for name, info in report["status"].items():
        if info["status"] != OK:
            print(f"{name}: {info['status']} ({info.get('reason')})")
    print(f"wrote {args.json}, {args.markdown} and {len(written)} plot(s) in {args.plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
