"""What every benchmark script needs: the machine's description, the code measured, percentiles.

``bench/`` is not a package: a script puts its own folder on ``sys.path`` and imports this module
by name (see any script's imports). Only the standard library is used, so the drivers of the
peer benchmarks can import it too.
"""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

#: The p2pnode package this benchmark folder belongs to (its git checkout is the one measured).
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "p2pnode"


def cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each package (None for one that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine(
    packages: Iterable[str] = (), *, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """This machine for a result file: CPU count (and the CPUs this process may use), CPU
    model, platform, Python, SQLite, the 1-minute load average now, and the versions of
    ``packages``; ``extra`` entries are added as they are."""
    try:
        load: float | None = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "loadavg_1min_at_start": load,
        "packages": package_versions(packages),
        **(extra or {}),
    }


def source() -> dict[str, Any]:
    """Which p2pnode code was measured: its directory, the checkout's commit, and whether the
    package differs from that commit (both None outside a git checkout)."""
    info: dict[str, Any] = {"p2pnode_path": str(PACKAGE_DIR), "git_head": None, "dirty": None}
    head = subprocess.run(
        ["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
    )
    if head.returncode == 0:
        info["git_head"] = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), "status", "--porcelain", "--", "."],
            check=False,
            capture_output=True,
            text=True,
        )
        info["dirty"] = bool(dirty.stdout.strip())
    return info


def percentile(values: Iterable[float], fraction: float) -> float:
    """Nearest-rank percentile of non-empty ``values`` (so p99 of 30 samples is the largest).

    Raises:
        ValueError: if ``values`` is empty.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("a percentile of no values")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
