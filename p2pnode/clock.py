"""The wall clock p2pnode signs and checks timestamps with: integer milliseconds since the epoch.

Pure code takes the time as an argument; this is where the real time comes from.
"""

from __future__ import annotations

import time


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch, now."""
    return time.time_ns() // 1_000_000
