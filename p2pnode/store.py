"""The node's durable store: outbox, inbox, seen message ids, contacts and a peer cache.

One SQLite file (stdlib :mod:`sqlite3`) in WAL mode with ``synchronous=FULL``: every method that
changes data commits before it returns, so its return is a promise that survives a crash or a
power cut. A receipt may be sent once :meth:`Store.accept_incoming` has returned; a send may be
acknowledged to the user once :meth:`Store.enqueue` has returned.

The store never reads the clock: every time is an integer number of milliseconds since the Unix
epoch passed in by the caller, which keeps tests deterministic.

The store never deletes, truncates or recreates an existing file. A file that is not a p2pnode
database, or fails SQLite's integrity check, is refused with :class:`StoreCorruptError` and left
exactly as it was.

The code is synchronous. The trio layer calls it through ``trio.to_thread.run_sync``; see
:class:`Store` for the threading rules.
"""

from __future__ import annotations

import enum
import os
import sqlite3
import threading
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from p2pnode import envelope
from p2pnode.home import HomeError, check_private_file

__all__ = [
    "APPLICATION_ID",
    "BUSY_TIMEOUT_MS",
    "MAX_BODY_SIZE",
    "MAX_CONTACT_NAME_LENGTH",
    "MAX_ERROR_TEXT",
    "MAX_LIST_LIMIT",
    "MAX_PEER_RECORD_SIZE",
    "MESSAGE_ID_SIZE",
    "MIGRATIONS",
    "NODE_KEY_SIZE",
    "SCHEMA_VERSION",
    "Contact",
    "ContactError",
    "DeliveryState",
    "DuplicateMessageError",
    "InboxMessage",
    "Migration",
    "OutboxEntry",
    "PeerEntry",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "StoreVersionError",
    "UnknownMessageError",
]

# --------------------------------------------------------------------------------------------
# Limits and identifiers
# --------------------------------------------------------------------------------------------

#: ``PRAGMA application_id`` of every p2pnode store: ASCII "p2pn". It marks the file as ours
#: (``file(1)`` and SQLite tools show it), so a store never adopts another program's database.
APPLICATION_ID: Final = 0x7032706E

#: Message ids are 16 random bytes (128 bits: collisions between honest senders are negligible).
MESSAGE_ID_SIZE: Final = 16

#: Node keys are raw 32-byte Ed25519 public keys.
NODE_KEY_SIZE: Final = 32

#: Largest message body (plaintext) the store accepts: the envelope format's limit, so anything
#: that can be sealed can be stored and vice versa.
MAX_BODY_SIZE: Final = envelope.MAX_BODY_SIZE

#: Largest signed peer record kept in the peer cache, in bytes. A record with a dozen addresses
#: is a few hundred bytes and the DHT layer enforces its own, stricter limit; this backstop only
#: stops a bug elsewhere from filling the cache with large blobs.
MAX_PEER_RECORD_SIZE: Final = 8 * 1024

#: Error texts (``last_error``) longer than this many characters are truncated, not refused:
#: recording a failure must not itself fail because an exception message was long.
MAX_ERROR_TEXT: Final = 1024

#: Contact names are 1 to this many characters (Unicode code points, after NFC normalisation).
MAX_CONTACT_NAME_LENGTH: Final = 64

#: Largest page a listing method returns; callers page through longer lists with ``before``.
MAX_LIST_LIMIT: Final = 1000

#: How long a statement waits for another connection's write lock (a second process, a backup
#: tool) before failing with "database is locked". A commit takes about 0.13 ms (p50) and
#: 0.5 ms (p99) on the reference machine, so 5 s only runs out when something is stuck.
BUSY_TIMEOUT_MS: Final = 5000

# Times, sequence numbers and row numbers are SQLite 64-bit signed integers.
_MAX_INT64: Final = 2**63 - 1

_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SQLITE_HEADER_SIZE: Final = 100

# Unicode categories refused in contact names: controls (Cc), invisible format characters (Cf,
# including bidi overrides that make a name display as another), surrogates (Cs), and line and
# paragraph separators (Zl, Zp).
_FORBIDDEN_NAME_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of every error the store raises on purpose.

    SQLite failures during an operation (disk full, I/O error, lock timeout) are raised as a
    ``StoreError`` naming the file and the operation; the transaction is rolled back, so
    nothing from a failed call is half-written.
    """


class StoreCorruptError(StoreError):
    """The file is not a usable p2pnode database.

    Raised by :meth:`Store.open` for a file that is not SQLite, belongs to another program
    (different ``application_id``) or fails ``PRAGMA quick_check``; the message names the file,
    states that it was not modified and how to recover. Also raised when SQLite reports
    corruption while the store is in use.
    """


class StoreVersionError(StoreError):
    """The database was written by a newer p2pnode whose schema this version does not know."""


class DuplicateMessageError(StoreError):
    """:meth:`Store.enqueue` was given a message id that is already in the outbox."""


class UnknownMessageError(StoreError, LookupError):
    """An outbox operation named a message id that is not in the outbox."""


class ContactError(StoreError, ValueError):
    """A contact name is invalid, already taken, or unknown; or the key already has a name."""


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


class DeliveryState(enum.StrEnum):
    """Where an outgoing message stands. ``delivered`` and ``failed`` are terminal.

    ``queued`` -> ``sent`` (handed to a link, awaiting a receipt) -> ``delivered`` (receipt
    checked); ``queued``/``sent`` -> ``queued`` again after a failed attempt; ``queued``/``sent``
    -> ``failed`` when the caller gives up or the message expires.
    """

    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    FAILED = "failed"


_PENDING: Final = (DeliveryState.QUEUED, DeliveryState.SENT)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outgoing message and its delivery state.

    Attributes:
        message_id: 16 random bytes, unique in the outbox.
        recipient: the recipient's 32-byte Ed25519 public key.
        body: the plaintext body (sealing happens when it is sent).
        state: the delivery state.
        created_at: when it was enqueued (ms since the epoch).
        attempts: how many delivery attempts ended in failure
            (:meth:`Store.record_attempt_failure`); the caller's backoff uses it.
        next_attempt_at: a pending entry is due once this time is reached.
        expires_at: after this time the message is no longer worth sending.
        last_error: why the last attempt failed, or why the message failed; ``None`` if never.
        updated_at: when the entry last changed.
    """

    message_id: bytes
    recipient: bytes
    body: bytes
    state: DeliveryState
    created_at: int
    attempts: int
    next_attempt_at: int
    expires_at: int
    last_error: str | None
    updated_at: int

    @classmethod
    def queued(
        cls, message_id: bytes, recipient: bytes, body: bytes, now: int, expires_at: int
    ) -> OutboxEntry:
        """The entry :meth:`Store.enqueue` writes for a new message (nothing is checked)."""
        return cls(
            message_id=message_id,
            recipient=recipient,
            body=body,
            state=DeliveryState.QUEUED,
            created_at=now,
            attempts=0,
            next_attempt_at=now,
            expires_at=expires_at,
            last_error=None,
            updated_at=now,
        )


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """One received message.

    Attributes:
        seq: local number of the message in this store; increases with arrival and is never
            reused, so it is the handle for :meth:`Store.mark_read`, :meth:`Store.delete_inbox`
            and the ``before`` cursor of :meth:`Store.inbox_list`.
        message_id: the sender's 16-byte message id (unique per sender, not globally).
        sender: the sender's 32-byte Ed25519 public key.
        body: the plaintext body.
        sent_at: the sender's claimed timestamp (ms since the epoch).
        received_at: when this node accepted it (ms since the epoch).
        read: whether it was marked read.
    """

    seq: int
    message_id: bytes
    sender: bytes
    body: bytes
    sent_at: int
    received_at: int
    read: bool


