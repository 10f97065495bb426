"""Tests for p2pnode.store: durability, corruption handling, migrations and every operation."""

from __future__ import annotations

import itertools
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pnode.store import (
    APPLICATION_ID,
    MAX_BODY_SIZE,
    MAX_CONTACT_NAME_LENGTH,
    MAX_ERROR_TEXT,
    MAX_LIST_LIMIT,
    MAX_PEER_RECORD_SIZE,
    MIGRATIONS,
    SCHEMA_VERSION,
    ContactError,
    DeliveryState,
    DuplicateMessageError,
    Migration,
    Store,
    StoreCorruptError,
    StoreError,
    StoreVersionError,
    UnknownMessageError,
)

T0 = 1_700_000_000_000  # a fixed "now" in ms; the store never reads the clock
HOUR = 3_600_000
ROOT = Path(__file__).resolve().parent.parent


def mid(n: int) -> bytes:
    """A 16-byte message id."""
    return n.to_bytes(16, "big")


def key(n: int) -> bytes:
    """A 32-byte node key."""
    return bytes([n]) * 32


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture(autouse=True)
def private_umask() -> Iterator[None]:
    """Files the tests write by hand are private, as the store demands of an existing file."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_existing_database_readable_by_others_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    db_path.chmod(0o644)
    with pytest.raises(StoreError, match=f"chmod 600 {db_path}"):
        Store.open(db_path)


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as s:
        yield s


def raw(path: Path) -> sqlite3.Connection:
    """An independent connection, as another process would have."""
    return sqlite3.connect(path)


def make_foreign_db(path: Path, application_id: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id = {application_id}")
    conn.execute("CREATE TABLE songs (title TEXT)")
    conn.execute("INSERT INTO songs VALUES ('la')")
    conn.commit()
    conn.close()


# ------------------------------------------------------------------------------------ opening


def test_open_creates_file_with_mode_0600_and_expected_pragmas(db_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        with Store.open(db_path) as s:
            assert s.path == db_path
            s.enqueue(mid(1), key(1), b"hi", T0, T0 + HOUR)
            # SQLite gives its -wal and -shm files the database file's mode.
            for name in (db_path.name, db_path.name + "-wal", db_path.name + "-shm"):
                mode = stat.S_IMODE((db_path.parent / name).stat().st_mode)
                assert mode == 0o600, (name, oct(mode))
            conn = raw(db_path)
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            conn.close()
    finally:
        os.umask(old_umask)


def test_connection_pragmas(store: Store) -> None:
    conn = store._conn  # the store's own connection
    assert conn is not None
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_reopen_keeps_data_and_accepts_str_path(db_path: Path) -> None:
    with Store.open(str(db_path)) as s:
        s.contact_add("alice", key(1), T0)
    with Store.open(db_path) as s:
        assert s.contact_get("alice").node_key == key(1)


def test_close_is_idempotent_and_closed_store_refuses_calls(db_path: Path) -> None:
    s = Store.open(db_path)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.unread_count()
    with pytest.raises(StoreError, match="closed"):
        s.enqueue(mid(1), key(1), b"x", T0, T0 + 1)


def test_missing_directory_is_a_store_error_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "store.db"
    with pytest.raises(StoreError, match="cannot create"):
        Store.open(path)
    assert not path.parent.exists()


def test_empty_existing_file_is_initialised(db_path: Path) -> None:
    db_path.touch()
    with Store.open(db_path) as s:
        assert s.unread_count() == 0


def test_empty_sqlite_database_is_initialised(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode = WAL")  # writes a header page, no tables
    conn.close()
    with Store.open(db_path) as s:
        assert s.outbox_counts()[DeliveryState.QUEUED] == 0


# ------------------------------------------------------------------------------------ corruption


def assert_refused_unchanged(path: Path, match: str | None = None) -> StoreCorruptError:
    before = path.read_bytes()
    with pytest.raises(StoreCorruptError, match=match) as info:
        Store.open(path)
    assert path.read_bytes() == before
    message = str(info.value)
    assert str(path) in message
    assert "NOT modified" in message
    assert "move the file aside" in message and "backup" in message
    return info.value


def test_garbage_file_is_refused_and_left_unchanged(db_path: Path) -> None:
    db_path.write_bytes(bytes(range(256)) * 20)
    assert_refused_unchanged(db_path, match="not a SQLite database")
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]


def test_short_text_file_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"hello\n")
    assert_refused_unchanged(db_path)


def test_garbage_after_sqlite_magic_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"SQLite format 3\x00" + b"\xa5" * 8000)
    assert_refused_unchanged(db_path)


def test_sqlite_header_alone_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 20)
    assert_refused_unchanged(db_path, match="too short")


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_database_is_refused_and_left_unchanged(db_path: Path, keep: float) -> None:
    with Store.open(db_path) as s:
        for n in range(200):
            s.accept_incoming(mid(n), key(1), bytes([n % 256]) * 1000, T0, T0)
    data = db_path.read_bytes()
    db_path.write_bytes(data[: int(len(data) * keep)])
    assert_refused_unchanged(db_path)


def test_recovery_by_moving_the_file_aside_works(db_path: Path) -> None:
    with Store.open(db_path) as s:
        for n in range(50):
            s.accept_incoming(mid(n), key(1), b"x" * 1000, T0, T0)
    data = db_path.read_bytes()
    db_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreCorruptError):
        Store.open(db_path)
    db_path.rename(db_path.with_name("store.db.broken"))  # as the message advises
    with Store.open(db_path) as s:
        assert s.unread_count() == 0


def test_foreign_sqlite_database_is_refused(db_path: Path) -> None:
    make_foreign_db(db_path, 0x12345678)
    err = assert_refused_unchanged(db_path, match="another program")
    assert "0x12345678" in str(err)
    conn = raw(db_path)
    assert conn.execute("SELECT title FROM songs").fetchall() == [("la",)]
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 1
    conn.close()


def test_foreign_database_without_application_id_is_refused(db_path: Path) -> None:
    make_foreign_db(db_path, 0)
    assert_refused_unchanged(db_path, match="another program")


def test_marked_database_without_schema_version_is_refused(db_path: Path) -> None:
    make_foreign_db(db_path, APPLICATION_ID)
    assert_refused_unchanged(db_path, match="no schema version")


def test_corrupt_error_is_a_store_error() -> None:
    assert issubclass(StoreCorruptError, StoreError)
    assert issubclass(StoreVersionError, StoreError)


def test_store_survives_a_process_crash(db_path: Path) -> None:
    """A process that dies right after enqueue/accept_incoming returned keeps both rows."""
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from p2pnode.store import Store\n"
        "s = Store.open(Path(sys.argv[1]))\n"
        "s.enqueue(bytes(16), bytes(32), b'out', 1, 2)\n"
        "s.accept_incoming(bytes(16), bytes(32), b'in', 1, 1)\n"
        "os._exit(0)\n"  # no close, no checkpoint, no cleanup
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    subprocess.run([sys.executable, "-c", script, str(db_path)], check=True, env=env)
    with Store.open(db_path) as s:
        entry = s.outbox_get(bytes(16))
        assert entry is not None and entry.body == b"out"
        assert [m.body for m in s.inbox_list(False, 10)] == [b"in"]


# ------------------------------------------------------------------------------------ migrations


def add_notes_column(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE contacts ADD COLUMN notes TEXT NOT NULL DEFAULT ''")


def test_schema_version_matches_migrations() -> None:
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 1


def test_v1_database_is_migrated_to_a_newer_schema(db_path: Path) -> None:
    with Store.open(db_path, migrations=MIGRATIONS[:1]) as s:
        s.contact_add("alice", key(1), T0)
        s.enqueue(mid(1), key(1), b"queued before the upgrade", T0, T0 + HOUR)
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()

    calls: list[int] = []

    def migration_2(conn: sqlite3.Connection) -> None:
        calls.append(1)
        add_notes_column(conn)

    migrations: tuple[Migration, ...] = (*MIGRATIONS[:1], migration_2)
    with Store.open(db_path, migrations=migrations) as s:
        assert s.contact_get("alice").node_key == key(1)
        entry = s.outbox_get(mid(1))
        assert entry is not None and entry.body == b"queued before the upgrade"
    with Store.open(db_path, migrations=migrations):
        pass
    assert calls == [1]  # applied once, not again on the next open
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT name, notes FROM contacts").fetchall() == [("alice", "")]
    conn.close()


def test_pending_messages_of_a_v1_database_are_still_due_after_the_upgrade(
    db_path: Path,
) -> None:
    with Store.open(db_path, migrations=MIGRATIONS[:1]) as s:
        for i in range(3):
            s.enqueue(mid(i), key(1), b"x", T0 + i, T0 + HOUR)
        s.enqueue(mid(9), key(2), b"old", T0, T0 + 10)
    with Store.open(db_path) as s:
        due = [e.message_id for e in s.outbox_due(T0 + 5, 10)]
        assert due == [mid(0), mid(9), mid(1), mid(2)]  # by next attempt, then queue order
        assert [e.message_id for e in s.outbox_pending_for(key(1), T0 + 5, 10)] == [
            mid(0),
            mid(1),
            mid(2),
        ]
        assert s.outbox_expire(T0 + 10) == [mid(9)]


def test_failed_migration_is_rolled_back(db_path: Path) -> None:
    with Store.open(db_path) as s:
        s.contact_add("alice", key(1), T0)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        conn.execute("DELETE FROM contacts")
        raise RuntimeError("boom")

    with pytest.raises(
        StoreError, match=rf"from schema {SCHEMA_VERSION} to {SCHEMA_VERSION + 1} failed: boom"
    ):
        Store.open(db_path, migrations=(*MIGRATIONS, broken))
    conn = raw(db_path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in names
    conn.close()
    with Store.open(db_path) as s:
        assert s.contact_get("alice").node_key == key(1)


def test_migration_that_commits_is_detected(db_path: Path) -> None:
    with Store.open(db_path):
        pass

    def commits(conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    with pytest.raises(StoreError, match="must not commit"):
        Store.open(db_path, migrations=(*MIGRATIONS, commits))


def test_newer_schema_is_refused(db_path: Path) -> None:
    with Store.open(db_path, migrations=(*MIGRATIONS, add_notes_column)):
        pass
    before = db_path.read_bytes()
    with pytest.raises(StoreVersionError) as info:
        Store.open(db_path)
    assert (
        f"created by a newer p2pnode (schema {SCHEMA_VERSION + 1}, "
        f"this version knows {SCHEMA_VERSION})"
    ) in str(info.value)
    assert str(db_path) in str(info.value)
    assert db_path.read_bytes() == before


def test_empty_migration_list_is_rejected(db_path: Path) -> None:
    with pytest.raises(ValueError, match="migrations"):
        Store.open(db_path, migrations=())


# ------------------------------------------------------------------------------------ outbox


def test_enqueue_and_get(store: Store) -> None:
    entry = store.enqueue(mid(1), key(2), b"hello", T0, T0 + HOUR)
    assert store.outbox_get(mid(1)) == entry
    assert entry.state is DeliveryState.QUEUED
    assert (entry.attempts, entry.last_error) == (0, None)
    assert entry.created_at == entry.updated_at == entry.next_attempt_at == T0
    assert entry.expires_at == T0 + HOUR
    assert store.outbox_get(mid(2)) is None


def test_enqueue_is_durable_before_returning(store: Store, db_path: Path) -> None:
    store.enqueue(mid(7), key(2), b"promise", T0, T0 + HOUR)
    conn = raw(db_path)  # the store is still open; a second connection sees the commit
    rows = conn.execute("SELECT recipient, body, state FROM outbox WHERE id = ?", (mid(7),))
    assert rows.fetchall() == [(key(2), b"promise", "queued")]
    conn.close()


def test_enqueue_duplicate_id_is_refused(store: Store) -> None:
    store.enqueue(mid(1), key(2), b"first", T0, T0 + HOUR)
    with pytest.raises(DuplicateMessageError, match=mid(1).hex()):
        store.enqueue(mid(1), key(3), b"second", T0 + 1, T0 + HOUR)
    entry = store.outbox_get(mid(1))
    assert entry is not None and (entry.body, entry.recipient) == (b"first", key(2))


def test_enqueue_rejects_expiry_not_after_now(store: Store) -> None:
    with pytest.raises(ValueError, match="expires_at"):
        store.enqueue(mid(1), key(2), b"x", T0, T0)


def test_outbox_due_filters_and_orders(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"a", T0 + 2, T0 + HOUR)
    store.enqueue(mid(2), key(1), b"b", T0, T0 + HOUR)
    store.enqueue(mid(3), key(1), b"c", T0 + 1, T0 + HOUR)
    store.enqueue(mid(4), key(1), b"later", T0 + 50, T0 + HOUR)
    store.enqueue(mid(5), key(1), b"delivered", T0, T0 + HOUR)
    store.mark_delivered_by(key(1), [mid(5)], T0)
    store.enqueue(mid(6), key(1), b"failed", T0, T0 + HOUR)
    store.mark_failed(mid(6), T0, "gave up")
    store.enqueue(mid(7), key(1), b"expired", T0, T0 + 5)
    store.enqueue(mid(8), key(1), b"sent", T0 + 3, T0 + HOUR)
    store.mark_sent(mid(8), T0 + 3)

    due = [e.message_id for e in store.outbox_due(T0 + 10, 100)]
    assert due == [mid(2), mid(3), mid(1), mid(8)]
    assert [e.message_id for e in store.outbox_due(T0 + 10, 2)] == [mid(2), mid(3)]
    assert mid(4) in [e.message_id for e in store.outbox_due(T0 + 50, 100)]
    assert store.outbox_due(T0 - 1, 100) == []


def test_mark_sent_with_receipt_deadline(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + HOUR)
    assert store.mark_sent(mid(1), T0 + 1, next_attempt_at=T0 + 1000)
    entry = store.outbox_get(mid(1))
    assert entry is not None
    assert (entry.state, entry.next_attempt_at, entry.updated_at) == (
        DeliveryState.SENT,
        T0 + 1000,
        T0 + 1,
    )
    assert store.outbox_due(T0 + 999, 10) == []
    assert [e.message_id for e in store.outbox_due(T0 + 1000, 10)] == [mid(1)]


def test_mark_sent_without_deadline_stays_due(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + HOUR)
    assert store.mark_sent(mid(1), T0 + 1)
    assert [e.state for e in store.outbox_due(T0 + 1, 10)] == [DeliveryState.SENT]


def test_record_attempt_failure(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + HOUR)
    store.mark_sent(mid(1), T0 + 1)
    assert store.record_attempt_failure(mid(1), T0 + 2, T0 + 500, "peer unreachable")
    assert store.record_attempt_failure(mid(1), T0 + 500, T0 + 1500, "timeout")
    entry = store.outbox_get(mid(1))
    assert entry is not None
    assert entry.state is DeliveryState.QUEUED
    assert (entry.attempts, entry.next_attempt_at, entry.last_error) == (2, T0 + 1500, "timeout")
    assert entry.updated_at == T0 + 500
    assert store.outbox_due(T0 + 1499, 10) == []


def test_long_error_text_is_truncated(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + HOUR)
    store.record_attempt_failure(mid(1), T0, T0, "e" * (MAX_ERROR_TEXT * 3))
    entry = store.outbox_get(mid(1))
    assert entry is not None and entry.last_error is not None
    assert len(entry.last_error) == MAX_ERROR_TEXT


def test_a_receipt_is_idempotent_and_delivered_is_terminal(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + HOUR)
    store.mark_sent(mid(1), T0 + 1)
    assert store.mark_delivered_by(key(1), [mid(1)], T0 + 2) == [mid(1)]
    assert store.mark_delivered_by(key(1), [mid(1)], T0 + 3) == []  # second receipt
    assert store.mark_failed(mid(1), T0 + 4, "too late") is False
    assert store.record_attempt_failure(mid(1), T0 + 5, T0 + 10, "late timeout") is False
    assert store.mark_sent(mid(1), T0 + 6) is False
    entry = store.outbox_get(mid(1))
    assert entry is not None
    assert (entry.state, entry.updated_at, entry.last_error) == (
        DeliveryState.DELIVERED,
        T0 + 2,
        None,
    )


def test_a_receipt_delivers_a_queued_message(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + HOUR)
    assert store.mark_delivered_by(key(1), [mid(1)], T0 + 1) == [mid(1)]


def test_failed_is_terminal(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + HOUR)
    assert store.mark_failed(mid(1), T0 + 1, "recipient unknown") is True
    assert store.mark_failed(mid(1), T0 + 2, "again") is False
    assert store.mark_delivered_by(key(1), [mid(1)], T0 + 3) == []
    assert store.mark_sent(mid(1), T0 + 4) is False
    entry = store.outbox_get(mid(1))
    assert entry is not None
    assert (entry.state, entry.last_error) == (DeliveryState.FAILED, "recipient unknown")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.mark_sent(mid(9), T0),
        lambda s: s.record_attempt_failure(mid(9), T0, T0, "x"),
        lambda s: s.mark_failed(mid(9), T0, "x"),
    ],
)
def test_transitions_of_unknown_id_raise(store: Store, call: object) -> None:
    with pytest.raises(UnknownMessageError, match=mid(9).hex()):
        call(store)  # type: ignore[operator]


def test_outbox_counts(store: Store) -> None:
    assert store.outbox_counts() == dict.fromkeys(DeliveryState, 0)
    for n in range(5):
        store.enqueue(mid(n), key(1), b"x", T0, T0 + HOUR)
    store.mark_sent(mid(0), T0)
    store.mark_sent(mid(1), T0)
    store.mark_delivered_by(key(1), [mid(1)], T0)
    store.mark_failed(mid(2), T0, "no")
    assert store.outbox_counts() == {
        DeliveryState.QUEUED: 2,
        DeliveryState.SENT: 1,
        DeliveryState.DELIVERED: 1,
        DeliveryState.FAILED: 1,
    }


def test_outbox_expire(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + 20)
    store.enqueue(mid(2), key(1), b"x", T0, T0 + 10)
    store.enqueue(mid(3), key(1), b"x", T0, T0 + HOUR)
    store.enqueue(mid(4), key(1), b"x", T0, T0 + 5)
    store.mark_delivered_by(key(1), [mid(4)], T0 + 1)
    assert store.outbox_expire(T0 + 20) == [mid(2), mid(1)]
    assert store.outbox_expire(T0 + 20) == []
    entry = store.outbox_get(mid(1))
    assert entry is not None
    assert (entry.state, entry.last_error, entry.updated_at) == (
        DeliveryState.FAILED,
        "expired",
        T0 + 20,
    )
    delivered = store.outbox_get(mid(4))
    assert delivered is not None and delivered.state is DeliveryState.DELIVERED


def test_outbox_prune_removes_only_old_terminal_entries(store: Store) -> None:
    for n in range(4):
        store.enqueue(mid(n), key(1), b"x", T0, T0 + HOUR)
    store.mark_delivered_by(key(1), [mid(0)], T0 + 1)
    store.mark_failed(mid(1), T0 + 2, "no")
    store.mark_delivered_by(key(1), [mid(2)], T0 + 100)
    assert store.outbox_prune(T0 + 50) == 2
    assert [store.outbox_get(mid(n)) is None for n in range(4)] == [True, True, False, False]


TRANSITIONS = st.lists(
    st.sampled_from(["sent", "sent_deadline", "attempt_failed", "delivered", "failed"]),
    max_size=8,
)
counter = itertools.count()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    with Store.open(tmp_path_factory.mktemp("shared") / "store.db") as s:
        yield s


@settings(max_examples=60, deadline=None)
@given(ops=TRANSITIONS)
def test_outbox_state_machine_matches_model(shared_store: Store, ops: list[str]) -> None:
    """Pending entries move freely; delivered and failed never change again."""
    message_id = mid(next(counter))
    shared_store.enqueue(message_id, key(1), b"x", T0, T0 + HOUR)
    state, attempts = DeliveryState.QUEUED, 0
    for step, op in enumerate(ops, start=1):
        now = T0 + step
        pending = state in (DeliveryState.QUEUED, DeliveryState.SENT)
        if op == "sent":
            changed = shared_store.mark_sent(message_id, now)
            new_state = DeliveryState.SENT
        elif op == "sent_deadline":
            changed = shared_store.mark_sent(message_id, now, next_attempt_at=now + 10)
            new_state = DeliveryState.SENT
        elif op == "attempt_failed":
            changed = shared_store.record_attempt_failure(message_id, now, now + 10, "e")
            new_state = DeliveryState.QUEUED
            attempts += pending
        elif op == "delivered":
            changed = shared_store.mark_delivered_by(key(1), [message_id], now) == [message_id]
            new_state = DeliveryState.DELIVERED
        else:
            changed = shared_store.mark_failed(message_id, now, "gave up")
            new_state = DeliveryState.FAILED
        assert changed is pending
        if pending:
            state = new_state
        entry = shared_store.outbox_get(message_id)
        assert entry is not None
        assert (entry.state, entry.attempts) == (state, attempts)


# ------------------------------------------------------------------------------------ inbox


def test_accept_incoming_stores_new_message_durably(store: Store, db_path: Path) -> None:
    assert store.accept_incoming(mid(1), key(5), b"hello", T0 - 10, T0) is True
    conn = raw(db_path)
    assert conn.execute("SELECT sender, body FROM inbox").fetchall() == [(key(5), b"hello")]
    assert conn.execute("SELECT sender, message_id FROM seen").fetchall() == [(key(5), mid(1))]
    conn.close()
    [message] = store.inbox_list(False, 10)
    assert (message.message_id, message.sender, message.body) == (mid(1), key(5), b"hello")
    assert (message.sent_at, message.received_at, message.read) == (T0 - 10, T0, False)


def test_duplicate_incoming_is_stored_once(store: Store, db_path: Path) -> None:
    assert store.accept_incoming(mid(1), key(5), b"hello", T0, T0) is True
    assert store.accept_incoming(mid(1), key(5), b"hello", T0, T0 + 1) is False
    assert store.accept_incoming(mid(1), key(5), b"different body", T0, T0 + 2) is False
    assert [m.body for m in store.inbox_list(False, 10)] == [b"hello"]
    conn = raw(db_path)
    assert conn.execute("SELECT count(*) FROM inbox").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM seen").fetchone()[0] == 1
    conn.close()


def test_dedup_is_per_sender(store: Store) -> None:
    """A peer reusing another peer's message id cannot suppress that message."""
    assert store.accept_incoming(mid(1), key(6), b"attacker", T0, T0)
    assert store.accept_incoming(mid(1), key(5), b"victim", T0, T0 + 1)
    assert sorted(m.body for m in store.inbox_list(False, 10)) == [b"attacker", b"victim"]


