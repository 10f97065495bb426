"""bench/report.py on tiny result files: targets met and missed, missing and failed benchmarks
reported as such, and the plots written as PNG files."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPORT_PY = Path(__file__).resolve().parents[1] / "bench" / "report.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report() -> ModuleType:
    """bench/report.py, imported by path (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_report_under_test", REPORT_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


def spread(median: float, low: float | None = None, high: float | None = None) -> dict[str, float]:
    return {"median": median, "min": median if low is None else low, "max": high or median}


def write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def messaging_doc(*, throughput: float, rtt_p50: float) -> dict[str, Any]:
    """A messaging.py result file with one 100 B size, two runs, raw RTT samples."""
    size = {
        "messages": 1000,
        "throughput_per_s": spread(throughput, throughput - 100, throughput + 100),
        "ceiling_per_s": spread(5000.0),
        "ratio_to_ceiling": spread(throughput / 5000),
        "rtt_p50_ms": spread(rtt_p50),
        "rtt_p99_ms": spread(2.5),
        "send_to_recorded_p50_ms": spread(1.5),
    }
    samples = [rtt_p50 * (0.8 + 0.01 * i) for i in range(40)]
    return {
        "benchmark": "messaging",
        "date": "2026-01-02",
        "machine": {"cpus": 2, "cpu_model": "Test CPU", "python": "3.11.7"},
        "config": {"quick": True},
        "results": {
            "runs": 2,
            "sizes": {"100": size},
            "handshake_p50_ms": spread(6.0, 5.5, 7.0),
            "handshake_p99_ms": spread(9.0),
        },
        "raw": [{"sizes": {"100": {"rtt_samples_ms": samples}}} for _ in range(2)],
    }


def dht_doc() -> dict[str, Any]:
    """A dht_bench.py result file: p2pnode misses one lookup of 4 in one run at N = 1000."""

    def run(implementation: str, nodes: int, latencies: list[float], ok: int) -> dict[str, Any]:
        return {
            "implementation": implementation,
            "nodes": nodes,
            "lookups": len(latencies),
            "latencies_ms": latencies,
            "successful_lookups": ok,
        }

    return {
        "benchmark": "dht-lookup",
        "config": {"lookup_timeout_s": 30.0},
        "results": {},
        "raw": [
            run("ours", 20, [1.0, 2.0, 3.0, 4.0], 4),
            run("ours", 1000, [5.0, 6.0, 7.0, 8.0], 4),
            run("ours", 1000, [5.0, 6.0, 7.0, None], 3),  # type: ignore[list-item]
            run("stock", 20, [0.5, 0.5, 0.6, 0.7], 4),
            run("stock", 1000, [10.0, 12.0, 14.0, 16.0], 4),
        ],
    }


def libp2p_doc() -> dict[str, Any]:
    return {
        "benchmark": "transport-peer-libp2p",
        "date": "2026-01-02",
        "results": {
            "acked_per_s": 3000.0,
            "acked_per_s_min": 2000.0,
            "acked_per_s_max": 4000.0,
            "one_way_per_s": 8000.0,
            "rtt_p50_ms": 0.8,
        },
        "raw": [{"rtt_ms": [0.5, 0.7, 0.8, 0.9, 1.2]}],
    }


def targets_by_name(built: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {target["name"]: target for target in built["targets"]}


def test_targets_met_missed_and_not_run(report: ModuleType, tmp_path: Path) -> None:
    write(tmp_path / "results-messaging.json", messaging_doc(throughput=4200.0, rtt_p50=2.0))
    write(tmp_path / "results-dht.json", dht_doc())
    write(tmp_path / "results-libp2p.json", libp2p_doc())

    built = report.build_report(tmp_path, None)
    targets = targets_by_name(built)

    throughput = targets["throughput-100b"]
    assert throughput["measured"] == 4200.0
    assert (throughput["min"], throughput["max"]) == (4100.0, 4300.0)
    assert throughput["met"] is True
    assert targets["ratio-to-ceiling-100b"]["met"] is True  # 0.84 >= 0.75
    assert targets["rtt-p50-100b"]["met"] is False  # 2.0 ms > 1.5 ms
    assert targets["rtt-p99-100b"]["met"] is True
    assert targets["handshake-p50"]["met"] is False  # 6 ms > 5 ms
    # One run of two missed a lookup: the target needs every run at 100 %.
    assert targets["dht-success-1000"]["measured"] == pytest.approx(75.0)
    assert targets["dht-success-1000"]["met"] is False
    # p50 at N = 1000: ours 6 (both runs) vs stock 12.
    assert targets["dht-p50-vs-stock-1000"]["measured"] == pytest.approx(0.5)
    assert targets["dht-p50-vs-stock-1000"]["met"] is True
    assert targets["libp2p-throughput"]["measured"] == pytest.approx(1.4)
    assert targets["libp2p-throughput"]["met"] is True
    assert "one-way 8,000" in targets["libp2p-throughput"]["details"]
    assert targets["libp2p-rtt-p50"]["measured"] == pytest.approx(2.5)
    assert targets["libp2p-rtt-p50"]["met"] is False
    # No simulation report: not measured, neither met nor missed.
    assert targets["dht-sim-success-1000"]["measured"] is None
    assert targets["dht-sim-success-1000"]["met"] is None
    for target in built["targets"]:
        assert set(target) >= {"name", "target", "measured", "unit", "met", "source"}


def test_missing_failed_and_skipped_files(report: ModuleType, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    write(tmp_path / "results-messaging.json", messaging_doc(throughput=100.0, rtt_p50=9.0))
    (tmp_path / "results-scaling.json").write_text("{not json", encoding="utf-8")
    write(tmp_path / "results-libp2p.json", {"results": {}, "raw": [], "skipped": "no wheel"})
    # dht: an old result file, then a recorded run that failed without writing a new one.
    old = write(tmp_path / "results-dht.json", dht_doc())
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    write(
        runs / "dht.json",
        {"started": time.time() - 10, "finished": time.time() - 5, "exit_status": 1},
    )

    built = report.build_report(tmp_path, runs)
    status = {name: info["status"] for name, info in built["status"].items()}

    assert status["messaging"] == "ok"
    assert status["scaling"] == "failed"
    assert status["libp2p"] == "skipped"
    assert status["dht"] == "failed"
    assert "older result file" in built["status"]["dht"]["reason"]
    for name in ("surfaces", "resources", "opendht", "sim"):
        assert status[name] == "not run"
        assert built["benchmarks"][name]["status"] == "not run"
    targets = targets_by_name(built)
    # The stale DHT file and the skipped py-libp2p file are not used.
    assert targets["dht-success-1000"]["met"] is None
    assert targets["libp2p-throughput"]["met"] is None
    assert targets["throughput-100b"]["met"] is False


def test_outputs_written(report: ModuleType, tmp_path: Path) -> None:
    bench = tmp_path / "bench"
    write(bench / "results-messaging.json", messaging_doc(throughput=1000.0, rtt_p50=1.0))
    write(bench / "results-dht.json", dht_doc())
    write(bench / "results-libp2p.json", libp2p_doc())
    profiles = bench / "profiles"
    profiles.mkdir()
    (profiles / "throughput-100b.md").write_text("Most time is in SQLite commits.\n")

    built = report.build_report(bench, None)
    paths = {
        "json_path": bench / "results.json",
        "md_path": tmp_path / "BENCHMARKS.md",
        "plot_dir": bench / "plots",
        "profiles_dir": profiles,
    }
    written = report.write_outputs(built, **paths)

    assert set(written) == {"rtt", "dht", "scaling"}
    for path in written.values():
        assert path.read_bytes().startswith(PNG_SIGNATURE)
    combined = json.loads((bench / "results.json").read_text())
    assert set(combined) >= {"date", "machine", "benchmarks", "targets"}
    assert combined["benchmarks"]["messaging"]["benchmark"] == "messaging"
    assert {"cpus", "cpu_model", "platform", "python", "kernel", "loadavg"} <= set(
        combined["machine"]
    )
    markdown = (tmp_path / "BENCHMARKS.md").read_text()
    assert "**MISSED**" in markdown
    assert "Most time is in SQLite commits." in markdown  # the profile of a missed target
    assert "profile: not yet summarised" in markdown  # a missed target without one
    assert "bench/plots/rtt.png" in markdown
    assert "**not run**" in markdown  # e.g. scaling
    assert "Quick run" in markdown


def test_run_records_failure_and_carries_on(report: ModuleType, tmp_path: Path) -> None:
    command = [sys.executable, "-c", "raise SystemExit(3)"]
    assert report.main(["--run", "demo", "--runs-dir", str(tmp_path), "--", *command]) == 0
    record = json.loads((tmp_path / "demo.json").read_text())
    assert record["exit_status"] == 3
    assert record["command"] == command
