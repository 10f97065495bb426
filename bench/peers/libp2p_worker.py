"""One side of the py-libp2p transport benchmark; runs inside the libp2p virtualenv.

Started by ``bench/peers/libp2p_bench.py`` with the peer virtualenv's Python (never the
project's: py-libp2p and its dependencies live only in ``bench/.venvs/libp2p``). Two roles::

    python libp2p_worker.py listen [--lifetime S]
    python libp2p_worker.py dial ADDR --messages N --rtt N --connects N --window N [--timeout S]

``listen`` starts a libp2p host on ``/ip4/127.0.0.1/tcp/0`` (TCP transport; the host's default
security and muxer, Yamux requested explicitly) and serves :data:`PROTOCOL`. It prints one JSON
line ``{"role": "listener", "addr": "/ip4/127.0.0.1/tcp/PORT/p2p/ID", ...}`` once it listens,
then serves until its standard input is closed (or ``--lifetime`` passes), and prints a second
JSON line with what it received.

``dial`` connects to ADDR, opens ONE stream and runs, in order on that stream: a warm-up, the
request/reply round trips, plain one-way streaming, acknowledged streaming with a window of
outstanding messages. Then it times ``--connects`` fresh connections up to an open stream (a new
host and key each time), alternating two configurations: the library's defaults, and
``ConnectionConfig(max_connections_per_peer=1)`` (see :func:`make_host`). It prints one JSON
line with every sample.

Wire format on the benchmark stream: every message from the dialer is exactly
:data:`MESSAGE_SIZE` bytes, a kind byte, a 4-byte big-endian sequence number and padding.
Kinds: ``D`` one-way data (no answer), ``A`` data the listener acknowledges with an
:data:`ACK_SIZE`-byte ack (``a`` + the sequence number + padding), written once per message,
``R`` a request the listener echoes back whole, ``E`` end of a one-way batch: the listener
answers ``e`` + the number of ``D`` messages read since the previous ``E`` (4 bytes) + padding.
Only the public API of the ``libp2p`` package is used (``new_host`` and its options,
``IHost``, ``INetStream``, ``info_from_p2p_addr``, the connection's negotiated protocols).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import metadata
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

#: The benchmark's stream protocol.
PROTOCOL = TProtocol("/p2pnode-bench/transport/1.0.0")
#: Every dialer message is this long (kind byte, 4-byte sequence number, padding).
MESSAGE_SIZE = 100
#: Listener acks and batch counts are this long.
ACK_SIZE = 8
#: Bytes asked for per ``read`` (a read returns what is buffered, up to this).
READ_SIZE = 65536
#: Untimed round trips before the timed ones.
WARMUP_ROUND_TRIPS = 50
#: Packages whose versions the dialer reports.
REPORTED_PACKAGES = ("libp2p", "trio", "multiaddr", "noiseprotocol", "cryptography", "PyNaCl")


def message(kind: bytes, seq: int) -> bytes:
    """A :data:`MESSAGE_SIZE`-byte dialer message of ``kind`` carrying ``seq``."""
    head = kind + seq.to_bytes(4, "big")
    return head + b"x" * (MESSAGE_SIZE - len(head))


def small(kind: bytes, value: int) -> bytes:
    """An :data:`ACK_SIZE`-byte listener answer of ``kind`` carrying ``value``."""
    head = kind + value.to_bytes(4, "big")
    return head + b"\0" * (ACK_SIZE - len(head))


class StreamReader:
    """Exact-size reads over an :class:`INetStream` whose ``read`` returns any amount."""

    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def read_exactly(self, size: int) -> bytes:
        """The next ``size`` bytes; raises :class:`StreamEOF` if the stream ends first."""
        while len(self.buffer) < size:
            chunk = await self.stream.read(READ_SIZE)
            if not chunk:
                raise StreamEOF()
            self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


def make_host(one_connection_per_peer: bool = False) -> IHost:
    """A host with a fresh Ed25519 key and the library's defaults (TCP, Noise first, Yamux).

    ``one_connection_per_peer`` passes ``ConnectionConfig(max_connections_per_peer=1)``: with
    it, the swarm stops its dial as soon as one connection is up instead of waiting out its
    250 ms happy-eyeballs head start (py-libp2p 0.8.1 ``Swarm.dial_peer`` waits that long for the
    first dial to *fail* before it returns, even when there is only one address to dial).
    """
    if one_connection_per_peer:
        return new_host(
            muxer_preference="YAMUX",
            connection_config=ConnectionConfig(max_connections_per_peer=1),
        )
    return new_host(muxer_preference="YAMUX")


# --- the listener ----------------------------------------------------------------------------


class Listener:
    """Serves :data:`PROTOCOL` streams and counts what it reads."""

    def __init__(self) -> None:
        self.counts = {"D": 0, "A": 0, "R": 0, "E": 0}
        self.streams = 0
        self.errors: list[str] = []

    async def handle(self, stream: INetStream) -> None:
        """Read whole messages and answer them by kind until the dialer closes the stream."""
        self.streams += 1
        buffer = bytearray()
        batch = 0
        try:
            while True:
                chunk = await stream.read(READ_SIZE)
                if not chunk:
                    break
                buffer += chunk
                whole = len(buffer) - len(buffer) % MESSAGE_SIZE
                for offset in range(0, whole, MESSAGE_SIZE):
                    kind = buffer[offset : offset + 1]
                    if kind == b"D":
                        batch += 1
                        self.counts["D"] += 1
                    elif kind == b"A":
                        self.counts["A"] += 1
                        await stream.write(b"a" + buffer[offset + 1 : offset + 5] + b"\0\0\0")
                    elif kind == b"R":
                        self.counts["R"] += 1
                        await stream.write(bytes(buffer[offset : offset + MESSAGE_SIZE]))
                    elif kind == b"E":
                        self.counts["E"] += 1
                        await stream.write(small(b"e", batch))
                        batch = 0
                    else:
                        raise ValueError(f"unknown message kind {bytes(kind)!r}")
                del buffer[:whole]
        except StreamEOF:
            pass
        except (StreamError, ValueError) as error:  # reported, not fatal to the listener
            self.errors.append(f"{type(error).__name__}: {error}")
        finally:
            await stream.close()


async def wait_for_stdin_eof() -> None:
    """Return when the driver closes this process's standard input."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        while await stdin.receive_some(4096):
            pass