def test_inbox_list_unread_pagination_and_mark_read(store: Store) -> None:
    for n in range(5):
        store.accept_incoming(mid(n), key(1), bytes([n]), T0, T0 + n)
    listed = store.inbox_list(False, 10)
    assert [m.body for m in listed] == [bytes([n]) for n in (4, 3, 2, 1, 0)]
    seqs = [m.seq for m in listed]
    assert seqs == sorted(seqs, reverse=True)

    page1 = store.inbox_list(False, 2)
    page2 = store.inbox_list(False, 2, before=page1[-1].seq)
    page3 = store.inbox_list(False, 2, before=page2[-1].seq)
    assert [m.body for m in page1 + page2 + page3] == [m.body for m in listed]

    assert store.unread_count() == 5
    assert store.mark_read([listed[0].seq, listed[2].seq, 999_999]) == 2
    assert store.mark_read([listed[0].seq]) == 0  # already read
    assert store.mark_read([]) == 0
    assert store.unread_count() == 3
    unread = store.inbox_list(True, 10)
    assert [m.body for m in unread] == [bytes([3]), bytes([1]), bytes([0])]
    assert all(not m.read for m in unread)
    assert [m.read for m in store.inbox_list(False, 10)] == [True, False, True, False, False]
    assert [m.body for m in store.inbox_list(True, 1, before=unread[0].seq)] == [bytes([1])]


