"""How busy the trio event loop has been lately: the share of recent time spent running tasks.

Work that would hold up the loop (a disk flush run on the loop's own thread, see
:mod:`p2pnode.storeworker`) is only cheap when the loop would otherwise have been waiting for
I/O. :class:`LoopLoad` measures exactly that, from trio's own instrument hooks: the time
between :meth:`~trio.abc.Instrument.after_io_wait` and the next
:meth:`~trio.abc.Instrument.before_io_wait` is spent running tasks, the rest waiting.

Resource handling: :func:`loop_load` installs one :class:`LoopLoad` per trio run, on first
use, for the rest of the run (a per-run variable holds it); it costs two short calls per
scheduler pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

import trio

#: Seconds over which the load is averaged (the time constant of an exponential average):
#: long enough to span many message round trips (about 1 ms each), short enough to follow a
#: burst of traffic within a few of them.
LOOP_LOAD_WINDOW_SECONDS: Final = 0.01


class LoopLoad(trio.abc.Instrument):
    """The exponential average of the loop's busy share over :data:`LOOP_LOAD_WINDOW_SECONDS`.

    Install it with :func:`trio.lowlevel.add_instrument` (or use :func:`loop_load`). Its
    :attr:`load` starts at 0 (idle) and is 1 for a loop that never waits for I/O.
    """

    def __init__(
        self,
        window: float = LOOP_LOAD_WINDOW_SECONDS,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._window = window
        self._clock = clock  # real seconds: trio's own clock may be a test's mock one
        self._load = 0.0  # average up to self._mark
        self._mark = clock()  # when the current stretch (busy or waiting) began
        self._waiting = False

    def before_io_wait(self, timeout: float) -> None:
        self._close_stretch(busy=True)
        self._waiting = True

    def after_io_wait(self, timeout: float) -> None:
        self._close_stretch(busy=False)
        self._waiting = False

    def exclude(self, seconds: float) -> None:
        """Leave the last ``seconds`` of the current busy stretch out of the average: time the
        caller spent on the loop deliberately, and accounts for itself (a flush it chose to
        run there must not make the loop look busy and so decide the next choice)."""
        if not self._waiting:
            self._mark = min(self._mark + seconds, self._clock())

    @property
    def load(self) -> float:
        """The busy share of the recent past, 0 to 1, the current stretch included."""
        elapsed = self._clock() - self._mark
        kept = math.exp(-elapsed / self._window)
        return self._load * kept + (0.0 if self._waiting else 1.0 - kept)

    def _close_stretch(self, *, busy: bool) -> None:
        now = self._clock()
        kept = math.exp(-(now - self._mark) / self._window)
        self._load = self._load * kept + (1.0 - kept if busy else 0.0)
        self._mark = now


_RUN_LOOP_LOAD: trio.lowlevel.RunVar[LoopLoad] = trio.lowlevel.RunVar("p2pnode.loop_load")


def loop_load() -> LoopLoad:
    """The current trio run's :class:`LoopLoad`, installed on the first call of the run.

    Raises:
        RuntimeError: outside a trio run.
    """
    try:
        return _RUN_LOOP_LOAD.get()
    except LookupError:
        meter = LoopLoad()
        trio.lowlevel.add_instrument(meter)
        _RUN_LOOP_LOAD.set(meter)
        return meter
