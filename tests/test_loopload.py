"""The loop's busy share: measured from trio's I/O-wait hooks, averaged over a short window."""

from __future__ import annotations

import time

import pytest
import trio

from p2pnode.loopload import LOOP_LOAD_WINDOW_SECONDS, LoopLoad, loop_load

WINDOW = 0.01


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stretch(meter: LoopLoad, clock: FakeClock, *, busy: float, waiting: float) -> None:
    """``busy`` seconds of running tasks, then ``waiting`` seconds in the I/O wait."""
    clock.now += busy
    meter.before_io_wait(waiting)
    clock.now += waiting
    meter.after_io_wait(waiting)


def test_a_new_meter_reads_idle() -> None:
    clock = FakeClock()
    meter = LoopLoad(WINDOW, clock)
    meter.before_io_wait(1.0)
    assert meter.load == 0.0


def test_the_load_is_the_busy_share_of_a_steady_pattern() -> None:
    clock = FakeClock()
    meter = LoopLoad(WINDOW, clock)
    for _ in range(200):  # 1 ms cycles, 30 % busy: many windows long
        stretch(meter, clock, busy=0.0003, waiting=0.0007)
    assert meter.load == pytest.approx(0.3, abs=0.02)
    for _ in range(200):
        stretch(meter, clock, busy=0.0008, waiting=0.0002)
    assert meter.load == pytest.approx(0.8, abs=0.02)


def test_the_stretch_under_way_counts() -> None:
    clock = FakeClock()
    meter = LoopLoad(WINDOW, clock)
    stretch(meter, clock, busy=0.0, waiting=1.0)
    clock.now += 5 * WINDOW  # a task has run this long without yielding
    assert meter.load > 0.99
    meter.before_io_wait(1.0)
    clock.now += 5 * WINDOW  # and now the loop has waited as long
    assert meter.load < 0.01


def test_excluded_time_does_not_count_as_busy() -> None:
    clock = FakeClock()
    meter = LoopLoad(WINDOW, clock)
    for _ in range(200):
        stretch(meter, clock, busy=0.0002, waiting=0.0008)
    before = meter.load
    clock.now += WINDOW  # a long stretch on the loop, all of it excluded
    meter.exclude(WINDOW)
    assert meter.load == pytest.approx(before)
    meter.exclude(1.0)  # never more than the stretch: the past is not rewritten
    assert meter.load == pytest.approx(before)


async def test_the_run_has_one_meter_and_it_sees_the_loop_work() -> None:
    meter = loop_load()
    assert loop_load() is meter
    await trio.sleep(0)
    deadline = time.perf_counter() + 5 * LOOP_LOAD_WINDOW_SECONDS
    while time.perf_counter() < deadline:  # this task keeps the loop busy, never yielding
        pass
    assert meter.load > 0.9