def test_delete_inbox_keeps_seen_ids(store: Store) -> None:
    store.accept_incoming(mid(1), key(1), b"x", T0, T0)
    [message] = store.inbox_list(False, 10)
    assert store.delete_inbox([message.seq]) == 1
    assert store.inbox_list(False, 10) == []
    assert store.accept_incoming(mid(1), key(1), b"x", T0, T0 + 1) is False  # a retry
    assert store.inbox_list(False, 10) == []


def test_prune_seen(store: Store) -> None:
    store.accept_incoming(mid(1), key(1), b"old, deleted", T0, T0)
    store.accept_incoming(mid(2), key(1), b"old, still in inbox", T0, T0)
    store.accept_incoming(mid(3), key(1), b"recent, deleted", T0, T0 + HOUR)
    by_id = {m.message_id: m.seq for m in store.inbox_list(False, 10)}
    store.delete_inbox([by_id[mid(1)], by_id[mid(3)]])
    assert store.prune_seen(T0 + 1) == 1  # only mid(1): mid(2) is in the inbox, mid(3) recent
    assert store.accept_incoming(mid(1), key(1), b"old, deleted", T0, T0 + 2 * HOUR) is True
    assert store.accept_incoming(mid(2), key(1), b"x", T0, T0 + 2 * HOUR) is False
    assert store.accept_incoming(mid(3), key(1), b"x", T0, T0 + 2 * HOUR) is False