async def listen(lifetime: float) -> None:
    """The ``listen`` role: serve until stdin closes or ``lifetime`` seconds pass."""
    listener = Listener()
    host = make_host()
    host.set_stream_handler(PROTOCOL, listener.handle)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        addrs = [str(addr) for addr in host.get_addrs()]
        emit({"role": "listener", "addr": addrs[0], "addrs": addrs, "pid": os.getpid()})
        with trio.move_on_after(lifetime) as scope:
            await wait_for_stdin_eof()
        await host.close()
    emit(
        {
            "role": "listener",
            "done": True,
            "lifetime_expired": scope.cancelled_caught,
            "counts": listener.counts,
            "streams": listener.streams,
            "errors": listener.errors[:10],
            "cpu_s": time.process_time(),
        }
    )


# --- the dialer ------------------------------------------------------------------------------


def connection_protocols(host: IHost, peer: PeerInfo) -> dict[str, Any]:
    """Transport, security and muxer of the host's connection to ``peer``, as negotiated."""
    connections = host.get_peer_connection_info(peer.peer_id) or []  # type: ignore[attr-defined]
    if not connections:
        return {}
    connection = connections[0]
    info: dict[str, Any] = {"muxed_conn_class": type(connection.muxed_conn).__name__}
    metadata_of = getattr(connection, "get_interop_metadata", None)
    if metadata_of is not None:
        found = metadata_of()
        info["transport"] = found.get("transport_family")
        info["security"] = found.get("security_protocol")
        info["muxer"] = found.get("muxer_protocol")
    return info


async def round_trip(stream: INetStream, reader: StreamReader, seq: int) -> None:
    """One ``R`` request and its echo; raises if the echo differs."""
    request = message(b"R", seq)
    await stream.write(request)
    if await reader.read_exactly(MESSAGE_SIZE) != request:
        raise RuntimeError("echo differs from the request")


async def one_way(stream: INetStream, reader: StreamReader, count: int) -> dict[str, Any]:
    """Stream ``count`` ``D`` messages, then ``E``; timed until the listener's count arrives."""
    cpu = time.process_time()
    start = time.perf_counter()
    for seq in range(count):
        await stream.write(message(b"D", seq))
    written = time.perf_counter()
    await stream.write(message(b"E", count))
    answer = await reader.read_exactly(ACK_SIZE)
    elapsed = time.perf_counter() - start
    received = int.from_bytes(answer[1:5], "big")
    if answer[:1] != b"e" or received != count:
        raise RuntimeError(f"listener read {received} of {count} messages")
    return {
        "messages": count,
        "received": received,
        "seconds": elapsed,
        "write_seconds": written - start,
        "per_s": count / elapsed,
        "sender_cpu_s": time.process_time() - cpu,
    }


async def acknowledged(
    stream: INetStream, reader: StreamReader, count: int, window: int
) -> dict[str, Any]:
    """Stream ``count`` ``A`` messages with at most ``window`` unacknowledged; timed until the
    last ack arrives. Acks must come back in order."""
    slots = trio.Semaphore(window)
    cpu = time.process_time()
    start = time.perf_counter()

    async def collect_acks() -> None:
        for seq in range(count):
            ack = await reader.read_exactly(ACK_SIZE)
            if ack[:1] != b"a" or int.from_bytes(ack[1:5], "big") != seq:
                raise RuntimeError(f"unexpected ack {ack!r} for message {seq}")
            slots.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect_acks)
        for seq in range(count):
            await slots.acquire()
            await stream.write(message(b"A", seq))
    elapsed = time.perf_counter() - start
    return {
        "messages": count,
        "window": window,
        "seconds": elapsed,
        "per_s": count / elapsed,
        "sender_cpu_s": time.process_time() - cpu,
    }


