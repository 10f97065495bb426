"""Deterministic simulations of the DHT: hundreds of nodes in memory, lossy, with churn.

The nodes are the real :class:`DhtNode` driver and :class:`DhtProtocol` core; only the sockets
are replaced by :class:`MemoryNetwork`, and time is trio's ``MockClock`` with autojump, so
simulated minutes pass in a moment. Everything random (keys, message ids, loss, latency,
churn, who looks up whom, trio's scheduling order) comes from one seed, so a failing run can be
replayed exactly.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
import pytest
import trio
import trio.testing

from p2pnode import codec, signing
from p2pnode.dht.memnet import MemoryNetwork, seed_trio_scheduler
from p2pnode.dht.node import (
    EXPIRY_SWEEP_INTERVAL,
    REFRESH_INTERVAL,
    DhtNode,
    RecordNotFound,
    RpcFailure,
)
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import PeerRecord, SignedRecord, dht_key
from p2pnode.dht.storage import RecordStorage
from p2pnode.dht.wire import Address, Method
from p2pnode.identity import (
    ENCRYPTION_KEY_LIFETIME_MS,
    EncryptionKey,
    EncryptionKeyCert,
    Identity,
)

#: Wall-clock time (ms since the epoch) at the simulation's virtual time zero.
EPOCH_MS = 1_800_000_000_000
#: Port every simulated node listens on; nodes differ by host (one /24 each).
PORT = 4000
#: Earlier nodes each newcomer bootstraps through.
BOOTSTRAP_PEERS = 3
#: Virtual seconds any one step of a scenario may take before the test fails.
STEP_DEADLINE = 3600.0
#: Real seconds a scenario run in a subprocess may take.
SUBPROCESS_TIMEOUT = 120.0


def seeded_identity(rng: random.Random, now_ms: int) -> Identity:
    """An identity whose keys come from ``rng`` (Ed25519 signatures are deterministic, so the
    records, node IDs and hence the whole run depend only on the seed)."""
    signing_key = nacl.signing.SigningKey(rng.randbytes(32))
    private_key = nacl.public.PrivateKey(rng.randbytes(32))
    cert = EncryptionKeyCert.issue(
        signing_key, bytes(private_key.public_key), now_ms + ENCRYPTION_KEY_LIFETIME_MS
    )
    return Identity(signing_key, (EncryptionKey(private_key, cert),))


def forged_record(victim: PeerRecord, forger: Identity, seq: int) -> bytes:
    """A record claiming ``victim``'s identity with a higher ``seq``, the forger's encryption
    key and an address of the forger's choosing, signed by the forger's key (the only key a
    forger has)."""
    forged = PeerRecord(
        identity_key=victim.identity_key,
        encryption_key=forger.encryption_key.cert.public_key,
        encryption_key_expires=victim.encryption_key_expires,
        encryption_key_signature=victim.encryption_key_signature,
        addresses=(("192.0.2.66", 6666),),
        seq=seq,
        expires=victim.expires,
    )
    signature = signing.sign(forger.signing_key, signing.TAG_RECORD, forged.body)
    return codec.encode([forged.body, signature])


@dataclass
class SimNode:
    identity: Identity
    node: DhtNode
    scope: trio.CancelScope
    published: dict[int, SignedRecord] = field(default_factory=dict)

    @property
    def address(self) -> Address:
        return self.node.address

    @property
    def latest(self) -> SignedRecord:
        return self.published[max(self.published)]


@dataclass
class Outcome:
    """What a scenario observed; the test asserts on it."""

    live: int
    departed: int
    #: Per live node: (identity key looked up, its latest record, what the lookup returned).
    live_lookups: list[tuple[bytes, SignedRecord, SignedRecord | Exception]]
    #: Per departed node: (its last published record, what the lookup returned).
    departed_lookups: list[tuple[SignedRecord, SignedRecord | Exception]]
    #: How many live nodes accepted a forged record in a direct store.
    forgeries_accepted: int
    forgeries_offered: int
    #: Copies of live nodes' records older than their latest, held by live nodes at lookup time.
    stale_copies: int
    #: Replayed seq-1 records that nodes accepted (they lacked a newer copy).
    replays_accepted: int
    network_stats: dict[str, int]
    trace: list[tuple[float, Address, Address, int]] | None
    virtual_seconds: float


async def _serve_in(
    scope: trio.CancelScope, node: DhtNode, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    with scope:
        await node.serve(task_status=task_status)


async def _lookup(node: DhtNode, identity_key: bytes) -> SignedRecord | Exception:
    try:
        return await node.find_record(identity_key)
    except (RecordNotFound, TimeoutError) as exc:
        return exc


async def run_scenario(
    seed: int,
    *,
    nodes: int,
    loss: float,
    churn: float,
    late_joiners: float = 0.2,
    replay_ranks: tuple[int, int] | None = None,
    record_trace: bool = False,
) -> Outcome:
    """The scenario, step by step:

    1. ``1 - late_joiners`` of the nodes join and publish their records (seq 1); then the
       rest join and publish (so some early holders of a key are displaced, keeping an older
       copy once it is republished).
    2. A ``churn`` fraction of all nodes vanishes without a word.
    3. A refresh interval passes (virtual time); the survivors republish, re-signed as seq 2.
    4. An attacker among the survivors offers forged records for the departed nodes to the
       nodes closest to their keys, and (if ``replay_ranks`` is given) replays every live
       node's old seq-1 record to the nodes at those distance ranks from its key.
    5. Every live node's record is looked up by a different live node, and every departed
       node's record by a random live node.
    """
    seed_trio_scheduler(seed)
    rng = random.Random(seed)  # simulation, not crypto
    network = MemoryNetwork(seed, loss=loss)
    if record_trace:
        network.trace = []
    start = trio.current_time()

    def wall_clock_ms() -> int:
        return EPOCH_MS + int(trio.current_time() * 1000)

    def make_node(host: str) -> tuple[Identity, DhtNode]:
        identity = seeded_identity(rng, wall_clock_ms())
        protocol = DhtProtocol(
            dht_key(identity.public_key),
            RecordStorage(clock=wall_clock_ms),
            wall_clock_ms=wall_clock_ms,
            random_bytes=rng.randbytes,
            exempt_loopback=False,
        )
        transport = network.endpoint((host, PORT))
        return identity, DhtNode(protocol, transport, wall_clock_ms=wall_clock_ms, rng=rng)

    async def each(items: list[Any], action: Callable[[Any], Awaitable[None]]) -> None:
        """Run ``action`` on every item concurrently, with a virtual-time deadline."""
        with trio.fail_after(STEP_DEADLINE):
            async with trio.open_nursery() as step:
                for item in items:
                    step.start_soon(action, item)

    async with trio.open_nursery() as nursery:
        await nursery.start(network.run)
        sim: list[SimNode] = []
        for index in range(nodes):
            # 127.0.<index>.1 and so on: every node on its own /24, so the routing table's
            # per-subnet limit (not exempted here) treats them as distinct hosts.
            host = f"127.{index // 250}.{index % 250}.1"
            identity, node = make_node(host)
            scope = trio.CancelScope()
            await nursery.start(_serve_in, scope, node)
            sim.append(SimNode(identity, node, scope))

        async def join(first: int, last: int) -> None:
            """Nodes ``first`` to ``last - 1`` join one by one, each through a few nodes that
            joined before it."""
            with trio.fail_after(STEP_DEADLINE):
                for index in range(max(first, 1), last):
                    peers = rng.sample(sim[:index], min(BOOTSTRAP_PEERS, index))
                    answered = await sim[index].node.bootstrap([peer.address for peer in peers])
                    assert answered >= 1, f"node {index} could not reach any bootstrap peer"

        async def publish(member: SimNode, seq: int) -> None:
            signed = PeerRecord.create(
                member.identity, [(member.address[0], PORT + 1)], seq=seq, now_ms=wall_clock_ms()
            )
            member.published[seq] = signed
            accepted = await member.node.publish(signed)
            assert accepted >= 1, "a publish reached no other node"

        # The first nodes join and publish; then the network grows. The newcomers take over
        # some keys from nodes that held them, and those keep a (valid, older) seq-1 copy.
        founders = nodes - round(late_joiners * nodes)
        await join(0, founders)
        await each(sim[:founders], lambda member: publish(member, 1))
        await join(founders, nodes)
        await each(sim[founders:], lambda member: publish(member, 1))

        # Churn: some nodes vanish without a word (crash, network gone).
        departed = rng.sample(sim, round(churn * nodes))
        for member in departed:
            network.detach(member.address)
            member.scope.cancel()
        gone = {id(member) for member in departed}
        live = [member for member in sim if id(member) not in gone]

        # Virtual time passes: every survivor runs a routing-table refresh (which evicts the
        # departed contacts that fail to answer), then republishes its record re-signed with
        # a new sequence number, as the publisher does.
        await trio.sleep(REFRESH_INTERVAL + 2 * EXPIRY_SWEEP_INTERVAL)
        await each(live, lambda member: publish(member, 2))

        # An attacker among the survivors tries to plant forged, higher-sequence records for
        # the departed nodes on the nodes that should hold them.
        attacker = live[0]
        forgeries_offered = 0
        forgeries_accepted = 0

        async def plant(victim: SimNode) -> None:
            nonlocal forgeries_offered, forgeries_accepted
            key = dht_key(victim.identity.public_key)
            forged = forged_record(victim.latest.record, attacker.identity, seq=99)
            for contact in await attacker.node.find_contacts(key):
                forgeries_offered += 1
                try:
                    accepted = await attacker.node.call(
                        contact.address, Method.STORE, [attacker.node.node_id, key, forged]
                    )
                except RpcFailure:
                    continue
                forgeries_accepted += bool(accepted)

        await each(departed, plant)

        replays_accepted = 0
        if replay_ranks:
            # A replay attack: the attacker stores each live node's older, validly signed
            # seq-1 record on the nodes ranked just outside the k closest to its key, where a
            # lookup that has not yet reached the closest nodes finds values first.
            first, last = replay_ranks

            async def replay(victim: SimNode) -> None:
                nonlocal replays_accepted
                key_id = int.from_bytes(dht_key(victim.identity.public_key), "big")
                by_distance = sorted(
                    live, key=lambda member: int.from_bytes(member.node.node_id, "big") ^ key_id
                )
                for target in by_distance[first:last]:
                    if target is attacker:
                        continue
                    try:
                        accepted = await attacker.node.call(
                            target.address,
                            Method.STORE,
                            [
                                attacker.node.node_id,
                                dht_key(victim.identity.public_key),
                                victim.published[1].data,
                            ],
                        )
                    except RpcFailure:
                        continue
                    replays_accepted += bool(accepted)

            await each([member for member in live if member is not attacker], replay)

        # How many outdated (seq 1) copies of live nodes' records the survivors still hold.
        latest = {dht_key(member.identity.public_key): member.latest.record.seq for member in live}
        stale_copies = 0
        for member in live:
            for key, seq in latest.items():
                held = member.node.protocol.storage.get_record(key)
                stale_copies += held is not None and held.record.seq < seq

        # Every live node's record is looked up by a different live node (a shuffled ring).
        order = live[:]
        rng.shuffle(order)
        live_lookups: list[tuple[bytes, SignedRecord, SignedRecord | Exception]] = []

        async def look_up_live(position: int) -> None:
            target, seeker = order[position], order[(position + 1) % len(order)]
            result = await _lookup(seeker.node, target.identity.public_key)
            live_lookups.append((target.identity.public_key, target.latest, result))

        await each(list(range(len(order))), look_up_live)

        departed_lookups: list[tuple[SignedRecord, SignedRecord | Exception]] = []

        async def look_up_departed(victim: SimNode) -> None:
            seeker = rng.choice(live)
            result = await _lookup(seeker.node, victim.identity.public_key)
            departed_lookups.append((victim.latest, result))

        await each(departed, look_up_departed)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()

    return Outcome(
        live=len(live),
        departed=len(departed),
        live_lookups=live_lookups,
        departed_lookups=departed_lookups,
        forgeries_accepted=forgeries_accepted,
        forgeries_offered=forgeries_offered,
        stale_copies=stale_copies,
        replays_accepted=replays_accepted,
        network_stats=dict(network.stats),
        trace=network.trace,
        virtual_seconds=elapsed,
    )


def simulate(seed: int, **options: Any) -> Outcome:
    """Run a scenario in its own trio run under a mock clock that jumps whenever every task
    is waiting, so timeouts and refresh intervals cost no real time."""

    async def scenario() -> Outcome:
        return await run_scenario(seed, **options)

    return trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


def _describe_failures(outcome: Outcome) -> str:
    lines = []
    for identity_key, expected, result in outcome.live_lookups:
        if isinstance(result, Exception):
            lines.append(f"{identity_key.hex()[:12]}: {type(result).__name__}: {result}")
        elif result.data != expected.data:
            lines.append(f"{identity_key.hex()[:12]}: got seq {result.record.seq}")
    return "\n".join(lines)


def _summary(outcome: Outcome) -> list[tuple[bytes, bytes | str]]:
    return [
        (key, result.data if isinstance(result, SignedRecord) else type(result).__name__)
        for key, _, result in outcome.live_lookups
    ]


@pytest.mark.slow
def test_every_live_record_is_found_despite_loss_and_churn() -> None:
    outcome = simulate(20240601, nodes=200, loss=0.05, churn=0.20, replay_ranks=(20, 30))

    assert outcome.live == 160
    assert outcome.departed == 40
    # The network really was lossy, and outdated copies really were around to be found.
    lost = outcome.network_stats.get("lost", 0)
    assert 0.03 < lost / outcome.network_stats["sent"] < 0.07
    assert outcome.replays_accepted > 0
    assert outcome.stale_copies > outcome.live

    # Every live node's record was looked up, and every lookup returned exactly the record
    # its owner published last (seq 2), never the seq-1 copies held around the network.
    assert len(outcome.live_lookups) == outcome.live
    assert len({key for key, _, _ in outcome.live_lookups}) == outcome.live
    failures = _describe_failures(outcome)
    assert not failures, f"lookups that missed the latest record:\n{failures}"
    for identity_key, expected, result in outcome.live_lookups:
        assert isinstance(result, SignedRecord)
        assert result.record.identity_key == identity_key
        assert result.record.seq == 2
        assert result.record.addresses == expected.record.addresses

    # Nobody took the forgeries; a departed node's lookup gives its own last record or
    # nothing, never the forger's.
    assert outcome.forgeries_offered >= outcome.departed
    assert outcome.forgeries_accepted == 0
    assert len(outcome.departed_lookups) == outcome.departed
    for last, result in outcome.departed_lookups:
        if isinstance(result, Exception):
            assert isinstance(result, RecordNotFound)
        else:
            assert result.data == last.data


def run_digest(outcome: Outcome) -> str:
    """A digest of everything a run observed: every delivered datagram, the network's
    counters and every lookup's result."""
    observed = repr((outcome.trace, sorted(outcome.network_stats.items()), _summary(outcome)))
    return hashlib.sha256(observed.encode()).hexdigest()


def simulate_in_subprocess(seed: int, hash_seed: int, **options: Any) -> str:
    """Run a scenario in a fresh interpreter (with its own string-hash seed and memory
    layout) and return its :func:`run_digest`."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_dht_simulation as sim; "
        f"print(sim.run_digest(sim.simulate({seed!r}, **{options!r})))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout.strip()


def test_same_seed_same_run_different_seed_different_run() -> None:
    options: dict[str, Any] = {"nodes": 40, "loss": 0.05, "churn": 0.20, "record_trace": True}
    first = simulate(7, **options)
    other = simulate(8, **options)

    assert first.trace is not None and other.trace is not None
    assert len(first.trace) > 1000  # the scenario really ran: joins, publishes, lookups
    # The same seed replays the very same run, even in another process.
    assert simulate_in_subprocess(7, 12345, **options) == run_digest(first)
    # Another seed gives another run.
    assert first.trace != other.trace
    # The smaller network meets the same bar.
    assert not _describe_failures(first)
    assert not _describe_failures(other)