def test_inbox_survives_reopen(db_path: Path) -> None:
    with Store.open(db_path) as s:
        s.accept_incoming(mid(1), key(1), b"kept", T0, T0)
    with Store.open(db_path) as s:
        assert [m.body for m in s.inbox_list(True, 10)] == [b"kept"]
        assert s.accept_incoming(mid(1), key(1), b"kept", T0, T0) is False


# ------------------------------------------------------------------------------------ contacts


def test_contacts_add_get_list_remove(store: Store) -> None:
    bob = store.contact_add("bob", key(2), T0)
    alice = store.contact_add("Alice", key(1), T0 + 1)
    carol = store.contact_add("carol smith", key(3), T0 + 2)
    assert store.contact_list() == [alice, bob, carol]
    assert store.contact_get("ALICE") == alice
    assert store.contact_get("Bob").node_key == key(2)
    assert store.contact_for_key(key(3)) == carol
    assert store.contact_for_key(key(9)) is None
    store.contact_remove("BOB")
    assert [c.name for c in store.contact_list()] == ["Alice", "carol smith"]
    with pytest.raises(ContactError, match="no contact named 'bob'"):
        store.contact_get("bob")
    with pytest.raises(ContactError, match="no contact named 'bob'"):
        store.contact_remove("bob")