@dataclass(frozen=True, slots=True)
class Contact:
    """A petname for a node key.

    Attributes:
        name: the name as stored (NFC-normalised); unique ignoring case.
        node_key: the 32-byte Ed25519 public key it names; one name per key.
        added_at: when the contact was added (ms since the epoch).
    """

    name: str
    node_key: bytes
    added_at: int


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """A cached signed peer record (stored verbatim; the DHT layer verifies it).

    Attributes:
        node_key: the peer's 32-byte Ed25519 public key.
        record: the signed record as received.
        seq: the record's sequence number; only the highest is kept.
        updated_at: when the cached record last changed (ms since the epoch).
    """

    node_key: bytes
    record: bytes
    seq: int
    updated_at: int


# --------------------------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------------------------

#: A migration takes the database from schema N to N+1. It runs inside the transaction that
#: also sets ``user_version``; it must not commit (so: ``execute`` only, no ``executescript``).
Migration = Callable[[sqlite3.Connection], None]

_SCHEMA_1: Final = (
    """
    CREATE TABLE outbox (
        id              BLOB    NOT NULL PRIMARY KEY
                                CHECK (typeof(id) = 'blob' AND length(id) = 16),
        recipient       BLOB    NOT NULL
                                CHECK (typeof(recipient) = 'blob' AND length(recipient) = 32),
        body            BLOB    NOT NULL CHECK (typeof(body) = 'blob'),
        created_at      INTEGER NOT NULL,
        state           TEXT    NOT NULL DEFAULT 'queued'
                                CHECK (state IN ('queued', 'sent', 'delivered', 'failed')),
        attempts        INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
        next_attempt_at INTEGER NOT NULL,
        expires_at      INTEGER NOT NULL,
        last_error      TEXT,
        updated_at      INTEGER NOT NULL
    )
    """,
    # outbox_due() and outbox_expire() only look at pending rows.
    """
    CREATE INDEX outbox_pending ON outbox (next_attempt_at)
        WHERE state IN ('queued', 'sent')
    """,
    "CREATE INDEX outbox_by_state ON outbox (state, updated_at)",
    """
    CREATE TABLE inbox (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        sender      BLOB    NOT NULL
                            CHECK (typeof(sender) = 'blob' AND length(sender) = 32),
        message_id  BLOB    NOT NULL
                            CHECK (typeof(message_id) = 'blob' AND length(message_id) = 16),
        body        BLOB    NOT NULL CHECK (typeof(body) = 'blob'),
        sent_at     INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        is_read     INTEGER NOT NULL DEFAULT 0 CHECK (is_read IN (0, 1)),
        UNIQUE (sender, message_id)
    )
    """,
    "CREATE INDEX inbox_unread ON inbox (seq) WHERE is_read = 0",
    # Seen (sender, message id) pairs outlive the inbox rows, so a message deleted by the user
    # is not stored again when the sender retries it.
    """
    CREATE TABLE seen (
        sender     BLOB    NOT NULL CHECK (length(sender) = 32),
        message_id BLOB    NOT NULL CHECK (length(message_id) = 16),
        seen_at    INTEGER NOT NULL,
        PRIMARY KEY (sender, message_id)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX seen_by_age ON seen (seen_at)",
    # name COLLATE NOCASE folds ASCII only; name_key (casefold of the NFC name) makes names
    # unique ignoring case in every script.
    """
    CREATE TABLE contacts (
        name     TEXT    NOT NULL COLLATE NOCASE UNIQUE
                         CHECK (length(name) BETWEEN 1 AND 64),
        name_key TEXT    NOT NULL UNIQUE,
        node_key BLOB    NOT NULL UNIQUE
                         CHECK (typeof(node_key) = 'blob' AND length(node_key) = 32),
        added_at INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE peers (
        node_key   BLOB    NOT NULL PRIMARY KEY
                           CHECK (typeof(node_key) = 'blob' AND length(node_key) = 32),
        record     BLOB    NOT NULL CHECK (typeof(record) = 'blob'),
        seq        INTEGER NOT NULL CHECK (seq >= 0),
        updated_at INTEGER NOT NULL
    )
    """,
    "CREATE INDEX peers_by_update ON peers (updated_at)",
)


def _migration_1_initial_schema(conn: sqlite3.Connection) -> None:
    """Schema 1: the whole initial schema (outbox, inbox, seen, contacts, peers)."""
    for statement in _SCHEMA_1:
        conn.execute(statement)


def _migration_2_pending_indexes(conn: sqlite3.Connection) -> None:
    """Schema 2: indexes that answer the delivery scans from the pending rows in their order.

    With a backlog, the scans for expired messages and for a peer's pending ones used the
    (state, updated_at) index and then sorted every pending row: 15 ms per scan with 40,000
    queued. The scans now read pending rows in index order (ties in insertion order, the
    rowid), so a scan reads only what it returns. The queries name their index: SQLite without
    statistics prefers the state index. The indexes hold the pending rows only and no more
    columns than the scans need: every extra indexed byte costs each send and each receipt.
    """
    conn.execute(
        "CREATE INDEX outbox_expiry ON outbox (expires_at) WHERE state IN ('queued', 'sent')"
    )
    conn.execute(
        "CREATE INDEX outbox_recipient_pending ON outbox (recipient)"
        " WHERE state IN ('queued', 'sent')"
    )


#: The migrations, in order: ``MIGRATIONS[n]`` takes schema ``n`` to ``n + 1``. Append only;
#: never edit a migration that has shipped.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    _migration_1_initial_schema,
    _migration_2_pending_indexes,
)

#: The schema version this code writes and understands (``PRAGMA user_version``).
SCHEMA_VERSION: Final = len(MIGRATIONS)


# --------------------------------------------------------------------------------------------
# Input validation at the store boundary
# --------------------------------------------------------------------------------------------


def _check_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) != size:
        raise ValueError(f"{name} must be exactly {size} bytes, got {len(value)}")
    return value


def _check_blob(name: str, value: object, limit: int, limit_name: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} bytes; the limit is {limit_name} = {limit}")
    return value


def _check_int(name: str, value: object, minimum: int = 0) -> int:
    # bool is an int subclass; True as a timestamp is certainly a bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= _MAX_INT64:
        raise ValueError(f"{name} must be between {minimum} and 2**63 - 1, got {value}")
    return value


def _check_limit(limit: object) -> int:
    value = _check_int("limit", limit, minimum=1)
    if value > MAX_LIST_LIMIT:
        raise ValueError(f"limit must be at most MAX_LIST_LIMIT = {MAX_LIST_LIMIT}, got {value}")
    return value


def _error_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"error text must be a str, not {type(text).__name__}")
    if len(text) > MAX_ERROR_TEXT:
        return text[: MAX_ERROR_TEXT - 1] + "\N{HORIZONTAL ELLIPSIS}"
    return text


def _normalise_contact_name(name: object) -> str:
    """Return the stored form (NFC) of a contact name, or raise ContactError saying why not."""
    if not isinstance(name, str):
        raise ContactError(f"contact name must be a str, not {type(name).__name__}")
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise ContactError("contact name must not be empty")
    if len(name) > MAX_CONTACT_NAME_LENGTH:
        raise ContactError(
            f"contact name is {len(name)} characters; the limit is {MAX_CONTACT_NAME_LENGTH}"
        )
    for position, char in enumerate(name):
        if unicodedata.category(char) in _FORBIDDEN_NAME_CATEGORIES:
            raise ContactError(
                f"contact name {name!r} contains a control or invisible character "
                f"(U+{ord(char):04X}) at position {position}"
            )
    if name != name.strip():
        raise ContactError(f"contact name {name!r} must not start or end with whitespace")
    return name


def _name_key(name: str) -> str:
    return name.casefold()


# --------------------------------------------------------------------------------------------
# Opening: creation, inspection, configuration, migration
# --------------------------------------------------------------------------------------------


def _recovery_advice(path: Path) -> str:
    return (
        "The file was NOT modified. To recover: stop p2pnode, move the file aside "
        f"(with {path.name}-wal and {path.name}-shm, if present) and restore it from a backup; "
        "with no backup, p2pnode starts with an empty store once the file is moved aside"
    )


def _corrupt(path: Path, reason: str) -> StoreCorruptError:
    return StoreCorruptError(
        f"{path} cannot be used as the p2pnode store: {reason}. {_recovery_advice(path)}."
    )


def _uri(path: Path, mode: str) -> str:
    # mode=ro / mode=rw: SQLite never creates the file; we create it ourselves with mode 0600.
    return f"file:{urllib.parse.quote(os.fspath(path))}?mode={mode}"


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _create_if_missing(path: Path) -> bool:
    """Create an empty file with mode 0600 unless ``path`` exists. Returns True if created."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        # O_EXCL: never truncate or replace an existing file, and never follow a symlink.
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot create the store {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask; SQLite's -wal/-shm copy it
    finally:
        os.close(fd)
    # Make the new directory entry durable: a committed row in a file whose name is lost after
    # a power cut would be a broken promise.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return True
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True


def _identity_version(conn: sqlite3.Connection, path: Path, known: int) -> int:
    """Check the database is ours (or empty) and not too new. Returns its schema version."""
    application_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if application_id == APPLICATION_ID:
        if version < 1:
            raise _corrupt(path, "it is marked as p2pnode's but has no schema version")
        if version > known:
            raise StoreVersionError(
                f"{path} was created by a newer p2pnode (schema {version}, this version knows "
                f"{known}); upgrade p2pnode to use it. The file was NOT modified."
            )
        return version
    if application_id != 0:
        raise _corrupt(
            path,
            f"it is a SQLite database of another program (application_id "
            f"{application_id & 0xFFFFFFFF:#010x}, p2pnode uses {APPLICATION_ID:#010x})",
        )
    objects = int(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
    if version != 0 or objects != 0:
        raise _corrupt(path, "it is a SQLite database of another program (no p2pnode marker)")
    return 0  # an empty SQLite database (for example one whose creation was interrupted)


def _inspect_existing(path: Path, known: int) -> None:
    """Refuse an existing file that is not a healthy p2pnode database, without writing to it."""
    try:
        with path.open("rb") as file:
            header = file.read(_SQLITE_HEADER_SIZE)
    except OSError as exc:
        raise StoreError(f"cannot read the store {path}: {exc.strerror}") from exc
    if not header:
        return  # an empty file holds nothing to lose; SQLite treats it as an empty database
    if not header.startswith(_SQLITE_MAGIC):
        raise _corrupt(path, "it is not a SQLite database")
    if len(header) < _SQLITE_HEADER_SIZE:
        raise _corrupt(path, "it is too short to be a SQLite database (truncated?)")
    # A read-only connection cannot roll back, checkpoint or otherwise write to the file.
    try:
        conn = sqlite3.connect(_uri(path, "ro"), uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the store {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        _identity_version(conn, path, known)
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise _corrupt(path, "SQLite's integrity check failed: " + "; ".join(problems))
    except sqlite3.Error as exc:
        if _is_corruption(exc):
            raise _corrupt(path, f"SQLite reports: {exc}") from exc
        raise StoreError(f"cannot open the store {path}: {exc}") from exc
    finally:
        conn.close()


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    # PRAGMA arguments cannot be bound parameters; only constants are formatted in here.
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
    mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
    if mode.lower() != "wal":
        raise StoreError(
            f"cannot put the store {path} in WAL mode (SQLite stayed in {mode!r} mode); "
            "is it on a network file system?"
        )
    conn.execute("PRAGMA synchronous = FULL")  # every commit here is a promise
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")  # deleted messages are overwritten, not left behind
    conn.execute("PRAGMA trusted_schema = OFF")


def _migrate(conn: sqlite3.Connection, path: Path, migrations: tuple[Migration, ...]) -> None:
    """Apply the missing migrations, each in its own IMMEDIATE transaction."""
    known = len(migrations)
    while True:
        conn.execute("BEGIN IMMEDIATE")  # re-read the version under the write lock
        try:
            version = _identity_version(conn, path, known)
            if version == known:
                conn.execute("COMMIT")
                return
            if version == 0:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            try:
                migrations[version](conn)
            except Exception as exc:
                raise StoreError(
                    f"migrating {path} from schema {version} to {version + 1} failed: {exc}; "
                    f"the database was left at schema {version}"
                ) from exc
            if not conn.in_transaction:
                raise StoreError(
                    f"migration to schema {version + 1} committed by itself; "
                    "migrations must not commit"
                )
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


def _outbox_entry(row: tuple[object, ...]) -> OutboxEntry:
    (message_id, recipient, body, state, created, attempts, next_at, expires, error, updated) = row
    assert isinstance(message_id, bytes) and isinstance(recipient, bytes)
    assert isinstance(body, bytes) and isinstance(state, str)
    assert isinstance(created, int) and isinstance(attempts, int) and isinstance(next_at, int)
    assert isinstance(expires, int) and isinstance(updated, int)
    assert error is None or isinstance(error, str)
    return OutboxEntry(
        message_id=message_id,
        recipient=recipient,
        body=body,
        state=DeliveryState(state),
        created_at=created,
        attempts=attempts,
        next_attempt_at=next_at,
        expires_at=expires,
        last_error=error,
        updated_at=updated,
    )


def _inbox_message(row: tuple[object, ...]) -> InboxMessage:
    seq, message_id, sender, body, sent_at, received_at, is_read = row
    assert isinstance(seq, int) and isinstance(message_id, bytes) and isinstance(sender, bytes)
    assert isinstance(body, bytes) and isinstance(sent_at, int)
    assert isinstance(received_at, int) and isinstance(is_read, int)
    return InboxMessage(
        seq=seq,
        message_id=message_id,
        sender=sender,
        body=body,
        sent_at=sent_at,
        received_at=received_at,
        read=bool(is_read),
    )


def _contact(row: tuple[object, ...]) -> Contact:
    name, node_key, added_at = row
    assert isinstance(name, str) and isinstance(node_key, bytes) and isinstance(added_at, int)
    return Contact(name=name, node_key=node_key, added_at=added_at)


#: The columns of an outbox row, in the order ``_outbox_entry`` reads them.
_OUTBOX_SELECT: Final = (
    "SELECT id, recipient, body, state, created_at, attempts, next_attempt_at,"
    " expires_at, last_error, updated_at FROM outbox"
)


class Store:
    """The node's durable store on one SQLite file.

    Create it with :meth:`Store.open`; use it as a context manager or call :meth:`close`.

    Durability: every method that changes data runs in one ``BEGIN IMMEDIATE`` transaction and
    commits (WAL, ``synchronous=FULL``) before it returns. When it returns, the change survives
    a crash or power cut; when it raises, nothing of it was written.

    Thread safety: one ``Store`` owns one SQLite connection (opened with
    ``check_same_thread=False`` so that ``trio.to_thread`` may call it from any worker thread).
    Callers must serialise access: one call at a time per ``Store``, for example behind a
    ``trio.Lock`` or a ``CapacityLimiter(1)``. As a safety net every method also holds an
    internal lock, so concurrent calls wait for each other instead of interleaving their
    transactions. Several processes may open the same file; SQLite's locking serialises them.

    Resource handling: the connection is closed by :meth:`close` (or leaving the ``with``
    block); after that every method raises :class:`StoreError`.

    Error handling: invalid arguments raise :class:`TypeError` or :class:`ValueError` (names:
    :class:`ContactError`) before anything is written; SQLite failures raise
    :class:`StoreError` (:class:`StoreCorruptError` if SQLite reports corruption) after the
    transaction is rolled back.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        """Wrap an open, configured and migrated connection. Use :meth:`Store.open` instead."""
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._lock = threading.RLock()  # re-entered by writes inside batch()
        self._in_batch = False

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(
        cls, path: os.PathLike[str] | str, *, migrations: tuple[Migration, ...] = MIGRATIONS
    ) -> Store:
        """Open the store at ``path``, creating it if the file does not exist.

        A new file is created with mode 0600 before SQLite touches it. An existing file is
        first checked through a read-only connection (SQLite header, ``application_id``,
        schema version, ``PRAGMA quick_check``) and refused, unmodified, if it is not a healthy
        p2pnode database. An empty file, or an empty SQLite database, is initialised. Missing
        migrations are then applied in order, each in its own transaction.

        Args:
            path: the database file. Its directory must exist (and should be mode 0700).
            migrations: the migration list; ``len(migrations)`` is the schema version this
                call targets. Only tests and tools pass anything but :data:`MIGRATIONS`.

        Returns:
            The open store.

        Raises:
            StoreCorruptError: the file is not SQLite, belongs to another program, or fails the
                integrity check. The file was not modified.
            StoreVersionError: the file has a newer schema than ``len(migrations)``.
            StoreError: the file cannot be created, read or opened, WAL mode is unavailable,
                or a migration failed (that migration was rolled back).
            ValueError: ``migrations`` is empty.
        """
        if not migrations:
            raise ValueError("migrations must contain at least the initial schema")
        path = Path(os.path.abspath(path))
        if not _create_if_missing(path):
            try:
                check_private_file(path)
            except HomeError as exc:
                raise StoreError(str(exc)) from exc
            _inspect_existing(path, len(migrations))
        try:
            conn = sqlite3.connect(
                _uri(path, "rw"), uri=True, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        try:
            _configure(conn, path)
            _migrate(conn, path, migrations)
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise _corrupt(path, f"SQLite reports: {exc}") from exc
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @property
    def path(self) -> Path:
        """The absolute path of the database file."""
        return self._path

    def close(self) -> None:
        """Close the connection. Idempotent; every committed change is already durable."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"<Store {self._path} ({state})>"

    # ---------------------------------------------------------------- transactions

    def _failure(self, exc: sqlite3.Error, doing: str) -> StoreError:
        if _is_corruption(exc):
            return StoreCorruptError(
                f"{self._path}: {doing} failed because SQLite reports corruption ({exc}). "
                "Stop p2pnode, move the file aside (with its -wal and -shm files) and restore "
                "it from a backup"
            )
        return StoreError(f"{self._path}: {doing} failed: {exc}")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group the changes made inside the block into one durable commit (group commit).

        Inside the block each change still succeeds or fails as a whole (it runs under a
        savepoint), but nothing is durable until the block ends: callers must not acknowledge
        any of the batched changes to anyone before it has. If the block raises, every change
        in it is rolled back. Batches do not nest.

        Raises:
            StoreError: if the commit fails (nothing of the batch was written), or on nesting.
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"{self._path}: batch failed: the store is closed")
            if self._in_batch:
                raise StoreError(f"{self._path}: batches do not nest")
            try:
                conn.execute("BEGIN IMMEDIATE")
                self._in_batch = True
                try:
                    yield
                    conn.execute("COMMIT")
                finally:
                    self._in_batch = False
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._failure(exc, "batch") from exc

    @contextmanager
    def _write(self, doing: str) -> Iterator[sqlite3.Connection]:
        """Run the block in one IMMEDIATE transaction (a savepoint inside :meth:`batch`);
        commit durably or roll back."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"{self._path}: {doing} failed: the store is closed")
            if self._in_batch:
                with self._savepoint(conn, doing):
                    yield conn
                return
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    # Reached with an open transaction only if the block or COMMIT raised.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                raise self._failure(exc, doing) from exc

    @contextmanager
    def _savepoint(self, conn: sqlite3.Connection, doing: str) -> Iterator[None]:
        try:
            conn.execute("SAVEPOINT op")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK TO op")
                raise
            finally:
                conn.execute("RELEASE op")
        except sqlite3.Error as exc:
            raise self._failure(exc, doing) from exc

    @contextmanager
    def _read(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"{self._path}: {doing} failed: the store is closed")
            try:
                yield conn
            except sqlite3.Error as exc:
                raise self._failure(exc, doing) from exc

    # ---------------------------------------------------------------- outbox

    def enqueue(
        self, message_id: bytes, recipient: bytes, body: bytes, now: int, expires_at: int
    ) -> OutboxEntry:
        """Add an outgoing message in state ``queued``, due immediately.

        The entry is durably committed before this returns, so the send can then be
        acknowledged to the user.

        Args:
            message_id: 16 random bytes, new to the outbox.
            recipient: the recipient's 32-byte public key.
            body: at most :data:`MAX_BODY_SIZE` bytes.
            now: the current time (ms); becomes ``created_at``, ``updated_at`` and
                ``next_attempt_at``.
            expires_at: after this time the message is not sent any more; must be after ``now``.

        Returns:
            The new entry.

        Raises:
            DuplicateMessageError: ``message_id`` is already in the outbox (it is unchanged).
            TypeError, ValueError: an argument has the wrong type, size or range.
            StoreError: SQLite failed; nothing was written.
        """
        _check_bytes("message_id", message_id, MESSAGE_ID_SIZE)
        _check_bytes("recipient", recipient, NODE_KEY_SIZE)
        _check_blob("body", body, MAX_BODY_SIZE, "MAX_BODY_SIZE")
        _check_int("now", now)
        _check_int("expires_at", expires_at)
        if expires_at <= now:
            raise ValueError(f"expires_at ({expires_at}) must be after now ({now})")
        with self._write("enqueue") as conn:
            if conn.execute("SELECT 1 FROM outbox WHERE id = ?", (message_id,)).fetchone():
                raise DuplicateMessageError(
                    f"message id {message_id.hex()} is already in the outbox"
                )
            conn.execute(
                "INSERT INTO outbox (id, recipient, body, state, created_at, attempts,"
                " next_attempt_at, expires_at, last_error, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 0, ?, ?, NULL, ?)",
                (
                    message_id,
                    recipient,
                    body,
                    DeliveryState.QUEUED.value,
                    now,
                    now,
                    expires_at,
                    now,
                ),
            )
        return OutboxEntry.queued(message_id, recipient, body, now, expires_at)

    def outbox_get(self, message_id: bytes) -> OutboxEntry | None:
        """Return the outbox entry with this id, or ``None`` if there is none.

        Raises:
            TypeError, ValueError: ``message_id`` is not 16 bytes.
            StoreError: SQLite failed.
        """
        _check_bytes("message_id", message_id, MESSAGE_ID_SIZE)
        with self._read("outbox_get") as conn:
            row = conn.execute(
                _OUTBOX_SELECT + " WHERE id = ?",
                (message_id,),
            ).fetchone()
        return None if row is None else _outbox_entry(row)

    def outbox_due(self, now: int, limit: int) -> list[OutboxEntry]:
        """Return pending entries that are due for an attempt.

        An entry is due if it is ``queued`` or ``sent``, its ``next_attempt_at`` <= ``now`` and
        it has not expired (``expires_at`` > ``now``; retire expired ones with
        :meth:`outbox_expire`). ``sent`` entries are included so that a message whose receipt
        never came (for example across a restart) is sent again; message ids make that safe.

        Args:
            now: the current time (ms).
            limit: at most this many entries (1 to :data:`MAX_LIST_LIMIT`).

        Returns:
            The entries, ordered by ``next_attempt_at``, then in the order they were queued.

        Raises:
            TypeError, ValueError: an argument has the wrong type or range.
            StoreError: SQLite failed.
        """
        _check_int("now", now)
        _check_limit(limit)
        with self._read("outbox_due") as conn:
            rows = conn.execute(
                _OUTBOX_SELECT + " INDEXED BY outbox_pending"
                " WHERE state IN ('queued', 'sent') AND next_attempt_at <= ? AND expires_at > ?"
                " ORDER BY next_attempt_at, rowid LIMIT ?",
                (now, now, limit),
            ).fetchall()
        return [_outbox_entry(row) for row in rows]

    def outbox_make_all_due(self, now: int) -> int:
        """Make every pending (queued or sent) entry due at ``now``; returns how many.

        For a restart: a ``sent`` entry's receipt can no longer come over a link that died
        with the old process, so waiting out its receipt timeout would only delay it.
        """
        _check_int("now", now)
        with self._write("outbox_make_all_due") as conn:
            cursor = conn.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE state IN ('queued', 'sent')"
                " AND next_attempt_at > ?",
                (now, now),
            )
            return int(cursor.rowcount)

    def outbox_pending_for(self, recipient: bytes, now: int, limit: int) -> list[OutboxEntry]:
        """Return ``recipient``'s pending (queued or sent), unexpired entries, whatever their
        ``next_attempt_at``: for when a link to it appears and waiting out a backoff would be
        pointless. In the order they were queued.

        Raises:
            TypeError, ValueError: an argument has the wrong type or range.
            StoreError: SQLite failed.
        """
        _check_bytes("recipient", recipient, NODE_KEY_SIZE)
        _check_int("now", now)
        _check_limit(limit)
        with self._read("outbox_pending_for") as conn:
            rows = conn.execute(
                _OUTBOX_SELECT + " INDEXED BY outbox_recipient_pending"
                " WHERE recipient = ? AND state IN ('queued', 'sent') AND expires_at > ?"
                " ORDER BY rowid LIMIT ?",
                (recipient, now, limit),
            ).fetchall()
        return [_outbox_entry(row) for row in rows]

    def _transition(
        self,
        doing: str,
        message_id: bytes,
        allowed_from: tuple[DeliveryState, ...],
        update: str,
        params: tuple[object, ...],
    ) -> bool:
        """Run ``update`` on one entry if it is in one of the ``allowed_from`` states.

        ``update`` is a constant statement ending in ``WHERE id = ?``; it is run with ``params``
        followed by the id. Returns False if the state did not allow it.
        """
        with self._write(doing) as conn:
            row = conn.execute("SELECT state FROM outbox WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise UnknownMessageError(f"message id {message_id.hex()} is not in the outbox")
            if DeliveryState(row[0]) not in allowed_from:
                return False
            conn.execute(update, (*params, message_id))
        return True

    def mark_sent(self, message_id: bytes, now: int, next_attempt_at: int | None = None) -> bool:
        """Record that a pending message was handed to a link and awaits its receipt.

        Args:
            message_id: the entry's id.
            now: the current time (ms).
            next_attempt_at: when to try again if no receipt has arrived by then (a receipt
                deadline that also holds across restarts). If ``None``, the entry stays due as
                it is, and the caller must itself avoid picking it again while it is in flight.

        Returns:
            True if the entry is now ``sent``; False if it was already ``delivered`` or
            ``failed`` (it is unchanged).

        Raises:
            UnknownMessageError: no entry has this id.
            TypeError, ValueError: an argument has the wrong type, size or range
                (``next_attempt_at`` before ``now``).
            StoreError: SQLite failed.
        """
        _check_bytes("message_id", message_id, MESSAGE_ID_SIZE)
        _check_int("now", now)
        if next_attempt_at is None:
            return self._transition(
                "mark_sent",
                message_id,
                _PENDING,
                "UPDATE outbox SET state = 'sent', updated_at = ? WHERE id = ?",
                (now,),
            )
        _check_int("next_attempt_at", next_attempt_at)
        if next_attempt_at < now:
            raise ValueError(f"next_attempt_at ({next_attempt_at}) is before now ({now})")
        return self._transition(
            "mark_sent",
            message_id,
            _PENDING,
            "UPDATE outbox SET state = 'sent', next_attempt_at = ?, updated_at = ? WHERE id = ?",
            (next_attempt_at, now),
        )

    def record_attempt_failure(
        self, message_id: bytes, now: int, next_attempt_at: int, error: str
    ) -> bool:
        """Record a failed delivery attempt and when to try again.

        The entry goes back to ``queued``, ``attempts`` grows by one and ``last_error`` is set
        (truncated to :data:`MAX_ERROR_TEXT` characters).

        Args:
            message_id: the entry's id.
            now: the current time (ms).
            next_attempt_at: when the entry is due again; not before ``now``.
            error: why the attempt failed, for the user.

        Returns:
            True if recorded; False if the entry was already ``delivered`` or ``failed`` (a
            late failure report does not reopen it).

        Raises:
            UnknownMessageError: no entry has this id.
            TypeError, ValueError: an argument has the wrong type, size or range.
            StoreError: SQLite failed.
        """
        _check_bytes("message_id", message_id, MESSAGE_ID_SIZE)
        _check_int("now", now)
        _check_int("next_attempt_at", next_attempt_at)
        if next_attempt_at < now:
            raise ValueError(f"next_attempt_at ({next_attempt_at}) is before now ({now})")
        return self._transition(
            "record_attempt_failure",
            message_id,
            _PENDING,
            "UPDATE outbox SET state = 'queued', attempts = attempts + 1, next_attempt_at = ?,"
            " last_error = ?, updated_at = ? WHERE id = ?",
            (next_attempt_at, _error_text(error), now),
        )

    def mark_delivered_by(
        self, recipient: bytes, message_ids: Sequence[bytes], now: int
    ) -> list[bytes]:
        """Record one receipt from ``recipient`` naming ``message_ids``, in one transaction.

        Only ``queued`` or ``sent`` entries change; ``delivered`` is terminal (a second receipt
        changes nothing), and a ``failed`` entry stays failed. An entry addressed to anyone else
        is left alone (a receipt counts only from the node the message was for) and an id not
        in the outbox is skipped (a receipt may name what a peer believes we sent).

        Returns:
            The ids that changed to ``delivered`` now, in the order given.

        Raises:
            TypeError, ValueError: an argument has the wrong type, size or range.
            StoreError: SQLite failed; nothing was recorded.
        """
        _check_bytes("recipient", recipient, NODE_KEY_SIZE)
        _check_int("now", now)
        for message_id in message_ids:
            _check_bytes("message_id", message_id, MESSAGE_ID_SIZE)
        changed = []
        with self._write("mark_delivered_by") as conn:
            for message_id in message_ids:
                cursor = conn.execute(
                    "UPDATE outbox SET state = 'delivered', updated_at = ?"
                    " WHERE id = ? AND recipient = ? AND state IN ('queued', 'sent')",
                    (now, message_id, recipient),
                )
                if cursor.rowcount:
                    changed.append(message_id)
        return changed

    def mark_failed(self, message_id: bytes, now: int, reason: str) -> bool:
        """Give up on a pending message; ``reason`` becomes ``last_error``.

        Returns:
            True if the entry changed to ``failed``; False if it was already ``delivered``
            (delivered is terminal) or ``failed``.

        Raises:
            UnknownMessageError: no entry has this id.
            TypeError, ValueError: an argument has the wrong type, size or range.
            StoreError: SQLite failed.
        """
        _check_bytes("message_id", message_id, MESSAGE_ID_SIZE)
        _check_int("now", now)
        return self._transition(
            "mark_failed",
            message_id,
            _PENDING,
            "UPDATE outbox SET state = 'failed', last_error = ?, updated_at = ? WHERE id = ?",
            (_error_text(reason), now),
        )

    def outbox_expire(self, now: int) -> list[bytes]:
        """Mark every pending entry whose ``expires_at`` <= ``now`` as ``failed`` ("expired").

        Returns:
            The ids of the entries that expired now, oldest expiry first.

        Raises:
            TypeError, ValueError: ``now`` has the wrong type or range.
            StoreError: SQLite failed; nothing was changed.
        """
        _check_int("now", now)
        with self._write("outbox_expire") as conn:
            rows = conn.execute(
                "SELECT id FROM outbox INDEXED BY outbox_expiry"
                " WHERE state IN ('queued', 'sent') AND expires_at <= ?"
                " ORDER BY expires_at, rowid",
                (now,),
            ).fetchall()
            conn.execute(
                "UPDATE outbox INDEXED BY outbox_expiry"
                " SET state = 'failed', last_error = 'expired', updated_at = ?"
                " WHERE state IN ('queued', 'sent') AND expires_at <= ?",
                (now, now),
            )
        return [bytes(row[0]) for row in rows]

    def outbox_prune(self, older_than: int) -> int:
        """Delete ``delivered`` and ``failed`` entries last updated before ``older_than``.

        Returns:
            How many entries were deleted.

        Raises:
            TypeError, ValueError: ``older_than`` has the wrong type or range.
            StoreError: SQLite failed; nothing was deleted.
        """
        _check_int("older_than", older_than)
        with self._write("outbox_prune") as conn:
            cursor = conn.execute(
                "DELETE FROM outbox WHERE state IN ('delivered', 'failed') AND updated_at < ?",
                (older_than,),
            )
            return cursor.rowcount

    def outbox_counts(self) -> dict[DeliveryState, int]:
        """Return the number of outbox entries in each state (every state is present).

        Raises:
            StoreError: SQLite failed.
        """
        counts = dict.fromkeys(DeliveryState, 0)
        with self._read("outbox_counts") as conn:
            for state, count in conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"):
                counts[DeliveryState(state)] = int(count)
        return counts

    # ---------------------------------------------------------------- inbox and seen ids

    def accept_incoming(
        self, message_id: bytes, sender: bytes, body: bytes, sent_at: int, received_at: int
    ) -> bool:
        """Store a verified incoming message once, and remember its id as seen.

        The inbox row and the seen (sender, message id) pair are written in one transaction,
        committed durably before this returns: only then may a receipt be sent. Ids are
        deduplicated per sender, so one peer cannot suppress another's message by reusing its
        id. A duplicate (also of a message since deleted from the inbox) stores nothing and
        should be acknowledged again.

        Args:
            message_id: the sender's 16-byte message id.
            sender: the sender's 32-byte public key (verified by the caller).
            body: at most :data:`MAX_BODY_SIZE` bytes.
            sent_at: the sender's timestamp (ms), already checked against the time window.
            received_at: the current time (ms); also the time the id was seen.

        Returns:
            True if the message is new and was stored; False if it was already seen.

        Raises:
            TypeError, ValueError: an argument has the wrong type, size or range.
            StoreError: SQLite failed; nothing was stored, so no receipt may be sent.
        """
        _check_bytes("message_id", message_id, MESSAGE_ID_SIZE)
        _check_bytes("sender", sender, NODE_KEY_SIZE)
        _check_blob("body", body, MAX_BODY_SIZE, "MAX_BODY_SIZE")
        _check_int("sent_at", sent_at)
        _check_int("received_at", received_at)
        with self._write("accept_incoming") as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO seen (sender, message_id, seen_at) VALUES (?, ?, ?)",
                (sender, message_id, received_at),
            )
            if cursor.rowcount == 0:
                return False
            conn.execute(
                "INSERT INTO inbox (sender, message_id, body, sent_at, received_at, is_read)"
                " VALUES (?, ?, ?, ?, ?, 0)",
                (sender, message_id, body, sent_at, received_at),
            )
        return True

    def inbox_list(
        self, unread_only: bool, limit: int, before: int | None = None
    ) -> list[InboxMessage]:
        """Return inbox messages, newest first.

        Args:
            unread_only: only messages not marked read.
            limit: at most this many (1 to :data:`MAX_LIST_LIMIT`).
            before: only messages with ``seq`` < ``before``; pass the last ``seq`` of a page to
                get the next page.

        Raises:
            TypeError, ValueError: an argument has the wrong type or range.
            StoreError: SQLite failed.
        """
        _check_limit(limit)
        cursor_seq = _MAX_INT64 if before is None else _check_int("before", before)
        query = (
            "SELECT seq, message_id, sender, body, sent_at, received_at, is_read FROM inbox"
            " WHERE seq < ? AND is_read = 0 ORDER BY seq DESC LIMIT ?"
            if unread_only
            else "SELECT seq, message_id, sender, body, sent_at, received_at, is_read FROM inbox"
            " WHERE seq < ? ORDER BY seq DESC LIMIT ?"
        )
        with self._read("inbox_list") as conn:
            rows = conn.execute(query, (cursor_seq, limit)).fetchall()
        return [_inbox_message(row) for row in rows]

    def mark_read(self, seqs: Iterable[int]) -> int:
        """Mark inbox messages read, by :attr:`InboxMessage.seq`. Unknown seqs are ignored.

        Returns:
            How many messages changed from unread to read.

        Raises:
            TypeError, ValueError: a seq is not a non-negative int.
            StoreError: SQLite failed; nothing was changed.
        """
        params = [(_check_int("seq", seq),) for seq in seqs]
        with self._write("mark_read") as conn:
            cursor = conn.executemany(
                "UPDATE inbox SET is_read = 1 WHERE seq = ? AND is_read = 0", params
            )
            return max(cursor.rowcount, 0)

    def unread_count(self) -> int:
        """Return the number of inbox messages not marked read.

        Raises:
            StoreError: SQLite failed.
        """
        with self._read("unread_count") as conn:
            return int(conn.execute("SELECT count(*) FROM inbox WHERE is_read = 0").fetchone()[0])

    def delete_inbox(self, seqs: Iterable[int]) -> int:
        """Delete inbox messages by :attr:`InboxMessage.seq`; their ids stay seen.

        A deleted message is therefore not stored again if its sender retries it (until
        :meth:`prune_seen` forgets the id). Unknown seqs are ignored.

        Returns:
            How many messages were deleted.

        Raises:
            TypeError, ValueError: a seq is not a non-negative int.
            StoreError: SQLite failed; nothing was deleted.
        """
        params = [(_check_int("seq", seq),) for seq in seqs]
        with self._write("delete_inbox") as conn:
            cursor = conn.executemany("DELETE FROM inbox WHERE seq = ?", params)
            return max(cursor.rowcount, 0)

    def prune_seen(self, older_than: int) -> int:
        """Forget seen message ids first seen before ``older_than``.

        Ids of messages still in the inbox are kept. Choose ``older_than`` further back than
        the window in which incoming timestamps are accepted, so that a replay of a forgotten
        message is refused for its old timestamp rather than stored again.

        Returns:
            How many seen ids were forgotten.

        Raises:
            TypeError, ValueError: ``older_than`` has the wrong type or range.
            StoreError: SQLite failed; nothing was deleted.
        """
        _check_int("older_than", older_than)
        with self._write("prune_seen") as conn:
            cursor = conn.execute(
                "DELETE FROM seen WHERE seen_at < ? AND NOT EXISTS (SELECT 1 FROM inbox"
                " WHERE inbox.sender = seen.sender AND inbox.message_id = seen.message_id)",
                (older_than,),
            )
            return cursor.rowcount

    # ---------------------------------------------------------------- contacts

    def contact_add(self, name: str, node_key: bytes, now: int) -> Contact:
        """Save ``name`` as the petname of ``node_key``.

        Names are stored NFC-normalised and compared ignoring case (in every script). A valid
        name has 1 to :data:`MAX_CONTACT_NAME_LENGTH` characters, no control or invisible
        characters and no leading or trailing whitespace.

        Returns:
            The new contact.

        Raises:
            ContactError: the name is invalid, already used (ignoring case), or the key already
                has a name (the message names it).
            TypeError, ValueError: ``node_key`` or ``now`` has the wrong type, size or range.
            StoreError: SQLite failed; nothing was written.
        """
        stored = _normalise_contact_name(name)
        _check_bytes("node_key", node_key, NODE_KEY_SIZE)
        _check_int("now", now)
        with self._write("contact_add") as conn:
            existing = conn.execute(
                "SELECT name FROM contacts WHERE name_key = ?", (_name_key(stored),)
            ).fetchone()
            if existing is not None:
                raise ContactError(f"a contact named {existing[0]!r} already exists")
            existing = conn.execute(
                "SELECT name FROM contacts WHERE node_key = ?", (node_key,)
            ).fetchone()
            if existing is not None:
                raise ContactError(f"this node key is already saved as {existing[0]!r}")
            conn.execute(
                "INSERT INTO contacts (name, name_key, node_key, added_at) VALUES (?, ?, ?, ?)",
                (stored, _name_key(stored), node_key, now),
            )
        return Contact(name=stored, node_key=node_key, added_at=now)

    def contact_get(self, name: str) -> Contact:
        """Return the contact with this name (ignoring case).

        Raises:
            ContactError: the name is invalid, or there is no contact with this name.
            StoreError: SQLite failed.
        """
        stored = _normalise_contact_name(name)
        with self._read("contact_get") as conn:
            row = conn.execute(
                "SELECT name, node_key, added_at FROM contacts WHERE name_key = ?",
                (_name_key(stored),),
            ).fetchone()
        if row is None:
            raise ContactError(f"there is no contact named {stored!r}")
        return _contact(row)

    def contact_for_key(self, node_key: bytes) -> Contact | None:
        """Return the contact naming ``node_key``, or ``None`` (to show senders by petname).

        Raises:
            TypeError, ValueError: ``node_key`` is not 32 bytes.
            StoreError: SQLite failed.
        """
        _check_bytes("node_key", node_key, NODE_KEY_SIZE)
        with self._read("contact_for_key") as conn:
            row = conn.execute(
                "SELECT name, node_key, added_at FROM contacts WHERE node_key = ?", (node_key,)
            ).fetchone()
        return None if row is None else _contact(row)

    def contact_list(self) -> list[Contact]:
        """Return every contact, ordered by name ignoring case.

        Raises:
            StoreError: SQLite failed.
        """
        with self._read("contact_list") as conn:
            rows = conn.execute(
                "SELECT name, node_key, added_at FROM contacts ORDER BY name_key, name"
            ).fetchall()
        return [_contact(row) for row in rows]

    def contact_rename(self, old: str, new: str) -> Contact:
        """Rename a contact. Changing only the case of a name is allowed.

        Returns:
            The renamed contact.

        Raises:
            ContactError: either name is invalid, there is no contact named ``old``, or another
                contact is already named ``new`` (ignoring case).
            StoreError: SQLite failed; nothing was changed.
        """
        old_stored = _normalise_contact_name(old)
        new_stored = _normalise_contact_name(new)
        with self._write("contact_rename") as conn:
            row = conn.execute(
                "SELECT rowid, node_key, added_at FROM contacts WHERE name_key = ?",
                (_name_key(old_stored),),
            ).fetchone()
            if row is None:
                raise ContactError(f"there is no contact named {old_stored!r}")
            rowid, node_key, added_at = row
            clash = conn.execute(
                "SELECT name FROM contacts WHERE name_key = ? AND rowid != ?",
                (_name_key(new_stored), rowid),
            ).fetchone()
            if clash is not None:
                raise ContactError(f"a contact named {clash[0]!r} already exists")
            conn.execute(
                "UPDATE contacts SET name = ?, name_key = ? WHERE rowid = ?",
                (new_stored, _name_key(new_stored), rowid),
            )
        return Contact(name=new_stored, node_key=bytes(node_key), added_at=int(added_at))

    def contact_remove(self, name: str) -> None:
        """Remove the contact with this name (ignoring case).

        Raises:
            ContactError: the name is invalid, or there is no contact with this name.
            StoreError: SQLite failed; nothing was changed.
        """
        stored = _normalise_contact_name(name)
        with self._write("contact_remove") as conn:
            cursor = conn.execute("DELETE FROM contacts WHERE name_key = ?", (_name_key(stored),))
            if cursor.rowcount == 0:
                raise ContactError(f"there is no contact named {stored!r}")

    # ---------------------------------------------------------------- peer cache

    def peer_put(self, node_key: bytes, record: bytes, seq: int, now: int) -> bool:
        """Cache a peer's signed record unless one with an equal or higher ``seq`` is cached.

        The record is stored verbatim; verifying it is the DHT layer's job.

        Args:
            node_key: the peer's 32-byte public key.
            record: the signed record, at most :data:`MAX_PEER_RECORD_SIZE` bytes.
            seq: its sequence number (>= 0).
            now: the current time (ms); becomes ``updated_at``.

        Returns:
            True if the record was stored; False if the cached one has an equal or higher seq.

        Raises:
            TypeError, ValueError: an argument has the wrong type, size or range.
            StoreError: SQLite failed; nothing was changed.
        """
        _check_bytes("node_key", node_key, NODE_KEY_SIZE)
        _check_blob("record", record, MAX_PEER_RECORD_SIZE, "MAX_PEER_RECORD_SIZE")
        _check_int("seq", seq)
        _check_int("now", now)
        with self._write("peer_put") as conn:
            cursor = conn.execute(
                "INSERT INTO peers (node_key, record, seq, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (node_key) DO UPDATE SET record = excluded.record,"
                " seq = excluded.seq, updated_at = excluded.updated_at"
                " WHERE excluded.seq > peers.seq",
                (node_key, record, seq, now),
            )
            return cursor.rowcount == 1

    def peer_get(self, node_key: bytes) -> tuple[bytes, int] | None:
        """Return the cached ``(record, seq)`` for ``node_key``, or ``None``.

        Raises:
            TypeError, ValueError: ``node_key`` is not 32 bytes.
            StoreError: SQLite failed.
        """
        _check_bytes("node_key", node_key, NODE_KEY_SIZE)
        with self._read("peer_get") as conn:
            row = conn.execute(
                "SELECT record, seq FROM peers WHERE node_key = ?", (node_key,)
            ).fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]))

    def peer_list(self, limit: int) -> list[PeerEntry]:
        """Return cached peers, most recently updated first.

        Args:
            limit: at most this many (1 to :data:`MAX_LIST_LIMIT`).

        Raises:
            TypeError, ValueError: ``limit`` has the wrong type or range.
            StoreError: SQLite failed.
        """
        _check_limit(limit)
        with self._read("peer_list") as conn:
            rows = conn.execute(
                "SELECT node_key, record, seq, updated_at FROM peers"
                " ORDER BY updated_at DESC, node_key LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            PeerEntry(node_key=bytes(k), record=bytes(r), seq=int(s), updated_at=int(u))
            for k, r, s, u in rows
        ]

    def peer_remove(self, node_key: bytes) -> bool:
        """Drop the cached record of ``node_key``.

        Returns:
            True if a record was removed; False if none was cached.

        Raises:
            TypeError, ValueError: ``node_key`` is not 32 bytes.
            StoreError: SQLite failed.
        """
        _check_bytes("node_key", node_key, NODE_KEY_SIZE)
        with self._write("peer_remove") as conn:
            cursor = conn.execute("DELETE FROM peers WHERE node_key = ?", (node_key,))
            return cursor.rowcount == 1
