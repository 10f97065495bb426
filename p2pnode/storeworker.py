"""Group commit: many callers' store changes, one durable commit for each group.

SQLite's commit costs a disk flush (0.2-0.4 ms here, more on slow disks); doing one per
message would cap throughput at a few thousand messages per second and block the event loop.
:class:`StoreWorker` collects the changes submitted while the previous commit was running and
applies them in one :meth:`Store.batch`, then hands each caller its result. A result is only
ever handed out after the commit that made it durable.

Where a commit runs: a group runs in a thread of the worker's own, so that the loop goes on
reading, sealing and opening while the disk flushes. A small commit on an otherwise idle
store runs on the loop's own thread instead, when the disk has been fast (the rule and its
bounds: :class:`StoreWorker`): on the round trip, the two thread hand-offs cost more than
the loop loses by waiting for one flush.

Every threaded store call runs on one long-lived thread of the worker's own
(:class:`_StoreThread`) rather than through :func:`trio.to_thread.run_sync`: a plain queue to
a waiting thread costs 20-30 us less per call than trio's general-purpose one (measured 35
against 55 us with the CPUs busy). A commit's callbacks (and so its receipts) run in the
callback that hands its result back to trio, a scheduler round before the worker's task could
run them (on the round trip, 0.07 ms from the commit's end to the receipt hook here, against
0.12-0.14 ms before).

Resource handling: :meth:`StoreWorker.run` owns the worker loop; it stops when cancelled, after
finishing the batch in progress (a commit is never abandoned half-way: it runs to its end, on
either thread, and its results are delivered). The store thread starts on the first call and
ends by itself after :data:`STORE_THREAD_IDLE_EXIT` seconds without work.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import outcome
import trio
import trio.testing

from p2pnode.loopload import loop_load
from p2pnode.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Changes applied in one commit at most; bounds the latency a large burst adds to its first
#: change and the time the write lock is held.
MAX_BATCH: Final = 1000
#: Changes waiting for a commit at most; a submitter beyond this waits (backpressure).
MAX_QUEUED: Final = 10_000
#: Changes submitted without yielding to the scheduler at most: a reader going through a
#: large read must still let finished commits deliver their results (receipts) promptly.
MAX_SUBMITS_WITHOUT_YIELD: Final = 16
#: Seconds the store thread waits for work before it ends (the next call starts a new one);
#: as trio's own thread cache does, so an idle node holds no thread.
STORE_THREAD_IDLE_EXIT: Final = 10.0
#: Changes a commit may hold at most and still run on the event loop's own thread (see
#: :class:`StoreWorker`). A few changes cost about what one does (the disk flush dominates);
#: a larger group means a busy node, whose loop has other work to do meanwhile.
INLINE_COMMIT_MAX_CHANGES: Final = 8
#: Seconds the previous commit may have taken at most for the next small one to run on the
#: event loop's thread: the bound on how long one commit may hold up the loop on a healthy
#: disk. A commit here takes 0.2-0.4 ms, one that also checkpoints the WAL 1-1.5 ms; a disk
#: slower than this (a busy or spinning disk: fsync of 5-20 ms) gets every commit on the
#: store thread, and the loop is never held up by more than one slow flush.
INLINE_COMMIT_MAX_SECONDS: Final = 0.003
#: The loop's recent busy share (:mod:`p2pnode.loopload`, commits run on it left out) above
#: which every commit goes to the store thread: a flush on the loop is only free while the
#: loop would otherwise wait for I/O. Measured here, with one message at a time the
#: receiver's loop is 30-40 % busy and the sender's about 50 %; at 1,000 messages per second
#: both are 50-80 % busy, at 2,000 mostly 60-90 %. Without this bound, small commits ran on
#: the loop at 2,000 messages per second too, and latency p99 went from 11-12 to 170-370 ms.
INLINE_COMMIT_MAX_LOOP_LOAD: Final = 0.6
#: Seconds a small commit waits at most for the loop to come to rest (every ready task run,
#: no I/O ready) before it runs on the loop's thread; if the loop is still busy then, the
#: commit goes to the store thread. On the round trip the loop rests within 0.05 ms. Without
#: this bound, 50 senders in one process held changes back until their loop rested: p99 under
#: load went from 139 to 2,808 ms.
INLINE_COMMIT_MAX_WAIT: Final = 0.0005


class _StoreThread:
    """Runs functions one at a time, in call order, on one OS thread, for trio tasks.

    :meth:`call` is not cancellable once made: the function runs to its end and its outcome
    goes to the caller (a store change abandoned half-way would leave its caller unsure
    whether it was committed). The thread is started on demand and ends after
    :data:`STORE_THREAD_IDLE_EXIT` seconds without work.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[
            tuple[
                Callable[[], Any],
                trio.lowlevel.TrioToken,
                trio.lowlevel.Task,
                Callable[[], None] | None,
            ]
        ] = queue.SimpleQueue()
        self._guard = threading.Lock()  # between a call and the thread deciding to end
        self._thread: threading.Thread | None = None
        self._in_flight = 0  # calls made and not yet returned to their callers (trio only)

    @property
    def running(self) -> bool:
        """Whether the thread is alive now (for tests and status)."""
        with self._guard:
            return self._thread is not None

    @property
    def busy(self) -> bool:
        """Whether a call is under way (made, and its result not yet back with its caller).
        While it is not, nothing runs on the thread: trio may use what the calls use."""
        return self._in_flight > 0

    async def call(self, function: Callable[[], T], *, then: Callable[[], None] | None = None) -> T:
        """Run ``function()`` on the thread and return its result (or raise its exception).

        ``then``, if given, runs in trio as soon as ``function`` has returned, before the
        caller is woken: in the callback that hands the result back, one scheduler round
        sooner than the caller could. It must not block; an exception in it is logged.
        """
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        with self._guard:
            self._calls.put((function, token, task, then))
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()
        self._in_flight += 1
        try:
            # Daemon: the thread never outlives a waiting caller (the wait is not cancellable),
            # so trio.run cannot return, and the interpreter cannot exit, while it runs a call.
            result: T = await trio.lowlevel.wait_task_rescheduled(
                lambda _raise_cancel: trio.lowlevel.Abort.FAILED
            )
        finally:
            self._in_flight -= 1
        return result

    def _serve(self) -> None:
        while True:
            try:
                function, token, task, then = self._calls.get(timeout=STORE_THREAD_IDLE_EXIT)
            except queue.Empty:
                with self._guard:
                    if self._calls.empty():
                        self._thread = None
                        return
                continue
            result = outcome.capture(function)
            try:
                token.run_sync_soon(_hand_back, task, result, then)
            except trio.RunFinishedError:  # cannot happen while the caller waits; be safe
                log.error("store thread: the caller's trio run has ended")