def test_contact_names_are_unique_ignoring_case(store: Store) -> None:
    store.contact_add("Alice", key(1), T0)
    with pytest.raises(ContactError, match="'Alice' already exists"):
        store.contact_add("aLiCe", key(2), T0)


def test_contact_names_are_unique_ignoring_case_beyond_ascii(store: Store) -> None:
    store.contact_add("Ärger", key(1), T0)
    with pytest.raises(ContactError, match="already exists"):
        store.contact_add("äRGER", key(2), T0)
    assert store.contact_get("ÄRGER").node_key == key(1)


def test_contact_names_are_nfc_normalised(store: Store) -> None:
    decomposed = "Zoe\u0301"
    contact = store.contact_add(decomposed, key(1), T0)
    assert contact.name == "Zo\u00e9"
    assert store.contact_get("zo\u00e9").node_key == key(1)
    with pytest.raises(ContactError, match="already exists"):
        store.contact_add("ZO\u00c9", key(2), T0)


def test_one_name_per_key(store: Store) -> None:
    store.contact_add("alice", key(1), T0)
    with pytest.raises(ContactError, match="already saved as 'alice'"):
        store.contact_add("alice2", key(1), T0)
    assert [c.name for c in store.contact_list()] == ["alice"]


def test_contact_rename(store: Store) -> None:
    store.contact_add("alice", key(1), T0)
    store.contact_add("bob", key(2), T0)
    renamed = store.contact_rename("ALICE", "Alice Liddell")
    assert (renamed.name, renamed.node_key, renamed.added_at) == ("Alice Liddell", key(1), T0)
    assert store.contact_get("alice liddell") == renamed
    with pytest.raises(ContactError, match="no contact named 'alice'"):
        store.contact_get("alice")
    with pytest.raises(ContactError, match="'bob' already exists"):
        store.contact_rename("alice liddell", "BOB")
    with pytest.raises(ContactError, match="no contact named 'nobody'"):
        store.contact_rename("nobody", "somebody")
    assert store.contact_rename("bob", "Bob").name == "Bob"  # changing only the case is fine
    assert [c.name for c in store.contact_list()] == ["Alice Liddell", "Bob"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "empty"),
        ("x" * (MAX_CONTACT_NAME_LENGTH + 1), "limit is 64"),
        (" alice", "whitespace"),
        ("alice ", "whitespace"),
        ("alice\u00a0", "whitespace"),
        ("\talice", "control"),
        ("al\x00ice", "control"),
        ("al\nice", "control"),
        ("al\x7fice", "control"),
        ("\u202eecila", "control or invisible"),  # right-to-left override
        ("ali\u200bce", "control or invisible"),  # zero-width space
        ("ali\u2028ce", "control or invisible"),  # line separator
        (b"alice", "must be a str"),
    ],
)
def test_invalid_contact_names(store: Store, name: object, reason: str) -> None:
    with pytest.raises(ContactError, match=reason):
        store.contact_add(name, key(1), T0)  # type: ignore[arg-type]
    assert store.contact_list() == []