async def timed_connect(
    peer: PeerInfo, timeout: float, one_connection_per_peer: bool
) -> dict[str, Any]:
    """One fresh connection from a new host (new key, nothing cached): milliseconds spent in
    ``connect`` (TCP dial, multistream-select, Noise handshake, Yamux) and in ``new_stream``
    (a Yamux stream and multistream-select of :data:`PROTOCOL`), and their sum; then one
    untimed round trip checks the stream works. Also the protocols the connection used."""
    host = make_host(one_connection_per_peer)
    with trio.fail_after(timeout):
        async with host.run(listen_addrs=[]):
            start = time.perf_counter()
            await host.connect(peer)
            connected = time.perf_counter()
            stream = await host.new_stream(peer.peer_id, [PROTOCOL])
            opened = time.perf_counter()
            await round_trip(stream, StreamReader(stream), 0)
            protocols = connection_protocols(host, peer)
            await stream.close()
            await host.close()
    return {
        "total_ms": (opened - start) * 1000,
        "connect_ms": (connected - start) * 1000,
        "new_stream_ms": (opened - connected) * 1000,
        "protocols": protocols,
    }


async def dial(options: argparse.Namespace) -> None:
    """The ``dial`` role: every phase on one stream, then fresh connections; JSON on stdout."""
    peer = info_from_p2p_addr(multiaddr.Multiaddr(options.addr))
    result: dict[str, Any] = {"role": "dialer", "versions": package_versions()}
    host = make_host()
    async with host.run(listen_addrs=[]):
        with trio.fail_after(options.timeout):
            start = time.perf_counter()
            await host.connect(peer)
            stream = await host.new_stream(peer.peer_id, [PROTOCOL])
            result["first_connect_ms"] = (time.perf_counter() - start) * 1000
        result["connection"] = connection_protocols(host, peer)
        reader = StreamReader(stream)

        with trio.fail_after(options.timeout):
            for seq in range(WARMUP_ROUND_TRIPS):
                await round_trip(stream, reader, seq)
        with trio.fail_after(options.timeout):
            samples = []
            for seq in range(options.rtt):
                began = time.perf_counter()
                await round_trip(stream, reader, seq)
                samples.append((time.perf_counter() - began) * 1000)
            result["rtt_ms"] = samples
        with trio.fail_after(options.timeout):
            result["one_way"] = await one_way(stream, reader, options.messages)
        with trio.fail_after(options.timeout):
            result["acked"] = await acknowledged(stream, reader, options.messages, options.window)
        with trio.fail_after(options.timeout):
            await stream.close()
            await host.close()

    # Fresh connections, the two configurations alternating so both see the same machine.
    connects: dict[str, list[dict[str, Any]]] = {"default": [], "one_conn_per_peer": []}
    for _ in range(options.connects):
        connects["default"].append(await timed_connect(peer, options.timeout, False))
        connects["one_conn_per_peer"].append(await timed_connect(peer, options.timeout, True))
    protocols_seen: list[dict[str, Any]] = []
    for samples in connects.values():
        for sample in samples:
            found = sample.pop("protocols")
            if found not in protocols_seen:
                protocols_seen.append(found)
    result["connects"] = connects
    result["fresh_connection_protocols"] = protocols_seen
    emit(result)


# --- common ----------------------------------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Installed versions of :data:`REPORTED_PACKAGES` (None: not installed)."""
    versions: dict[str, str | None] = {}
    for name in REPORTED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def emit(record: dict[str, Any]) -> None:
    """Write ``record`` as one JSON line on stdout and flush it."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main() -> None:
    """Parse the role and its options and run it under trio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    listen_parser = roles.add_parser("listen")
    listen_parser.add_argument("--lifetime", type=float, default=3600.0)
    dial_parser = roles.add_parser("dial")
    dial_parser.add_argument("addr")
    dial_parser.add_argument("--messages", type=int, required=True)
    dial_parser.add_argument("--rtt", type=int, required=True)
    dial_parser.add_argument("--connects", type=int, required=True)
    dial_parser.add_argument("--window", type=int, required=True)
    dial_parser.add_argument("--timeout", type=float, default=120.0, help="seconds per phase")
    options = parser.parse_args()
    logging.disable(logging.WARNING)  # py-libp2p logs routine events at warning level
    if options.role == "listen":
        trio.run(listen, options.lifetime)
    else:
        trio.run(dial, options)


if __name__ == "__main__":
    main()
