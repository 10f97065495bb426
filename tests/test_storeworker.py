"""The group-commit store worker: results only after the commit, failures kept to their change."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pnode import storeworker
from p2pnode.loopload import LOOP_LOAD_WINDOW_SECONDS
from p2pnode.store import DuplicateMessageError, Store
from p2pnode.storeworker import StoreWorker

T0 = 1_700_000_000_000
RECIPIENT = b"\x02" * 32


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (set from the store thread) until true; the caller bounds the time."""
    while not condition():
        await trio.sleep(0.001)


async def test_concurrent_writes_share_commits_and_each_gets_its_result(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    worker = StoreWorker(store)
    results: dict[int, bytes] = {}

    async def send(n: int) -> None:
        entry = await worker.write(lambda s: s.enqueue(mid(n), RECIPIENT, b"x", T0, T0 + 1000))
        results[n] = entry.message_id

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with trio.open_nursery() as senders:
                for n in range(200):
                    senders.start_soon(send, n)
            nursery.cancel_scope.cancel()
    assert results == {n: mid(n) for n in range(200)}
    assert worker.changes >= 200 and worker.commits < 200  # grouped, not one flush each
    store.close()


async def test_a_submitted_change_is_durable_when_its_callback_runs(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    worker = StoreWorker(store)
    seen_by_another_connection: list[object] = []

    def committed(_entry: object, error: BaseException | None) -> None:
        assert error is None
        other = sqlite3.connect(tmp_path / "s.db")
        seen_by_another_connection.append(
            other.execute("SELECT body FROM outbox WHERE id = ?", (mid(1),)).fetchone()
        )
        other.close()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await worker.submit(
                lambda s: s.enqueue(mid(1), RECIPIENT, b"durable", T0, T0 + 1000), committed
            )
            await wait_until(lambda: bool(seen_by_another_connection))
            nursery.cancel_scope.cancel()
    assert seen_by_another_connection == [(b"durable",)]
    store.close()


async def test_a_failing_change_fails_alone(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    store.enqueue(mid(1), RECIPIENT, b"first", T0, T0 + 1000)
    worker = StoreWorker(store)
    outcomes: dict[str, object] = {}

    async def duplicate() -> None:
        with pytest.raises(DuplicateMessageError):
            await worker.write(lambda s: s.enqueue(mid(1), RECIPIENT, b"again", T0, T0 + 1000))
        outcomes["duplicate"] = "refused"

    async def fresh() -> None:
        entry = await worker.write(lambda s: s.enqueue(mid(2), RECIPIENT, b"new", T0, T0 + 1000))
        outcomes["fresh"] = entry.body

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            async with trio.open_nursery() as callers:
                callers.start_soon(duplicate)
                callers.start_soon(fresh)
            nursery.cancel_scope.cancel()
    assert outcomes == {"duplicate": "refused", "fresh": b"new"}
    assert store.outbox_get(mid(1)).body == b"first"  # type: ignore[union-attr]
    store.close()


async def test_on_start_runs_when_its_commit_begins_not_while_another_runs(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    worker = StoreWorker(store)
    first_running, release_first = threading.Event(), threading.Event()
    started: list[str] = []
    seen_by_second_change: list[list[str]] = []

    def slow_first(s: Store) -> None:
        first_running.set()
        release_first.wait(10)
        s.enqueue(mid(1), RECIPIENT, b"first", T0, T0 + 1000)

    def second(s: Store) -> None:
        seen_by_second_change.append(list(started))
        s.enqueue(mid(2), RECIPIENT, b"second", T0, T0 + 1000)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            nursery.start_soon(functools.partial(worker.write, slow_first))
            await wait_until(first_running.is_set)
            nursery.start_soon(
                functools.partial(worker.write, second, on_start=lambda: started.append("second"))
            )
            await wait_until(lambda: worker._send.statistics().current_buffer_used == 1)
            assert started == []  # queued behind the running commit: not begun
            release_first.set()
            await wait_until(lambda: bool(seen_by_second_change))
            await wait_until(lambda: store.outbox_get(mid(2)) is not None)
            nursery.cancel_scope.cancel()
    # on_start ran once, before the change itself was applied
    assert started == ["second"] and seen_by_second_change == [["second"]]
    store.close()


async def test_on_an_idle_worker_on_start_runs_in_the_callers_step(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    worker = StoreWorker(store)
    events: list[str] = []

    def change(s: Store) -> None:
        events.append("applied")
        s.enqueue(mid(1), RECIPIENT, b"one", T0, T0 + 1000)

    def started() -> None:
        # The worker's task has not run yet: the work starts before the commit is handed on.
        events.append("started while the worker waits" if worker._idle else "started later")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await worker.write(change, on_start=started)
            nursery.cancel_scope.cancel()
    assert events == ["started while the worker waits", "applied"]
    assert store.outbox_get(mid(1)) is not None
    store.close()


async def test_a_failing_commit_callback_is_logged_and_the_others_still_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store.open(tmp_path / "s.db")
    hooked: list[int] = []
    worker = StoreWorker(store, after_commit=lambda: hooked.append(worker.commits))
    called: list[int] = []

    def broken(_result: object, _error: BaseException | None) -> None:
        raise RuntimeError("callback bug")

    def fine(_result: object, error: BaseException | None) -> None:
        assert error is None
        called.append(2)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await worker.submit(lambda s: s.enqueue(mid(1), RECIPIENT, b"1", T0, T0 + 1), broken)
            await worker.submit(lambda s: s.enqueue(mid(2), RECIPIENT, b"2", T0, T0 + 1), fine)
            await wait_until(lambda: bool(called) and bool(hooked))
            nursery.cancel_scope.cancel()
    assert called == [2] and hooked  # the node keeps running; receipts still go out
    assert "a store commit callback failed" in caplog.text
    assert store.outbox_get(mid(1)) is not None and store.outbox_get(mid(2)) is not None
    store.close()


async def test_a_commit_under_way_ends_and_reports_even_if_the_worker_is_cancelled(
    tmp_path: Path,
) -> None:
    store = Store.open(tmp_path / "s.db")
    worker = StoreWorker(store)
    running, release = threading.Event(), threading.Event()
    results: list[bytes] = []

    def slow(s: Store) -> bytes:
        running.set()
        release.wait(10)
        return s.enqueue(mid(1), RECIPIENT, b"kept", T0, T0 + 1000).body

    async def writer() -> None:
        results.append(await worker.write(slow))

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            outer.start_soon(writer)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await wait_until(running.is_set)
                nursery.cancel_scope.cancel()
                release.set()
    assert results == [b"kept"]
    assert store.outbox_get(mid(1)) is not None
    store.close()


async def test_a_failing_read_raises_to_its_caller_and_the_next_read_works(
    tmp_path: Path,
) -> None:
    store = Store.open(tmp_path / "s.db")
    store.enqueue(mid(1), RECIPIENT, b"there", T0, T0 + 1000)
    worker = StoreWorker(store)

    def broken(_s: Store) -> None:
        raise LookupError("query failed")

    with trio.fail_after(10):
        with pytest.raises(LookupError, match="query failed"):
            await worker.read(broken)
        entry = await worker.read(lambda s: s.outbox_get(mid(1)))
    assert entry is not None and entry.body == b"there"
    store.close()


async def test_the_store_thread_ends_when_idle_and_a_later_call_starts_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storeworker, "STORE_THREAD_IDLE_EXIT", 0.05)
    store = Store.open(tmp_path / "s.db")
    store.enqueue(mid(1), RECIPIENT, b"x", T0, T0 + 1000)
    worker = StoreWorker(store)
    assert not worker.thread_running  # nothing is started before it is needed
    with trio.fail_after(10):
        assert await worker.read(lambda s: s.outbox_get(mid(1))) is not None
        assert worker.thread_running
        await wait_until(lambda: not worker.thread_running)
        entry = await worker.read(lambda s: s.outbox_get(mid(1)))
    assert entry is not None and entry.body == b"x"
    store.close()


@pytest.fixture
def any_machine(monkeypatch: pytest.MonkeyPatch) -> float:
    """The bounds that follow the machine's speed made generous, so that what these tests show
    holds on a slow disk and a busy CI machine too: a commit's time, the wait for the loop to
    rest, and the loop's load (a test loop is mostly idle, but a shared CPU stretches its busy
    moments). Returns the bound on a commit's time."""
    monkeypatch.setattr(storeworker, "INLINE_COMMIT_MAX_SECONDS", 0.05)
    monkeypatch.setattr(storeworker, "INLINE_COMMIT_MAX_WAIT", 1.0)
    monkeypatch.setattr(storeworker, "INLINE_COMMIT_MAX_LOOP_LOAD", 0.95)
    return 0.05


def ran_on(threads: list[int]) -> Callable[[Store], None]:
    """A change that records the thread it ran on."""

    def change(_store: Store) -> None:
        threads.append(threading.get_ident())

    return change


async def test_a_small_commit_after_a_fast_one_runs_on_the_loop_thread(
    tmp_path: Path, any_machine: float
) -> None:
    store = Store.open(tmp_path / "s.db")
    worker = StoreWorker(store)
    loop_thread = threading.get_ident()
    threads: list[int] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            for _ in range(3):
                await worker.write(ran_on(threads))
            nursery.cancel_scope.cancel()
    # The first commit measures the disk on the store thread; the next ones, fast and alone,
    # save the two thread hand-offs.
    assert threads[0] != loop_thread
    assert threads[1:] == [loop_thread, loop_thread]
    assert (worker.commits, worker.inline_commits) == (3, 2)
    store.close()


@contextlib.asynccontextmanager
async def primed_worker(tmp_path: Path) -> AsyncIterator[tuple[StoreWorker, trio.Nursery]]:
    """A running worker whose last commit was fast, so that its next small commit may run on
    the loop's thread, and a nursery for the test's tasks; all stopped on exit."""
    store = Store.open(tmp_path / "s.db")
    worker = StoreWorker(store)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                await worker.write(ran_on([]))
                yield worker, nursery
                nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_large_group_commits_on_the_store_thread(
    tmp_path: Path, any_machine: float
) -> None:
    threads: list[int] = []
    group = storeworker.INLINE_COMMIT_MAX_CHANGES + 1
    async with primed_worker(tmp_path) as (worker, _):
        commits = worker.commits
        async with trio.open_nursery() as writers:
            for _ in range(group):
                writers.start_soon(worker.write, ran_on(threads))
    assert worker.commits == commits + 1  # one group
    assert len(threads) == group and threading.get_ident() not in threads


async def test_after_a_slow_commit_the_next_runs_on_the_store_thread(
    tmp_path: Path, any_machine: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[int] = []
    async with primed_worker(tmp_path) as (worker, _):
        await worker.write(ran_on(threads))  # runs inline: the commit before it was fast
        # Judged against a bound of 0, that commit (however quick) took too long: a slow disk.
        monkeypatch.setattr(storeworker, "INLINE_COMMIT_MAX_SECONDS", 0.0)
        await worker.write(ran_on(threads))  # so the loop is not held up twice
        monkeypatch.setattr(storeworker, "INLINE_COMMIT_MAX_SECONDS", any_machine)
        await worker.write(ran_on(threads))  # and once the disk is fast again, inline
    loop_thread = threading.get_ident()
    assert threads[0] == loop_thread
    assert threads[1] != loop_thread
    assert threads[2] == loop_thread


async def test_no_commit_runs_on_the_loop_thread_while_the_store_thread_reads(
    tmp_path: Path, any_machine: float
) -> None:
    reading, release = threading.Event(), threading.Event()
    threads: list[int] = []
    read_done = trio.Event()

    def long_read(_store: Store) -> None:
        reading.set()
        release.wait(10)
        threads.append(-1)  # marks the end of the read in the order of events

    async with primed_worker(tmp_path) as (worker, nursery):

        async def read() -> None:
            await worker.read(long_read)
            read_done.set()

        nursery.start_soon(read)
        await wait_until(reading.is_set)
        nursery.start_soon(worker.write, ran_on(threads))
        await trio.testing.wait_all_tasks_blocked()
        release.set()
        await read_done.wait()
        await wait_until(lambda: len(threads) == 2)
    # The write waited for the read, and ran on the store thread: the one connection is never
    # used by two threads at once.
    assert threads[0] == -1 and threads[1] != threading.get_ident()


async def test_while_the_loop_is_busy_small_commits_run_on_the_store_thread(
    tmp_path: Path, any_machine: float
) -> None:
    threads: list[int] = []
    async with primed_worker(tmp_path) as (worker, _):
        # Other work keeps the loop busy, never waiting for I/O, for several windows.
        deadline = time.perf_counter() + 5 * LOOP_LOAD_WINDOW_SECONDS
        while time.perf_counter() < deadline:
            pass
        await worker.write(ran_on(threads))
    assert threads[0] != threading.get_ident()  # the flush did not add to the loop's backlog


async def test_a_burst_of_submits_makes_one_commit(tmp_path: Path, any_machine: float) -> None:
    burst = storeworker.INLINE_COMMIT_MAX_CHANGES - 1  # small enough for the loop's thread
    commits_per_burst: list[int] = []
    committed: list[int] = []

    def note(n: int, _result: None, _error: BaseException | None) -> None:
        committed.append(n)

    async with primed_worker(tmp_path) as (worker, _):
        for _ in range(10):  # the tasks' order varies from one scheduler pass to the next
            committed.clear()
            commits = worker.commits
            # As a link reader does with the frames of one read: the first submit yields (the
            # worker is idle), the others follow without yielding.
            for n in range(burst):
                await worker.submit(ran_on([]), functools.partial(note, n))
            await wait_until(lambda: len(committed) == burst)
            assert committed == list(range(burst))
            commits_per_burst.append(worker.commits - commits)
    assert commits_per_burst == [1] * 10  # one flush for each burst, not one per change


async def test_a_loop_that_never_rests_does_not_hold_a_small_commit_back(
    tmp_path: Path, any_machine: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storeworker, "INLINE_COMMIT_MAX_WAIT", 0.01)  # well inside fail_after
    threads: list[int] = []
    done = trio.Event()

    async def always_ready() -> None:  # keeps the loop from resting until the write is done
        while not done.is_set():
            await trio.lowlevel.checkpoint()

    async with primed_worker(tmp_path) as (worker, nursery):
        nursery.start_soon(always_ready)
        with trio.fail_after(1):
            await worker.write(ran_on(threads))
        done.set()
    assert threads[0] != threading.get_ident()  # the busy loop's commit went to the thread