@pytest.mark.parametrize("name", ["a", "x" * MAX_CONTACT_NAME_LENGTH, "Анна", "李雷", "o'brien"])
def test_valid_contact_names(store: Store, name: str) -> None:
    assert store.contact_add(name, key(1), T0).name == name
    assert store.contact_get(name).node_key == key(1)


def test_contact_error_is_a_value_error() -> None:
    assert issubclass(ContactError, ValueError)
    assert issubclass(ContactError, StoreError)


def test_contacts_survive_reopen(db_path: Path) -> None:
    with Store.open(db_path) as s:
        s.contact_add("alice", key(1), T0)
    with Store.open(db_path) as s:
        assert s.contact_get("Alice").node_key == key(1)


# ------------------------------------------------------------------------------------ peer cache


def test_peer_put_keeps_highest_seq(store: Store) -> None:
    assert store.peer_get(key(1)) is None
    assert store.peer_put(key(1), b"rec5", 5, T0) is True
    assert store.peer_put(key(1), b"rec4", 4, T0 + 1) is False
    assert store.peer_put(key(1), b"rec5-other", 5, T0 + 2) is False
    assert store.peer_get(key(1)) == (b"rec5", 5)
    assert store.peer_put(key(1), b"rec6", 6, T0 + 3) is True
    assert store.peer_get(key(1)) == (b"rec6", 6)
    [entry] = store.peer_list(10)
    assert (entry.node_key, entry.record, entry.seq, entry.updated_at) == (
        key(1),
        b"rec6",
        6,
        T0 + 3,
    )


