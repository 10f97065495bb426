"""The group-commit store worker: results only after the commit, failures kept to their change."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from p2pnode.store import DuplicateMessageError, Store
from p2pnode.storeworker import StoreWorker

T0 = 1_700_000_000_000
RECIPIENT = b"\x02" * 32


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


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
            while not seen_by_another_connection:
                await trio.sleep(0.001)
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
