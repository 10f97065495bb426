"""The round trip's floor on this machine, measured in the same run as the node's.

Two bare trio processes do what one round trip needs and nothing more:

1. the sender signs and seals a message (:func:`p2pnode.envelope.seal_message`) and writes it,
   length-prefixed, to a loopback TCP socket;
2. the echo process opens and verifies it (:func:`~p2pnode.envelope.open_message`), inserts it
   into an SQLite database in WAL mode with ``synchronous=FULL`` (one fsynced commit per
   message, as the node's store makes) on the loop's own thread, as the node commits a lone
   change on an idle loop, then signs a receipt (:func:`~p2pnode.envelope.make_receipt`) and
   writes it back;
3. the sender verifies the receipt (:func:`~p2pnode.envelope.open_receipt`).

No link encryption, store schema, outbox, delivery task or group commit: what is left of a
node's round trip when the node costs nothing. ``bench/messaging.py`` measures it right after
the node's round trips and reports the ratio of the two, so that a round trip target can be
judged against what the machine allows at that moment (the machines are shared and noisy).
GUIDE section 4 gives 1.0 ms p50 for a similar exchange without the commit.

Run as ``python bench/floor.py --echo PORT DIR`` it is the echo process (the benchmark starts
it); :func:`measure` is the sender.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import trio

from p2pnode.clock import wall_clock_ms
from p2pnode.envelope import make_receipt, open_message, open_receipt, seal_message
from p2pnode.identity import Identity

_LENGTH: Final = struct.Struct(">I")
#: Largest frame either side accepts (a sealed 64 KiB body, with room to spare).
MAX_FRAME: Final = 128 * 1024
#: Seconds the echo process has to connect, and each round trip to complete.
TIMEOUT: Final = 30.0


async def _read_frame(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next length-prefixed frame, or None at end of stream."""
    while True:
        if len(buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer)
            if length > MAX_FRAME:
                raise ValueError(f"a {length}-byte frame exceeds {MAX_FRAME}")
            if len(buffer) >= _LENGTH.size + length:
                frame = bytes(buffer[_LENGTH.size : _LENGTH.size + length])
                del buffer[: _LENGTH.size + length]
                return frame
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data


def _framed(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


class _Inbox:
    """An SQLite table written as the node's store writes (WAL, ``synchronous=FULL``, one
    commit per message), on the loop's own thread, as the node's store worker commits a lone
    change while its loop is mostly idle (``p2pnode.storeworker``)."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("CREATE TABLE inbox (id BLOB PRIMARY KEY, body BLOB NOT NULL)")

    def store(self, message_id: bytes, body: bytes) -> None:
        """Insert one row and commit it durably."""
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("INSERT INTO inbox VALUES (?, ?)", (message_id, body))
        self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        self._db.close()


async def echo(port: int, workdir: Path) -> None:
    """The echo process: connect to the sender at ``port``, send our identity and encryption
    keys (64 bytes), read the sender's identity key (32 bytes), then answer every message
    with a receipt once it is committed, until the sender closes the connection."""
    identity = Identity.generate(wall_clock_ms())
    inbox = _Inbox(workdir / "floor.db")
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            encryption = bytes(identity.encryption_key.private_key.public_key)
            await stream.send_all(identity.public_key + encryption)
            buffer = bytearray()
            while len(buffer) < 32:
                data = await stream.receive_some(32)
                if not data:
                    return
                buffer += data
            sender, buffer = bytes(buffer[:32]), buffer[32:]
            while (wire := await _read_frame(stream, buffer)) is not None:
                now = wall_clock_ms()
                message = open_message(
                    wire,
                    own_identity=identity.public_key,
                    decryption_keys=identity.decryption_keys(now),
                    now_ms=now,
                )
                inbox.store(message.id, message.body)
                receipt = make_receipt(identity.signing_key, sender, [message.id], now_ms=now)
                await stream.send_all(_framed(receipt))
    finally:
        inbox.close()


async def measure(count: int, size: int, workdir: Path) -> list[float]:
    """``count`` round trips of ``size``-byte messages, one at a time, against a fresh echo
    process with its database in ``workdir``; milliseconds from sealing to the receipt
    verified, each.

    Raises:
        RuntimeError: if the echo process does not connect or a round trip fails.
    """
    identity = Identity.generate(wall_clock_ms())
    body = os.urandom(size)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--echo", str(port), str(workdir)]
    )
    try:
        try:
            with trio.fail_after(TIMEOUT):
                stream = await listeners[0].accept()
        finally:
            for listener in listeners:
                await listener.aclose()
        async with stream:
            buffer = bytearray()
            while len(buffer) < 64:
                data = await stream.receive_some(64)
                if not data:
                    raise RuntimeError("the echo process closed the connection")
                buffer += data
            peer, encryption, buffer = bytes(buffer[:32]), bytes(buffer[32:64]), buffer[64:]
            await stream.send_all(identity.public_key)
            samples = []
            for _ in range(count):
                with trio.fail_after(TIMEOUT):
                    start = time.perf_counter()
                    message_id, wire = seal_message(
                        identity.signing_key, peer, encryption, body, now_ms=wall_clock_ms()
                    )
                    await stream.send_all(_framed(wire))
                    receipt = await _read_frame(stream, buffer)
                    if receipt is None:
                        raise RuntimeError("the echo process closed the connection")
                    open_receipt(
                        receipt,
                        own_identity=identity.public_key,
                        peer_identity=peer,
                        message_id=message_id,
                    )
                    samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--echo":
        sys.exit("usage: floor.py --echo PORT DIR  (the echo process; bench/messaging.py runs it)")
    trio.run(echo, int(sys.argv[2]), Path(sys.argv[3]))