def test_peer_list_and_remove(store: Store) -> None:
    store.peer_put(key(1), b"a", 0, T0 + 1)
    store.peer_put(key(2), b"b", 0, T0 + 3)
    store.peer_put(key(3), b"c", 0, T0 + 2)
    assert [p.node_key for p in store.peer_list(10)] == [key(2), key(3), key(1)]
    assert [p.node_key for p in store.peer_list(2)] == [key(2), key(3)]
    assert store.peer_remove(key(3)) is True
    assert store.peer_remove(key(3)) is False
    assert store.peer_get(key(3)) is None
    assert [p.node_key for p in store.peer_list(10)] == [key(2), key(1)]


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s: s.enqueue(b"short", key(1), b"", T0, T0 + 1), ValueError, "exactly 16 bytes"),
        (lambda s: s.enqueue(mid(1), key(1)[:31], b"", T0, T0 + 1), ValueError, "exactly 32"),
        (lambda s: s.enqueue(mid(1), key(1), "text", T0, T0 + 1), TypeError, "body must be bytes"),
        (
            lambda s: s.enqueue(mid(1), key(1), b"x" * (MAX_BODY_SIZE + 1), T0, T0 + 1),
            ValueError,
            f"MAX_BODY_SIZE = {MAX_BODY_SIZE}",
        ),
        (lambda s: s.enqueue(mid(1), key(1), b"", -1, T0), ValueError, "now must be between"),
        (lambda s: s.enqueue(mid(1), key(1), b"", 1.5, T0), TypeError, "now must be an int"),
        (lambda s: s.enqueue(mid(1), key(1), b"", True, T0), TypeError, "now must be an int"),
        (lambda s: s.enqueue(mid(1), key(1), b"", 2**63, T0), ValueError, "2\\*\\*63"),
        (
            lambda s: s.accept_incoming(mid(1), key(1), b"x" * (MAX_BODY_SIZE + 1), T0, T0),
            ValueError,
            "MAX_BODY_SIZE",
        ),
        (lambda s: s.accept_incoming(mid(1), b"k", b"", T0, T0), ValueError, "sender must be"),
        (lambda s: s.outbox_get(bytearray(16)), TypeError, "message_id must be bytes"),
        (lambda s: s.outbox_due(T0, 0), ValueError, "limit must be between 1"),
        (lambda s: s.outbox_due(T0, MAX_LIST_LIMIT + 1), ValueError, "MAX_LIST_LIMIT"),
        (lambda s: s.inbox_list(False, 10, before=-1), ValueError, "before must be"),
        (lambda s: s.mark_read([1, "2"]), TypeError, "seq must be an int"),
        (
            lambda s: s.peer_put(key(1), b"r" * (MAX_PEER_RECORD_SIZE + 1), 1, T0),
            ValueError,
            "MAX_PEER_RECORD_SIZE",
        ),
        (lambda s: s.peer_put(key(1), b"r", -1, T0), ValueError, "seq must be between"),
        (lambda s: s.peer_list(0), ValueError, "limit"),
        (lambda s: s.contact_add("alice", b"k" * 31, T0), ValueError, "node_key must be exactly"),
        (
            lambda s: s.record_attempt_failure(mid(1), T0, T0 - 1, "x"),
            ValueError,
            "before now",
        ),
    ],
)
def test_invalid_arguments_are_refused_precisely(
    store: Store, call: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(store)  # type: ignore[operator]
    assert store.outbox_counts() == dict.fromkeys(DeliveryState, 0)
    assert store.inbox_list(False, 10) == []


# ------------------------------------------------------------------------------------ threads


def test_concurrent_calls_do_not_interleave_transactions(store: Store) -> None:
    def worker(base: int) -> None:
        for n in range(50):
            store.enqueue(mid(base + n), key(1), b"x", T0, T0 + HOUR)
            store.accept_incoming(mid(base + n), key(2), b"y", T0, T0)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(worker, 1000 * i) for i in range(4)]
        for future in futures:
            future.result()  # re-raises a worker's exception
    assert store.outbox_counts()[DeliveryState.QUEUED] == 200
    assert store.unread_count() == 200