def _hand_back(
    task: trio.lowlevel.Task, result: outcome.Outcome[Any], then: Callable[[], None] | None
) -> None:
    if then is not None:
        try:
            then()
        except Exception:
            log.exception("a store thread's follow-up failed")
    trio.lowlevel.reschedule(task, result)


def _run_start_hook(hook: Callable[[], None] | None) -> None:
    if hook is not None:
        try:
            hook()
        except Exception:
            log.exception("a store change's start hook failed")


@dataclass
class _Job(Generic[T]):
    change: Callable[[Store], T]
    done: trio.Event | None = None  # for a caller waiting on the commit
    result: T | None = None
    error: BaseException | None = None
    on_commit: Callable[[T | None, BaseException | None], None] | None = None
    on_start: Callable[[], None] | None = None


class StoreWorker:
    """Serialises every use of one :class:`Store` and commits writes in groups.

    Use :meth:`write` (wait for the durable result), :meth:`submit` (continue at once; a
    callback runs after the commit) or :meth:`read` (no commit needed).

    Where a commit runs. A small one (at most :data:`INLINE_COMMIT_MAX_CHANGES` changes) runs
    on the event loop's own thread when all of these hold: the store thread is not in use
    (nothing else touches the connection), the previous commit took at most
    :data:`INLINE_COMMIT_MAX_SECONDS` (the disk is fast), and the loop has lately been busy
    at most :data:`INLINE_COMMIT_MAX_LOOP_LOAD` of the time (it would mostly have waited
    anyway). Before it commits there, the worker lets every ready task run until the loop
    would wait for I/O, and takes the changes they add: a burst stays one commit. Every other
    commit runs on the store thread.

    Why: handing a commit to a thread and its result back costs two thread wake-ups, and on
    this machine's virtual CPUs that is 0.1-0.2 ms when the other CPU is busy, on every
    message's round trip (the sender's outbox commit, the receiver's inbox commit before its
    receipt). A commit on the loop holds it up for one disk flush, so it is kept to a loop
    with time to spare: a busy node's commits go to the thread and its loop keeps working
    while the disk flushes, and a slow disk sends every commit to the thread after the first
    slow one. The cost: a disk that stalls all at once (a flush of seconds) holds up the loop
    for the commit under way, where before it held up only the store.
    """

    def __init__(self, store: Store, *, after_commit: Callable[[], None] | None = None) -> None:
        self.store = store
        #: Called once after each group commit, when every change's callback has run (the node
        #: acknowledges a whole commit's messages with one receipt there).
        self.after_commit = after_commit
        self._send, self._receive = trio.open_memory_channel[_Job[Any]](MAX_QUEUED)
        self._thread = _StoreThread("p2pnode-store")  # the only thread using the store
        self._idle = False  # waiting for changes, no commit running
        self._submits_without_yield = 0
        #: Seconds the last commit took; None before the first (then the disk's speed is
        #: unknown, and the commit goes to the store thread).
        self._last_commit_seconds: float | None = None
        #: Commits made, those of them run on the event loop's thread, and changes committed
        #: (for status and benchmarks).
        self.commits = 0
        self.inline_commits = 0
        self.changes = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Commit submitted changes until cancelled."""
        loop_load()  # start the run's load meter now: it has a history by the first decision
        task_status.started()
        while True:
            self._idle = True
            try:
                first = await self._receive.receive()
            finally:
                self._idle = False
            jobs = self._take_queued([first])
            inline = self._may_commit_inline(len(jobs))
            if inline:
                # Let every task that is ready run first, until the loop would wait for I/O: a
                # reader in the middle of a burst of frames adds the rest of them to this
                # commit rather than making one each, and a commit on the loop's thread then
                # holds up no work that was ready. A loop that does not come to rest soon is
                # busy: the commit goes to the thread. (Shielded: these changes are taken.)
                # wait_all_tasks_blocked is trio's own test of "the loop would now wait for
                # I/O" (MockClock's autojump uses it); it lives in trio.testing, but nothing
                # in it is specific to tests.
                with trio.CancelScope(shield=True) as wait:
                    wait.deadline = trio.current_time() + INLINE_COMMIT_MAX_WAIT
                    await trio.testing.wait_all_tasks_blocked()
                jobs = self._take_queued(jobs)
                inline = not wait.cancelled_caught and self._may_commit_inline(len(jobs))
            # Once a batch starts it is committed (or fails) and every caller hears about it:
            # the thread call cannot be cancelled, so cancelling the node leaves no caller
            # waiting forever.
            for job in jobs:
                _run_start_hook(job.on_start)
            if inline:
                self._apply(jobs)
                self.inline_commits += 1
                loop_load().exclude(self._last_commit_seconds or 0.0)
                self._report(jobs)
            else:
                await self._thread.call(
                    functools.partial(self._apply, jobs), then=functools.partial(self._report, jobs)
                )

    def _take_queued(self, jobs: list[_Job[Any]]) -> list[_Job[Any]]:
        """``jobs`` and those queued now, up to :data:`MAX_BATCH` in all."""
        while len(jobs) < MAX_BATCH:
            try:
                jobs.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return jobs

    def _may_commit_inline(self, changes: int) -> bool:
        """Whether a commit of ``changes`` changes runs on the loop's thread (class doc)."""
        last = self._last_commit_seconds
        return (
            changes <= INLINE_COMMIT_MAX_CHANGES
            and last is not None
            and last <= INLINE_COMMIT_MAX_SECONDS
            and not self._thread.busy
            and loop_load().load <= INLINE_COMMIT_MAX_LOOP_LOAD
        )

    def _report(self, jobs: list[_Job[Any]]) -> None:
        """After a commit, in trio: each change's callback, then :attr:`after_commit`. Run
        as the commit's result comes back (receipts leave a scheduler round sooner); a
        callback that raises is logged, and the others still run."""
        for job in jobs:
            if job.on_commit is not None:
                try:
                    job.on_commit(job.result, job.error)
                except Exception:
                    log.exception("a store commit callback failed")
            if job.done is not None:
                job.done.set()
        if self.after_commit is not None:
            try:
                self.after_commit()
            except Exception:
                log.exception("the after-commit hook failed")

    def _apply(self, jobs: list[_Job[Any]]) -> None:
        started = time.perf_counter()
        try:
            with self.store.batch():
                for job in jobs:
                    try:
                        job.result = job.change(self.store)
                    except Exception as exc:  # noqa: BLE001 (handed to the caller)
                        job.error = exc
        except Exception as exc:  # noqa: BLE001 (the commit failed: every change is lost)
            log.error("store commit failed: %s", exc)
            for job in jobs:
                job.result, job.error = None, exc
            return
        finally:
            self._last_commit_seconds = time.perf_counter() - started
        self.commits += 1
        self.changes += len(jobs)

    async def write(
        self, change: Callable[[Store], T], *, on_start: Callable[[], None] | None = None
    ) -> T:
        """Apply ``change`` in the next group commit and return its result once durable.

        ``on_start``, if given, is called when the commit that holds ``change`` begins (it
        must not block; an exception in it is logged): work that may overlap the commit, such
        as delivering a message whose outbox row is being written, starts then. If the worker
        is idle, that commit begins as soon as the worker runs, and ``on_start`` is called at
        once, in the caller's step: the work is then under way before the commit begins,
        rather than beside it (on the round trip, a seal beside a commit that had begun ran
        0.05-0.07 ms slower). Otherwise the worker calls it as that commit begins, so that
        under load the work keeps pace with the commits instead of running ahead of them.

        Raises:
            whatever ``change`` raised (its effects rolled back), or the commit's StoreError.
        """
        done = trio.Event()
        idle = self._idle and self._send.statistics().current_buffer_used == 0
        job: _Job[T] = _Job(change, done=done, on_start=None if idle else on_start)
        if idle:
            self._send.send_nowait(job)  # cannot block: nothing is queued
            _run_start_hook(on_start)
        else:
            await self._send.send(job)
        await done.wait()
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    async def submit(
        self,
        change: Callable[[Store], T],
        on_commit: Callable[[T | None, BaseException | None], None],
    ) -> None:
        """Queue ``change``; ``on_commit(result, error)`` runs after its commit. Returns as soon
        as the change is queued (waits only if :data:`MAX_QUEUED` are pending).

        While a commit is running this mostly returns without yielding: a reader that submits
        each of many frames then goes through them without a scheduler round per frame, and its
        changes make the next group. It yields when the worker is idle, so that the commit
        starts now, and after :data:`MAX_SUBMITS_WITHOUT_YIELD` changes.
        """
        job = _Job(change, on_commit=on_commit)
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            await self._send.send(job)  # backpressure
            return
        self._submits_without_yield += 1
        if self._idle or self._submits_without_yield >= MAX_SUBMITS_WITHOUT_YIELD:
            self._submits_without_yield = 0
            await trio.lowlevel.checkpoint()

    async def read(self, query: Callable[[Store], T]) -> T:
        """Run a read-only ``query`` on the store thread, between commits."""
        store = self.store
        return await self._thread.call(lambda: query(store))

    @property
    def thread_running(self) -> bool:
        """Whether the store thread is alive (it ends by itself when idle)."""
        return self._thread.running
