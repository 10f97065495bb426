"""Seeds, known-peer persistence, the record publisher, the DHT service and the bootstrap node."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pnode.clock import wall_clock_ms
from p2pnode.dht.memnet import MemoryNetwork, seed_trio_scheduler
from p2pnode.dht.node import DhtNode, UdpTransport
from p2pnode.dht.peerbook import MAX_SAVED_PEERS, load_peers, save_peers
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import REPUBLISH_AFTER_MS, dht_key
from p2pnode.dht.seeds import (
    SeedError,
    default_seeds,
    format_host_port,
    parse_host_port,
    parse_seed_list,
    read_seed_list,
)
from p2pnode.dht.service import DhtConfig, DhtService, RecordPublisher
from p2pnode.dht.storage import RecordStorage
from p2pnode.dht.wire import Contact
from p2pnode.identity import Identity

EPOCH = 1_800_000_000_000

# --- seed lists ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1:4000", ("192.0.2.1", 4000)),
        (" seed.example.net:1 ", ("seed.example.net", 1)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_host_port_parsing(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected
    assert parse_host_port(format_host_port(expected)) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("192.0.2.1", "expected HOST:PORT"),
        ("192.0.2.1:0", "port must be"),
        ("192.0.2.1:70000", "port must be"),
        ("192.0.2.1:http", "port must be"),
        ("2001:db8::1:4000", r"\[ADDR\]:PORT"),
        ("[not-v6]:4000", "not an IPv6 address"),
        ("[2001:db8::1]4000", r"\[IPV6\]:PORT"),
        (":4000", "expected HOST:PORT"),
    ],
)
def test_bad_host_port_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(SeedError, match=reason):
        parse_host_port(text)


def test_seed_list_comments_blank_lines_and_line_numbers(tmp_path: Path) -> None:
    text = "# seeds\n\n10.0.0.1:4000  # first\n[::1]:4001\n"
    assert parse_seed_list(text) == [("10.0.0.1", 4000), ("::1", 4001)]
    bad = tmp_path / "seeds.txt"
    bad.write_text("10.0.0.1:4000\nnonsense\n")
    with pytest.raises(SeedError, match=r"seeds.txt, line 2"):
        read_seed_list(bad)


def test_default_seed_list_is_the_shipped_one_and_parses() -> None:
    shipped = Path(__file__).resolve().parents[1] / "bootstrap" / "seeds.txt"
    assert default_seeds() == read_seed_list(shipped)


# --- known peers ------------------------------------------------------------------------------


def contact(n: int) -> Contact:
    return Contact(n.to_bytes(20, "big"), f"127.0.0.{n % 200 + 1}", 4000 + n)


def test_known_peers_round_trip_privately(tmp_path: Path) -> None:
    path = tmp_path / "dht-peers.json"
    contacts = [contact(n) for n in range(MAX_SAVED_PEERS + 50)]
    assert save_peers(path, contacts) == MAX_SAVED_PEERS
    assert load_peers(path) == contacts[:MAX_SAVED_PEERS]
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "pickle" not in path.read_text()


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[" * 100_000,
        json.dumps({"v": 2, "peers": []}).encode(),
        json.dumps({"v": 1, "peers": [{"id": "zz", "host": "127.0.0.1", "port": 1}]}).encode(),
        json.dumps(
            {"v": 1, "peers": [{"id": "00" * 20, "host": "evil.example", "port": 1}]}
        ).encode(),
        json.dumps({"v": 1, "peers": [{"id": "00" * 20, "host": "127.0.0.1", "port": 0}]}).encode(),
    ],
)
def test_damaged_known_peers_file_is_ignored_not_trusted(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "dht-peers.json"
    path.write_bytes(content)
    assert load_peers(path) == []
    assert path.read_bytes() == content  # reported, never rewritten behind the user's back


# --- the publisher (simulated network, virtual time) ------------------------------------------


def test_publisher_republishes_on_address_change_and_before_expiry() -> None:
    async def scenario() -> None:
        seed_trio_scheduler(7)
        network = MemoryNetwork(7)
        rng = random.Random(7)

        def wall() -> int:
            return EPOCH + int(trio.current_time() * 1000)

        nodes: list[DhtNode] = []
        identities = [Identity.generate(EPOCH) for _ in range(8)]
        async with trio.open_nursery() as nursery:
            await nursery.start(network.run)
            for i, identity in enumerate(identities):
                protocol = DhtProtocol(
                    dht_key(identity.public_key),
                    RecordStorage(clock=wall),
                    wall_clock_ms=wall,
                    random_bytes=rng.randbytes,
                )
                node = DhtNode(
                    protocol, network.endpoint((f"127.0.{i}.1", 4000)), wall_clock_ms=wall, rng=rng
                )
                await nursery.start(node.serve)
                if nodes:
                    assert await node.bootstrap([nodes[0].address]) == 1
                nodes.append(node)
            publisher = RecordPublisher(nodes[1], identities[1], [("127.0.1.1", 5000)])
            await nursery.start(publisher.run)
            assert publisher.accepted > 0
            first = await nodes[5].find_record(identities[1].public_key)
            assert first.record.addresses == (("127.0.1.1", 5000),)

            publisher.set_addresses([("127.0.1.1", 5001)])
            with trio.fail_after(60):
                while (
                    publisher.published is None
                    or publisher.published.record.seq == first.record.seq
                ):
                    await trio.sleep(1)
            moved = await nodes[6].find_record(identities[1].public_key)
            assert moved.record.addresses == (("127.0.1.1", 5001),)
            assert moved.record.seq > first.record.seq

            # A rotated encryption key is published at once (a running daemon's rotation).
            rotated = identities[1].rotated(wall())
            new_key = bytes(rotated.encryption_key.private_key.public_key)
            publisher.set_identity(rotated)
            with trio.fail_after(60):
                while (
                    publisher.published is None
                    or publisher.published.record.encryption_key != new_key
                ):
                    await trio.sleep(1)
            rekeyed = await nodes[4].find_record(identities[1].public_key)
            assert rekeyed.record.encryption_key == new_key
            assert rekeyed.record.seq > moved.record.seq
            with pytest.raises(ValueError, match="one identity key"):
                publisher.set_identity(identities[2])
            moved = rekeyed

            # Half a lifetime later it has been published again, so it never lapses.
            await trio.sleep(REPUBLISH_AFTER_MS / 1000 + 60)
            later = await nodes[7].find_record(identities[1].public_key)
            assert later.record.seq > moved.record.seq
            assert later.record.expires > wall()
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


# --- the service on real loopback sockets -----------------------------------------------------


async def start_service(nursery: trio.Nursery, service: DhtService) -> trio.CancelScope:
    """Start ``service`` in ``nursery`` under its own cancel scope, returned to stop it."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await service.run(task_status=task_status)

    await nursery.start(run)
    return scope