# ------------------------------------------------------------------------------------ batches


def test_batch_commits_all_changes_once_at_the_end(store: Store, db_path: Path) -> None:
    with store.batch():
        for n in range(5):
            assert store.accept_incoming(mid(n), key(1), b"x", T0, T0)
        # Not durable yet: another connection does not see the batch.
        assert raw(db_path).execute("SELECT count(*) FROM inbox").fetchone()[0] == 0
    assert raw(db_path).execute("SELECT count(*) FROM inbox").fetchone()[0] == 5


def test_failed_change_inside_a_batch_leaves_the_others(store: Store) -> None:
    with store.batch():
        store.enqueue(mid(1), key(1), b"a", T0, T0 + 1)
        with pytest.raises(DuplicateMessageError):
            store.enqueue(mid(1), key(1), b"again", T0, T0 + 1)
        store.enqueue(mid(2), key(1), b"b", T0, T0 + 1)
    assert store.outbox_counts()[DeliveryState.QUEUED] == 2


def test_batch_that_raises_writes_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.batch():
        store.enqueue(mid(1), key(1), b"a", T0, T0 + 1)
        raise RuntimeError("caller failed before acknowledging")
    assert store.outbox_get(mid(1)) is None


def test_batches_do_not_nest(store: Store) -> None:
    with store.batch(), pytest.raises(StoreError, match="do not nest"), store.batch():
        pass


def test_a_receipt_counts_only_from_the_recipient(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + 1000)
    store.enqueue(mid(2), key(1), b"y", T0, T0 + 1000)
    assert store.mark_delivered_by(key(2), [mid(1)], T0) == []
    assert store.outbox_get(mid(1)).state is DeliveryState.QUEUED  # type: ignore[union-attr]
    # One receipt for several messages; an unknown id in it is skipped.
    assert store.mark_delivered_by(key(1), [mid(9), mid(2), mid(1)], T0) == [mid(2), mid(1)]
    assert store.outbox_get(mid(1)).state is DeliveryState.DELIVERED  # type: ignore[union-attr]
    assert store.mark_delivered_by(key(1), [mid(1)], T0) == []  # already delivered


def test_a_receipt_leaves_a_failed_message_failed(store: Store) -> None:
    store.enqueue(mid(1), key(1), b"x", T0, T0 + 1000)
    store.mark_failed(mid(1), T0, "expired")
    assert store.mark_delivered_by(key(1), [mid(1)], T0 + 1) == []
    assert store.outbox_get(mid(1)).state is DeliveryState.FAILED  # type: ignore[union-attr]
