"""Group commit: many callers' store changes, one durable commit, off the event loop.

SQLite's commit costs a disk flush (about 0.13 ms here, more on slow disks); doing one per
message would cap throughput at a few thousand messages per second and block the event loop.
:class:`StoreWorker` collects the changes submitted while the previous commit was running and
applies them in one :meth:`Store.batch` in a worker thread, then hands each caller its result.
A result is only ever handed out after the commit that made it durable.

Resource handling: :meth:`StoreWorker.run` owns the worker loop; it stops when cancelled, after
finishing the batch in progress (a commit is never abandoned half-way: the thread runs to its
end, and its results are delivered).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import trio

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


@dataclass
class _Job(Generic[T]):
    change: Callable[[Store], T]
    done: trio.Event | None = None  # for a caller waiting on the commit
    result: T | None = None
    error: BaseException | None = None
    on_commit: Callable[[T | None, BaseException | None], None] | None = None


class StoreWorker:
    """Serialises every use of one :class:`Store` and commits writes in groups.

    Use :meth:`write` (wait for the durable result), :meth:`submit` (continue at once; a
    callback runs after the commit) or :meth:`read` (no commit needed).
    """

    def __init__(self, store: Store, *, after_commit: Callable[[], None] | None = None) -> None:
        self.store = store
        #: Called once after each group commit, when every change's callback has run (the node
        #: acknowledges a whole commit's messages with one receipt there).
        self.after_commit = after_commit
        self._send, self._receive = trio.open_memory_channel[_Job[Any]](MAX_QUEUED)
        self._lock = trio.Lock()  # one thread uses the connection at a time
        self._idle = False  # waiting for changes, no commit running
        self._submits_without_yield = 0
        #: Commits made, and changes committed (for status and benchmarks).
        self.commits = 0
        self.changes = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Commit submitted changes until cancelled."""
        task_status.started()
        while True:
            self._idle = True
            try:
                first = await self._receive.receive()
            finally:
                self._idle = False
            jobs = [first]
            while len(jobs) < MAX_BATCH:
                try:
                    jobs.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            async with self._lock:
                # Shielded: once a batch starts it is committed (or fails) and every caller
                # hears about it; cancelling the node must not leave callers waiting forever.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._apply, jobs)
            for job in jobs:
                if job.on_commit is not None:
                    job.on_commit(job.result, job.error)
                if job.done is not None:
                    job.done.set()
            if self.after_commit is not None:
                self.after_commit()

    def _apply(self, jobs: list[_Job[Any]]) -> None:
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
        self.commits += 1
        self.changes += len(jobs)

    async def write(self, change: Callable[[Store], T]) -> T:
        """Apply ``change`` in the next group commit and return its result once durable.

        Raises:
            whatever ``change`` raised (its effects rolled back), or the commit's StoreError.
        """
        done = trio.Event()
        job: _Job[T] = _Job(change, done=done)
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
        """Run a read-only ``query`` in a worker thread, between commits."""
        async with self._lock:
            return await trio.to_thread.run_sync(query, self.store)