async def test_restarted_node_rejoins_through_remembered_peers_with_every_seed_down(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            seed = DhtService(DhtConfig())
            stop_seed = await start_service(outer, seed)
            assert seed.node is not None
            seed_address = seed.node.address

            other = DhtService(DhtConfig(seeds=[seed_address]))
            await start_service(outer, other)
            assert other.node is not None and other.joined_through == 1

            peers_file = tmp_path / "dht-peers.json"
            config = DhtConfig(seeds=[seed_address], peers_file=peers_file)
            first = DhtService(config, identity=Identity.generate(wall_clock_ms()))
            stop_first = await start_service(outer, first)
            assert first.joined_through == 1
            assert first.node is not None
            while other.node.node_id not in first.node.protocol.table:
                await trio.sleep(0.01)  # verification of the contact the seed named
            stop_first.cancel()
            while first.node is not None:
                await trio.sleep(0.01)  # until it has shut down and saved its peers
            remembered = {c.address for c in load_peers(peers_file)}
            assert other.node.address in remembered

            stop_seed.cancel()  # every seed is now down
            restarted = DhtService(config, identity=first.identity)
            await start_service(outer, restarted)
            assert restarted.joined_through >= 1
            assert restarted.node is not None
            assert other.node.node_id in restarted.node.protocol.table
            outer.cancel_scope.cancel()


async def test_node_with_no_reachable_seed_runs_as_the_first_node() -> None:
    async with await UdpTransport.bind() as silent:  # bound, never answers
        config = DhtConfig(seeds=[silent.local_address])
        service = DhtService(config)
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                assert service.joined_through == 0
                assert service.node is not None and len(service.node.protocol.table) == 0
                nursery.cancel_scope.cancel()


# --- the bootstrap node as a real process -----------------------------------------------------


@pytest.fixture
def bootstrap_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    home = tmp_path / "bootnode"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pnode",
            "daemon",
            "--dht-only",
            "--dht-host",
            "127.0.0.1",
            "--dht-port",
            "0",
            "--home",
            str(home),
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the readiness line; the process prints it once up
        yield process, line
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def test_dht_only_daemon_serves_as_bootstrap_and_stops_on_sigterm(
    bootstrap_process: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    process, line = bootstrap_process
    assert line.startswith("listening on 127.0.0.1:"), line
    host, port = parse_host_port(line.split()[2])
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            joiner = DhtService(DhtConfig(seeds=[(host, port)]))
            await nursery.start(joiner.run)
            assert joiner.joined_through == 1
            assert joiner.node is not None
            assert bytes.fromhex(line.split()[4]) in joiner.node.protocol.table
            nursery.cancel_scope.cancel()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert (tmp_path / "bootnode" / "dht-peers.json").exists()  # peers saved on the way out


def test_daemon_on_a_missing_home_says_how_to_create_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "p2pnode", "daemon", "--home", str(tmp_path / "h")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "p2pnode init" in result.stderr
    assert "Traceback" not in result.stderr
