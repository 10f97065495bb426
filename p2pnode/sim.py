"""In-process DHT simulation: lookup success, hops and datagrams against network size.

Builds N real :class:`~p2pnode.dht.node.DhtNode` objects on one
:class:`~p2pnode.dht.memnet.MemoryNetwork` (seeded loss and latency) under trio's
``MockClock(autojump_threshold=0)``, so simulated minutes cost no real time, and measures what a
user of the DHT would notice: how often a lookup finds the latest record, in how many hops, at
what cost in datagrams and (virtual) time. Run it as a command::

    python -m p2pnode.sim --sizes 100,300,1000 --loss 0.05 --churn 0.2 \\
        --latency 0.005,0.05 --lookups 200 --seed 1 --out bench/sim

which writes ``report.json``, ``results.md`` and ``sim.png`` into ``--out``; or call
:func:`run_sweep` and :func:`write_outputs` from Python. ``docs/SIMULATION.md`` explains the
scenario and every metric.

The scenario, per network size N (:func:`simulate`):

1. N nodes start and join one by one, each at ``127.X.Y.1`` (every node on its own /24, with
   the routing table's per-subnet rule applied to loopback), each through up to
   :data:`BOOTSTRAP_PEERS` random earlier nodes.
2. Every node publishes its signed peer record (seq 1).
3. Churn: a fraction of the nodes vanishes without a word (detached from the network, their
   tasks cancelled).
4. Virtual time passes (:data:`SETTLE_SECONDS`: every survivor runs a routing-table refresh,
   evicting departed contacts), then every survivor republishes its record as seq 2.
5. Measurement: routing-table refreshes are held back (:class:`RefreshGate`) and the network
   is let fall quiet; then, one lookup at a time, a random live node looks up a random other
   live node's record with :meth:`~p2pnode.dht.node.DhtNode.find_record`. The network falls
   quiet again after each lookup, so the network-wide datagram counters show exactly what one
   lookup cost.

Determinism: everything random (identities, message ids, loss, latency, churn, who looks up
whom, trio's scheduling order) derives from one seed, so the same arguments give a byte-identical
``report.json``. Wall-clock durations are therefore kept out of the report (they are printed).

The PNG plot is drawn by a small stdlib-only renderer (:class:`Canvas`, zlib and struct), so the
package gains no plotting dependency.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nacl.public
import nacl.signing
import trio
import trio.testing

from p2pnode.dht.memnet import MemoryNetwork, seed_trio_scheduler
from p2pnode.dht.node import (
    EXPIRY_SWEEP_INTERVAL,
    REFRESH_INTERVAL,
    DhtNode,
    LookupTimeout,
    RecordNotFound,
)
from p2pnode.dht.protocol import DhtProtocol
from p2pnode.dht.records import PeerRecord, SignedRecord, dht_key
from p2pnode.dht.storage import RecordStorage
from p2pnode.dht.wire import Address, Contact, Method
from p2pnode.identity import (
    ENCRYPTION_KEY_LIFETIME_MS,
    EncryptionKey,
    EncryptionKeyCert,
    Identity,
)

# --- scenario constants ------------------------------------------------------------------------

#: Wall-clock time (ms since the epoch) at virtual time zero: records are signed and checked
#: against ``EPOCH_MS + virtual seconds * 1000``, so their validity does not depend on today.
EPOCH_MS: Final = 1_800_000_000_000
#: UDP port of every simulated node; nodes differ by host.
PORT: Final = 4000
#: Hosts per value of the address's third octet: ``127.<i // 250>.<i % 250>.1`` keeps every node
#: on its own /24 (so the routing table's per-subnet limit applies but never merges two nodes)
#: for up to 250 * 256 nodes.
HOSTS_PER_OCTET: Final = 250
#: Most nodes one simulation accepts (limited by the address plan above).
MAX_NODES: Final = HOSTS_PER_OCTET * 256
#: Fewest nodes: a lookup needs a seeker and another live node, after churn.
MIN_NODES: Final = 4
#: Earlier nodes a newcomer bootstraps through (as ``bench/dht_bench.py`` does).
BOOTSTRAP_PEERS: Final = 3
#: Attempts a newcomer makes to join, each through freshly chosen peers, before it is counted
#: as a failed join (with 5 % loss and every request sent up to three times, a second attempt
#: is rare).
JOIN_ATTEMPTS: Final = 3
#: Publishes in flight at once. Real nodes publish at independent times; letting every node
#: publish in the same virtual instant would overflow inboxes, which no deployment sees.
PUBLISH_CONCURRENCY: Final = 32
#: Virtual seconds between churn and the republish: one refresh interval plus two expiry
#: sweeps, so every survivor's maintenance loop runs a routing-table refresh in between.
SETTLE_SECONDS: Final = REFRESH_INTERVAL + 2 * EXPIRY_SWEEP_INTERVAL
#: Sequence numbers of the first publish and of the republish after churn.
FIRST_SEQ: Final = 1
REPUBLISH_SEQ: Final = 2
#: Virtual seconds between checks that the network has fallen quiet.
QUIET_POLL_INTERVAL: Final = 0.05
#: Virtual seconds to wait for quiet before measuring anyway (counted in the report as a noisy
#: lookup). A lookup's own traffic ends within seconds (the RPC timeout is 2 s); the longest
#: wait is for refreshes under way when the measurement starts, each a series of node lookups
#: that may each wait out timeouts of departed contacts: about a minute at N = 1000.
QUIET_TIMEOUT: Final = 600.0
#: Virtual seconds any setup phase may take before the simulation is abandoned as broken.
PHASE_DEADLINE: Final = 6 * 3600.0

# --- command-line defaults -----------------------------------------------------------------------

DEFAULT_SIZES: Final = (100, 300, 1000)
DEFAULT_LOSS: Final = 0.05
DEFAULT_CHURN: Final = 0.2
DEFAULT_LATENCY: Final = (0.005, 0.05)
DEFAULT_LOOKUPS: Final = 200
DEFAULT_SEED: Final = 1
DEFAULT_OUT: Final = "bench/sim"

#: Output file names inside the output directory.
REPORT_NAME: Final = "report.json"
TABLE_NAME: Final = "results.md"
PLOT_NAME: Final = "sim.png"

#: Version of the report's JSON layout.
REPORT_VERSION: Final = 1
#: Digits kept for floats in the report (plenty for milliseconds and rates; keeps it readable).
FLOAT_DIGITS: Final = 4
#: Percentile shown as the "tail" of each distribution (nearest rank).
TAIL_PERCENTILE: Final = 95

#: Lookup outcomes (the ``outcome`` of a :class:`LookupSample`).
OK: Final = "ok"
STALE: Final = "stale"
WRONG_IDENTITY: Final = "wrong-identity"
NOT_FOUND: Final = "not-found"
TIMEOUT: Final = "timeout"


@dataclass(frozen=True)
class SimConfig:
    """One simulation's parameters.

    Args:
        nodes: network size N.
        loss: probability that a datagram is lost.
        churn: fraction of the nodes that leaves after the first publish.
        latency: (min, max) one-way delay in seconds, uniform per datagram.
        lookups: lookups measured.
        seed: seeds everything random.
        settle_seconds: virtual seconds between churn and the republish (default
            :data:`SETTLE_SECONDS`, long enough for every survivor to refresh its routing
            table; shorter values skip the refresh, for quick runs).

    Raises:
        ValueError: for parameters out of range (on construction).
    """

    nodes: int
    loss: float = DEFAULT_LOSS
    churn: float = DEFAULT_CHURN
    latency: tuple[float, float] = DEFAULT_LATENCY
    lookups: int = DEFAULT_LOOKUPS
    seed: int = DEFAULT_SEED
    settle_seconds: float = SETTLE_SECONDS

    def __post_init__(self) -> None:
        if not MIN_NODES <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in {MIN_NODES}..{MAX_NODES}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if not 0.0 <= self.churn < 1.0:
            raise ValueError("churn must be in [0, 1)")
        if self.nodes - self.departures < 2:
            raise ValueError("churn leaves fewer than 2 live nodes")
        low, high = self.latency
        if not 0.0 <= low <= high:
            raise ValueError("latency must be (min, max) with 0 <= min <= max")
        if self.lookups < 1:
            raise ValueError("lookups must be at least 1")
        if self.settle_seconds < 0:
            raise ValueError("settle_seconds must not be negative")

    @property
    def departures(self) -> int:
        """How many nodes churn removes."""
        return round(self.churn * self.nodes)


@dataclass(frozen=True)
class LookupSample:
    """What one measured lookup did.

    ``hops`` is the number of rounds of the iterative lookup: contacts from the seeker's own
    routing table are round 1, and a contact first named by the reply of a round-r contact is
    round r + 1; ``hops`` is the highest round among the contacts asked (the longest chain
    "A answered, naming B, who was then asked"). ``value_hops`` is the round of the first
    contact that answered with a record (None if none did). ``datagrams`` counts every datagram
    sent network-wide from the lookup's start until it returned (requests, retransmissions,
    replies and the verification pings they trigger, lost ones included);
    ``datagrams_with_aftermath`` also counts what followed until the network fell quiet (the
    repair store of the record to close nodes that lacked it, and its replies).
    """

    seeker: int
    target: int
    outcome: str
    hops: int
    value_hops: int | None
    contacts_asked: int
    datagrams: int
    datagrams_with_aftermath: int
    latency_ms: float

    @property
    def success(self) -> bool:
        """True if the lookup returned the target's latest record."""
        return self.outcome == OK


@dataclass
class SizeResult:
    """Everything measured for one network size (see :func:`size_summary` for the report)."""

    config: SimConfig
    live: int
    join_failures: int
    unreached_publishes: int
    samples: list[LookupSample]
    #: Per setup phase and the measurement: virtual seconds and datagrams sent.
    phases: dict[str, dict[str, float]]
    network: dict[str, int]
    #: Lookups measured although the network had not fallen quiet before (should be 0).
    noisy_lookups: int
    #: Routing-table size of each live node when the measurement starts.
    table_sizes: list[int]
    #: How many of those contacts were departed nodes.
    departed_contacts: int
    #: Real seconds each phase took (machine-dependent, so kept out of the report).
    wall_seconds: dict[str, float] = field(default_factory=dict)


# --- identities --------------------------------------------------------------------------------


def seeded_identity(rng: random.Random, now_ms: int) -> Identity:
    """An identity whose keys come from ``rng``.

    Ed25519 signatures are deterministic, so with seeded keys the records, node IDs and hence
    the whole simulation depend only on the seed. Never use this outside simulations.
    """
    signing_key = nacl.signing.SigningKey(rng.randbytes(32))
    private_key = nacl.public.PrivateKey(rng.randbytes(32))
    cert = EncryptionKeyCert.issue(
        signing_key, bytes(private_key.public_key), now_ms + ENCRYPTION_KEY_LIFETIME_MS
    )
    return Identity(signing_key, (EncryptionKey(private_key, cert),))


def host_for(index: int) -> str:
    """The address of simulated node ``index``: ``127.X.Y.1``, one /24 per node."""
    return f"127.{index // HOSTS_PER_OCTET}.{index % HOSTS_PER_OCTET}.1"


# --- lookup tracing ----------------------------------------------------------------------------


class LookupTrace:
    """The causal structure of one value lookup, rebuilt from the requests its node sends.

    :class:`~p2pnode.dht.lookup.Lookup` adds a contact the first time a reply names it and
    ignores later mentions; replies reach it in the order the requests complete. The trace
    sees the same replies in the same order (see :meth:`TracedDhtNode.call`), so it knows, for
    every contact asked, which reply first named it, and hence its round.

    Args:
        target: the DHT key looked up.
        seeds: the contacts the lookup starts from (the seeker's k closest to ``target``).
        own_id: the seeker's ID (never asked).
    """

    def __init__(self, target: bytes, seeds: Iterable[Contact], own_id: bytes) -> None:
        self.target = target
        self._own_id = own_id
        #: Round at which each known contact can be asked: 1 for seeds, else namer's round + 1.
        self._available_at: dict[bytes, int] = {c.node_id: 1 for c in seeds}
        #: Round of every contact asked, in the order asked.
        self.rounds: dict[bytes, int] = {}
        #: Round of the first contact that answered with a value.
        self.value_round: int | None = None

    def asked(self, node_id: bytes) -> None:
        """The lookup sends its request to ``node_id``."""
        if node_id not in self.rounds:
            self.rounds[node_id] = self._available_at.get(node_id, 1)

    def answered(self, node_id: bytes, reply: Any) -> None:
        """``node_id`` answered: with a value (bytes) or with contacts."""
        answer_round = self.rounds.get(node_id)
        if answer_round is None:
            return
        if isinstance(reply, bytes):
            if self.value_round is None:
                self.value_round = answer_round
            return
        for contact in reply:
            if contact.node_id != self._own_id and contact.node_id not in self._available_at:
                self._available_at[contact.node_id] = answer_round + 1

    @property
    def hops(self) -> int:
        """The highest round among the contacts asked (0 if none was asked)."""
        return max(self.rounds.values(), default=0)


class RefreshGate:
    """Holds routing-table refreshes back while lookups are measured.

    A refresh is a burst of lookups; one running during a measured lookup would be counted as
    that lookup's datagrams. While the gate is closed, a refresh that comes due waits (the
    maintenance loop simply runs it later); :attr:`running` tells whether one is under way.
    """

    def __init__(self) -> None:
        self.running = 0
        self._open = trio.Event()
        self._open.set()

    def close(self) -> None:
        """Hold back refreshes from now on."""
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        """Let held-back refreshes run."""
        self._open.set()

    async def enter(self) -> None:
        """Wait until the gate is open."""
        while not self._open.is_set():
            await self._open.wait()


class TracedDhtNode(DhtNode):
    """A :class:`DhtNode` that reports a measured lookup's requests to a :class:`LookupTrace`
    and runs its refreshes through a :class:`RefreshGate`. Otherwise unchanged."""

    def __init__(self, *args: Any, gate: RefreshGate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate
        #: Set while a measured lookup runs on this node.
        self.trace: LookupTrace | None = None

    async def call(
        self, address: Address, method: Method, args: list[Any], *, node_id: bytes | None = None
    ) -> Any:
        """:meth:`DhtNode.call`, reporting the traced lookup's ``find_value`` requests and
        replies (the lookup handles a reply right after this returns, with no checkpoint in
        between, so the trace sees replies in the lookup's order)."""
        trace = self.trace
        traced = (
            trace is not None
            and node_id is not None
            and method is Method.FIND_VALUE
            and len(args) == 2
            and args[1] == trace.target
        )
        if not traced:
            return await super().call(address, method, args, node_id=node_id)
        assert trace is not None and node_id is not None  # checked just above
        trace.asked(node_id)
        reply = await super().call(address, method, args, node_id=node_id)
        trace.answered(node_id, reply)
        return reply

    async def refresh(self) -> None:
        """:meth:`DhtNode.refresh`, once the gate is open."""
        await self.gate.enter()
        self.gate.running += 1
        try:
            await super().refresh()
        finally:
            self.gate.running -= 1


# --- the scenario ------------------------------------------------------------------------------


@dataclass
class _Member:
    index: int
    identity: Identity
    node: TracedDhtNode
    scope: trio.CancelScope
    published: dict[int, SignedRecord] = field(default_factory=dict)

    @property
    def latest(self) -> SignedRecord:
        return self.published[max(self.published)]


async def _serve_in(
    scope: trio.CancelScope, node: DhtNode, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    with scope:
        await node.serve(task_status=task_status)


def _stream(seed: int, purpose: str) -> random.Random:
    """An independent random stream for one purpose (string seeds are hashed with SHA-512,
    the same in every process), so for example the churn does not depend on how many message
    ids were drawn before it."""
    return random.Random(f"p2pnode.sim/{seed}/{purpose}")  # noqa: S311 (simulation, not crypto)


def _in_flight(network: MemoryNetwork) -> int:
    stats = network.stats
    settled = stats["lost"] + stats["delivered"] + stats["unreachable"] + stats["inbox-full"]
    return stats["sent"] - settled


class _Simulation:
    """One run of the scenario; :func:`simulate` is its public face."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.network = MemoryNetwork(config.seed, loss=config.loss, latency=config.latency)
        self.identity_rng = _stream(config.seed, "identities")
        self.protocol_rng = _stream(config.seed, "protocol")
        self.workload_rng = _stream(config.seed, "workload")
        self.gate = RefreshGate()
        self.members: list[_Member] = []
        self.live: list[_Member] = []
        self.join_failures = 0
        self.unreached_publishes = 0
        self.samples: list[LookupSample] = []
        self.noisy_lookups = 0
        self.table_sizes: list[int] = []
        self.departed_contacts = 0
        self.phases: dict[str, dict[str, float]] = {}
        self.wall_seconds: dict[str, float] = {}

    @staticmethod
    def wall_clock_ms() -> int:
        """The simulated wall clock: :data:`EPOCH_MS` plus virtual time."""
        return EPOCH_MS + int(trio.current_time() * 1000)

    def make_member(self, index: int) -> _Member:
        identity = seeded_identity(self.identity_rng, self.wall_clock_ms())
        protocol = DhtProtocol(
            dht_key(identity.public_key),
            RecordStorage(clock=self.wall_clock_ms),
            wall_clock_ms=self.wall_clock_ms,
            random_bytes=self.protocol_rng.randbytes,
            exempt_loopback=False,
        )
        transport = self.network.endpoint((host_for(index), PORT))
        node = TracedDhtNode(
            protocol,
            transport,
            wall_clock_ms=self.wall_clock_ms,
            rng=self.protocol_rng,
            gate=self.gate,
        )
        return _Member(index, identity, node, trio.CancelScope())

    async def run(self) -> SizeResult:
        """Run every phase in order, then stop every node."""
        config = self.config
        async with trio.open_nursery() as nursery:
            await nursery.start(self.network.run)
            self.members = [self.make_member(index) for index in range(config.nodes)]
            await self.phase("join", lambda: self.join(nursery))
            await self.phase("publish", lambda: self.publish_all(self.members, FIRST_SEQ))
            self.churn()
            await self.phase("settle", lambda: trio.sleep(config.settle_seconds))
            await self.phase("republish", lambda: self.publish_all(self.live, REPUBLISH_SEQ))
            await self.phase("drain", self.drain)
            await self.phase("lookups", self.measure)
            network_stats = {name: self.network.stats[name] for name in sorted(self.network.stats)}
            nursery.cancel_scope.cancel()
        return SizeResult(
            config=config,
            live=len(self.live),
            join_failures=self.join_failures,
            unreached_publishes=self.unreached_publishes,
            samples=self.samples,
            phases=self.phases,
            network=network_stats,
            noisy_lookups=self.noisy_lookups,
            table_sizes=self.table_sizes,
            departed_contacts=self.departed_contacts,
            wall_seconds=self.wall_seconds,
        )

    async def phase(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run one phase, recording its virtual and real duration and its datagrams."""
        started, sent = trio.current_time(), self.network.stats["sent"]
        wall_started = time.perf_counter()
        with trio.fail_after(PHASE_DEADLINE):
            await body()
        self.wall_seconds[name] = time.perf_counter() - wall_started
        self.phases[name] = {
            "virtual_seconds": round(trio.current_time() - started, FLOAT_DIGITS),
            "datagrams": self.network.stats["sent"] - sent,
        }

    async def join(self, nursery: trio.Nursery) -> None:
        """Start the nodes one by one, each joining through a few earlier ones just after it
        starts (so the nodes' maintenance timers, hence their refreshes, are spread out as in
        a real network)."""
        members = self.members
        await nursery.start(_serve_in, members[0].scope, members[0].node)
        for index in range(1, len(members)):
            await nursery.start(_serve_in, members[index].scope, members[index].node)
            for _ in range(JOIN_ATTEMPTS):
                peers = self.workload_rng.sample(members[:index], min(BOOTSTRAP_PEERS, index))
                if await members[index].node.bootstrap([p.node.address for p in peers]):
                    break
            else:
                self.join_failures += 1

    async def publish_all(self, group: Sequence[_Member], seq: int) -> None:
        """Every member of ``group`` publishes its record with ``seq``, a few at a time."""
        limiter = trio.CapacityLimiter(PUBLISH_CONCURRENCY)

        async def publish(member: _Member) -> None:
            async with limiter:
                signed = PeerRecord.create(
                    member.identity, [(host_for(member.index), PORT + 1)], seq, self.wall_clock_ms()
                )
                member.published[seq] = signed
                if await member.node.publish(signed) == 0:
                    self.unreached_publishes += 1

        async with trio.open_nursery() as publishing:
            for member in group:
                publishing.start_soon(publish, member)

    def churn(self) -> None:
        """A fraction of the nodes vanishes without a word: detached, tasks cancelled."""
        departed = self.workload_rng.sample(self.members, self.config.departures)
        for member in departed:
            self.network.detach(member.node.address)
            member.scope.cancel()
        gone = {member.index for member in departed}
        self.live = [member for member in self.members if member.index not in gone]

    def quiet(self) -> bool:
        """True when no datagram is in flight, no live node awaits a reply and no refresh
        runs: nothing that happens next is left over from before."""
        return (
            _in_flight(self.network) == 0
            and self.gate.running == 0
            and all(member.node.protocol.pending_count == 0 for member in self.live)
        )

    async def wait_quiet(self) -> bool:
        """Wait until :meth:`quiet`; False if :data:`QUIET_TIMEOUT` passed first."""
        with trio.move_on_after(QUIET_TIMEOUT):
            while not self.quiet():
                await trio.sleep(QUIET_POLL_INTERVAL)
            return True
        return False

    async def drain(self) -> None:
        """Hold refreshes back from now on, let what runs finish (refreshes under way, the
        republish's repair and verification traffic), then take stock of the routing tables."""
        self.gate.close()
        await self.wait_quiet()  # if this times out, the first lookup counts as noisy
        departed = {member.node.address for member in self.members} - {
            member.node.address for member in self.live
        }
        for member in self.live:
            table = member.node.protocol.table
            self.table_sizes.append(len(table))
            self.departed_contacts += sum(contact.address in departed for contact in table)

    async def measure(self) -> None:
        """The measured lookups, one at a time, each starting on a quiet network."""
        for _ in range(self.config.lookups):
            if not await self.wait_quiet():
                self.noisy_lookups += 1
            seeker, target = self.workload_rng.sample(self.live, 2)
            self.samples.append(await self.measure_lookup(seeker, target))
        self.gate.open()

    async def measure_lookup(self, seeker: _Member, target: _Member) -> LookupSample:
        """Run and measure one lookup of ``target``'s record by ``seeker``."""
        node = seeker.node
        key = dht_key(target.identity.public_key)
        # The same seeds run_lookup starts from: no checkpoint comes between here and there,
        # so the table cannot change.
        trace = LookupTrace(key, node.protocol.table.find_neighbors(key), node.node_id)
        node.trace = trace
        sent_before = self.network.stats["sent"]
        started = trio.current_time()
        found: SignedRecord | None = None
        try:
            found = await node.find_record(target.identity.public_key)
            outcome = OK
        except RecordNotFound:
            outcome = NOT_FOUND
        except LookupTimeout:
            outcome = TIMEOUT
        finally:
            node.trace = None
        latency = trio.current_time() - started
        datagrams = self.network.stats["sent"] - sent_before
        await self.wait_quiet()
        if found is not None:
            expected = target.latest.record
            if found.record.identity_key != expected.identity_key:
                outcome = WRONG_IDENTITY
            elif found.record.seq != expected.seq:
                outcome = STALE
        return LookupSample(
            seeker=seeker.index,
            target=target.index,
            outcome=outcome,
            hops=trace.hops,
            value_hops=trace.value_round,
            contacts_asked=len(trace.rounds),
            datagrams=datagrams,
            datagrams_with_aftermath=self.network.stats["sent"] - sent_before,
            latency_ms=round(latency * 1000, FLOAT_DIGITS),
        )


async def simulate(config: SimConfig) -> SizeResult:
    """Run the scenario of the module docstring for ``config`` in the current trio run.

    Call it under ``MockClock(autojump_threshold=0)`` (see :func:`run_size`); with a real
    clock it would take hours. Seeds trio's scheduler (for the rest of the process).

    Resource handling: every node and the network run in a nursery that is cancelled before
    this returns; nothing outlives the call.

    Raises:
        trio.TooSlowError: if a phase exceeds :data:`PHASE_DEADLINE` virtual seconds.
    """
    seed_trio_scheduler(config.seed)
    return await _Simulation(config).run()


def run_size(config: SimConfig) -> SizeResult:
    """Run :func:`simulate` in its own ``trio.run`` under a mock clock that jumps whenever
    every task waits, so timeouts and refresh intervals cost no real time."""
    return trio.run(simulate, config, clock=trio.testing.MockClock(autojump_threshold=0))


# --- the report --------------------------------------------------------------------------------


def _percentile(values: Sequence[float], percent: int) -> float:
    """Nearest-rank percentile of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def _distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, tail percentile, min and max (all 0 for no values)."""
    if not values:
        return {"mean": 0.0, "median": 0.0, f"p{TAIL_PERCENTILE}": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": round(statistics.fmean(values), FLOAT_DIGITS),
        "median": round(float(statistics.median(values)), FLOAT_DIGITS),
        f"p{TAIL_PERCENTILE}": round(float(_percentile(values, TAIL_PERCENTILE)), FLOAT_DIGITS),
        "min": round(float(min(values)), FLOAT_DIGITS),
        "max": round(float(max(values)), FLOAT_DIGITS),
    }


def size_summary(result: SizeResult) -> dict[str, Any]:
    """The report entry of one network size: parameters, summaries and every sample."""
    samples = result.samples
    successes = sum(sample.success for sample in samples)
    outcomes = Counter(sample.outcome for sample in samples)
    value_hops = [float(s.value_hops) for s in samples if s.value_hops is not None]
    return {
        "nodes": result.config.nodes,
        "live": result.live,
        "departed": result.config.departures,
        "join_failures": result.join_failures,
        "unreached_publishes": result.unreached_publishes,
        "lookups": len(samples),
        "successes": successes,
        "success_rate": round(successes / len(samples), FLOAT_DIGITS) if samples else 0.0,
        "outcomes": {name: outcomes[name] for name in sorted(outcomes)},
        "hops": _distribution([float(s.hops) for s in samples]),
        "value_hops": _distribution(value_hops),
        "contacts_asked": _distribution([float(s.contacts_asked) for s in samples]),
        "datagrams": _distribution([float(s.datagrams) for s in samples]),
        "datagrams_with_aftermath": _distribution(
            [float(s.datagrams_with_aftermath) for s in samples]
        ),
        "latency_ms": _distribution([s.latency_ms for s in samples]),
        "noisy_lookups": result.noisy_lookups,
        "routing_table": {
            "contacts": _distribution([float(size) for size in result.table_sizes]),
            "departed_share": round(
                result.departed_contacts / max(1, sum(result.table_sizes)), FLOAT_DIGITS
            ),
        },
        "phases": result.phases,
        "network": result.network,
        "samples": [
            {
                "seeker": s.seeker,
                "target": s.target,
                "outcome": s.outcome,
                "hops": s.hops,
                "value_hops": s.value_hops,
                "contacts_asked": s.contacts_asked,
                "datagrams": s.datagrams,
                "datagrams_with_aftermath": s.datagrams_with_aftermath,
                "latency_ms": s.latency_ms,
            }
            for s in samples
        ],
    }


def run_sweep(
    sizes: Sequence[int],
    *,
    loss: float = DEFAULT_LOSS,
    churn: float = DEFAULT_CHURN,
    latency: tuple[float, float] = DEFAULT_LATENCY,
    lookups: int = DEFAULT_LOOKUPS,
    seed: int = DEFAULT_SEED,
    settle_seconds: float = SETTLE_SECONDS,
    progress: Callable[[SizeResult, float], None] | None = None,
) -> dict[str, Any]:
    """Simulate each network size in turn (each in its own trio run, with the same seed) and
    return the report, a JSON-ready dict that depends only on the arguments.

    Args:
        progress: called after each size with its result and the wall seconds it took.

    Raises:
        ValueError: for parameters out of range (see :class:`SimConfig`), or no sizes.
    """
    if not sizes:
        raise ValueError("no network sizes given")
    configs = [
        SimConfig(
            n,
            loss=loss,
            churn=churn,
            latency=latency,
            lookups=lookups,
            seed=seed,
            settle_seconds=settle_seconds,
        )
        for n in sizes
    ]
    results = []
    for config in configs:
        started = time.perf_counter()
        result = run_size(config)
        if progress is not None:
            progress(result, time.perf_counter() - started)
        results.append(size_summary(result))
    return {
        "version": REPORT_VERSION,
        "parameters": {
            "sizes": list(sizes),
            "loss": loss,
            "churn": churn,
            "latency_s": list(latency),
            "lookups": lookups,
            "seed": seed,
            "settle_s": settle_seconds,
        },
        "results": results,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The report as Markdown: a summary table with one row per size, then one table of
    distributions per size."""
    params = report["parameters"]
    low, high = params["latency_s"]
    tail = f"p{TAIL_PERCENTILE}"
    lines = [
        "# DHT simulation results",
        "",
        f"Loss {params['loss']:.0%}, churn {params['churn']:.0%}, one-way latency "
        f"{low * 1000:g}-{high * 1000:g} ms, {params['lookups']} lookups per size, "
        f"{params['settle_s']:g} s between churn and republish, seed {params['seed']}. "
        "Generated by `python -m p2pnode.sim`; metrics are defined in `docs/SIMULATION.md`.",
        "",
        "| N | live | success | mean hops | mean contacts asked | mean datagrams | "
        f"{tail} datagrams | median latency ms | {tail} latency ms | table size |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in report["results"]:
        lines.append(
            f"| {entry['nodes']} | {entry['live']} | {entry['success_rate']:.1%} "
            f"({entry['successes']}/{entry['lookups']}) | {entry['hops']['mean']:.2f} | "
            f"{entry['contacts_asked']['mean']:.1f} | {entry['datagrams']['mean']:.1f} | "
            f"{entry['datagrams'][tail]:g} | {entry['latency_ms']['median']:.1f} | "
            f"{entry['latency_ms'][tail]:.1f} | {entry['routing_table']['contacts']['mean']:.0f} |"
        )
    metrics = (
        ("hops", "hops (rounds)"),
        ("value_hops", "rounds to first record"),
        ("contacts_asked", "contacts asked"),
        ("datagrams", "datagrams (lookup)"),
        ("datagrams_with_aftermath", "datagrams (with repair)"),
        ("latency_ms", "latency ms (virtual)"),
    )
    for entry in report["results"]:
        outcomes = ", ".join(f"{name} {count}" for name, count in entry["outcomes"].items())
        lines += [
            "",
            f"## N = {entry['nodes']}",
            "",
            f"{entry['live']} live, {entry['departed']} departed; join failures "
            f"{entry['join_failures']}; publishes that reached no node "
            f"{entry['unreached_publishes']}; outcomes: {outcomes}. Routing tables at the "
            f"start of the lookups: {entry['routing_table']['contacts']['mean']:.0f} contacts "
            f"on average ({entry['routing_table']['departed_share']:.1%} of them departed).",
            "",
            f"| metric | mean | median | {tail} | min | max |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, label in metrics:
            dist = entry[key]
            lines.append(
                f"| {label} | {dist['mean']:.2f} | {dist['median']:g} | {dist[tail]:g} | "
                f"{dist['min']:g} | {dist['max']:g} |"
            )
    return "\n".join(lines) + "\n"


# --- a minimal PNG renderer ----------------------------------------------------------------------

RGB = tuple[int, int, int]

WHITE: Final[RGB] = (255, 255, 255)
INK: Final[RGB] = (40, 40, 40)
SUBTLE_INK: Final[RGB] = (90, 90, 90)
GRID: Final[RGB] = (225, 225, 225)
SERIES: Final[tuple[RGB, ...]] = ((31, 119, 180), (214, 39, 40), (44, 160, 44))

#: 5x7 bitmap glyphs: seven rows, top first, each five bits with the leftmost pixel highest.
#: Drawn for this module; lowercase letters are drawn as capitals.
GLYPHS: Final[dict[str, tuple[int, ...]]] = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E),
    "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F),
    "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02),
    "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E),
    "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E),
    "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E),
    "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F),
    "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F),
    "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11),
    "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11),
    "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D),
    "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E),
    "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E),
    "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A),
    "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04),
    "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C),
    ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "-": (0, 0, 0, 0x1F, 0, 0, 0),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02),
    ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
}
GLYPH_WIDTH: Final = 5
GLYPH_HEIGHT: Final = 7
#: Pixels between glyphs, in font pixels.
GLYPH_SPACING: Final = 1
#: Glyph shown for characters the font lacks.
MISSING_GLYPH: Final = (0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F)

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
#: IHDR bit depth and colour type: 8-bit truecolour (RGB).
PNG_BIT_DEPTH: Final = 8
PNG_COLOUR_RGB: Final = 2
#: zlib level for the image data (the image is mostly flat colour; 9 costs nothing here).
PNG_COMPRESSION: Final = 9


class Canvas:
    """An RGB pixel buffer with just enough drawing to make a line chart, and a PNG encoder.

    Coordinates are pixels from the top-left corner; drawing outside the canvas is clipped.
    """

    def __init__(self, width: int, height: int, background: RGB = WHITE) -> None:
        if width < 1 or height < 1:
            raise ValueError("a canvas needs at least one pixel")
        self.width = width
        self.height = height
        self._pixels = bytearray(bytes(background) * (width * height))

    def pixel(self, x: int, y: int) -> RGB:
        """The colour at ``(x, y)``."""
        offset = 3 * (y * self.width + x)
        red, green, blue = self._pixels[offset : offset + 3]
        return (red, green, blue)

    def set(self, x: int, y: int, colour: RGB) -> None:
        """Colour one pixel (ignored outside the canvas)."""
        if 0 <= x < self.width and 0 <= y < self.height:
            offset = 3 * (y * self.width + x)
            self._pixels[offset : offset + 3] = bytes(colour)

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        """Fill the rectangle with corners ``(x0, y0)`` and ``(x1, y1)``, inclusive."""
        for y in range(max(0, min(y0, y1)), min(self.height, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.width, max(x0, x1) + 1)):
                self.set(x, y, colour)

    def line(
        self, x0: int, y0: int, x1: int, y1: int, colour: RGB, *, width: int = 1, dash: int = 0
    ) -> None:
        """Draw a straight line (Bresenham), ``width`` pixels thick; with ``dash`` > 0, draw
        only alternate runs of ``dash`` pixels."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        step_x, step_y = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        error = dx + dy
        x, y, count = x0, y0, 0
        low, high = -((width - 1) // 2), width // 2
        while True:
            if not dash or (count // dash) % 2 == 0:
                self.rect(x + low, y + low, x + high, y + high, colour)
            if x == x1 and y == y1:
                return
            count += 1
            doubled = 2 * error
            if doubled >= dy:
                error += dy
                x += step_x
            if doubled <= dx:
                error += dx
                y += step_y

    def disc(self, cx: int, cy: int, radius: int, colour: RGB) -> None:
        """Fill a circle."""
        for y in range(-radius, radius + 1):
            for x in range(-radius, radius + 1):
                if x * x + y * y <= radius * radius:
                    self.set(cx + x, cy + y, colour)

    @staticmethod
    def text_width(text: str, scale: int = 1) -> int:
        """Width in pixels of ``text`` drawn at ``scale``."""
        if not text:
            return 0
        return scale * (len(text) * (GLYPH_WIDTH + GLYPH_SPACING) - GLYPH_SPACING)

    def text(self, x: int, y: int, text: str, colour: RGB = INK, *, scale: int = 1) -> None:
        """Draw ``text`` with its top-left corner at ``(x, y)``, each font pixel ``scale``
        pixels square."""
        for char in text.upper():
            rows = GLYPHS.get(char, MISSING_GLYPH)
            for row, bits in enumerate(rows):
                for column in range(GLYPH_WIDTH):
                    if bits & (1 << (GLYPH_WIDTH - 1 - column)):
                        left, top = x + column * scale, y + row * scale
                        self.rect(left, top, left + scale - 1, top + scale - 1, colour)
            x += (GLYPH_WIDTH + GLYPH_SPACING) * scale

    def png(self) -> bytes:
        """The canvas as a PNG file (8-bit RGB, no filtering, zlib-compressed)."""
        row_bytes = 3 * self.width
        raw = bytearray()
        for y in range(self.height):
            raw.append(0)  # filter type 0: the row as is
            raw += self._pixels[y * row_bytes : (y + 1) * row_bytes]
        header = struct.pack(
            ">IIBBBBB", self.width, self.height, PNG_BIT_DEPTH, PNG_COLOUR_RGB, 0, 0, 0
        )
        return b"".join(
            (
                PNG_SIGNATURE,
                _png_chunk(b"IHDR", header),
                _png_chunk(b"IDAT", zlib.compress(bytes(raw), PNG_COMPRESSION)),
                _png_chunk(b"IEND", b""),
            )
        )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def nice_ticks(low: float, high: float, *, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering ``[low, high]``,
    about ``target`` of them."""
    if high <= low:
        return [low]
    raw_step = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(low / step - 1e-9)
    ticks = []
    value = first * step
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _format_tick(value: float) -> str:
    return f"{value:.0f}" if value == round(value) else f"{value:g}"


#: Plot geometry, in pixels.
PLOT_WIDTH: Final = 960
PANEL_HEIGHT: Final = 210
PANEL_GAP: Final = 80
PLOT_LEFT: Final = 90
PLOT_RIGHT: Final = 40
PLOT_TOP: Final = 110
PLOT_BOTTOM: Final = 80
HEADING_TOP: Final = 16
HEADING_LINE: Final = 26
#: Space between an axis and its labels, and between a point and its value.
TICK_GAP: Final = 8
#: Offset of the x axis label below the last panel.
X_LABEL_OFFSET: Final = 40
LINE_WIDTH: Final = 3
#: Length of the dashes of the vertical grid lines.
GRID_DASH: Final = 4
#: Font scale of titles and of tick labels.
TITLE_SCALE: Final = 2
LABEL_SCALE: Final = 2
#: Radius of a data point.
POINT_RADIUS: Final = 5
#: Fraction of the data's span left empty beyond each end of an axis.
AXIS_PADDING: Final = 0.08
#: Decades left on each side of the x axis when there is only one size.
SINGLE_SIZE_PADDING: Final = 0.5


@dataclass(frozen=True)
class Panel:
    """One chart of a value against network size.

    Args:
        title: drawn above the chart.
        values: one y value per size.
        y_range: the y axis's range.
        label: formats a value for the annotation next to its point.
    """

    title: str
    values: Sequence[float]
    y_range: tuple[float, float]
    label: Callable[[float], str]


def plot_height(panels: int) -> int:
    """Height in pixels of a plot of ``panels`` panels (its width is :data:`PLOT_WIDTH`)."""
    return PLOT_TOP + panels * PANEL_HEIGHT + (panels - 1) * PANEL_GAP + PLOT_BOTTOM


def render_plot(sizes: Sequence[int], panels: Sequence[Panel], heading: Sequence[str]) -> bytes:
    """Draw ``panels`` stacked, sharing a logarithmic x axis of network sizes, under the
    ``heading`` lines (the first as the title); returns the PNG.

    Raises:
        ValueError: if there are no sizes, a size is not positive, or a panel's values do not
            match ``sizes``.
    """
    if not sizes or any(size <= 0 for size in sizes):
        raise ValueError("sizes must be positive and non-empty")
    if any(len(panel.values) != len(sizes) for panel in panels):
        raise ValueError("every panel needs one value per size")
    height = plot_height(len(panels))
    canvas = Canvas(PLOT_WIDTH, height)
    for row, line in enumerate(heading):
        canvas.text(
            (PLOT_WIDTH - Canvas.text_width(line, TITLE_SCALE)) // 2,
            HEADING_TOP + row * HEADING_LINE,
            line,
            INK if row == 0 else SUBTLE_INK,
            scale=TITLE_SCALE,
        )
    logs = [math.log10(size) for size in sizes]
    x_low, x_high = min(logs), max(logs)
    x_pad = (x_high - x_low) * AXIS_PADDING if x_high > x_low else SINGLE_SIZE_PADDING
    x_axis = _Axis(x_low - x_pad, x_high + x_pad, PLOT_LEFT, PLOT_WIDTH - PLOT_RIGHT)
    x_pixels = [x_axis.pixel(value) for value in logs]
    for index, panel in enumerate(panels):
        top = PLOT_TOP + index * (PANEL_HEIGHT + PANEL_GAP)
        _draw_panel(canvas, panel, x_pixels, top, SERIES[index % len(SERIES)])
        for size, x in zip(sizes, x_pixels, strict=True):
            label = str(size)
            canvas.text(
                x - Canvas.text_width(label, LABEL_SCALE) // 2,
                top + PANEL_HEIGHT + TICK_GAP,
                label,
                scale=LABEL_SCALE,
            )
    axis_label = "NETWORK SIZE N (NODES, LOG SCALE)"
    canvas.text(
        (PLOT_LEFT + PLOT_WIDTH - PLOT_RIGHT - Canvas.text_width(axis_label, LABEL_SCALE)) // 2,
        height - PLOT_BOTTOM + X_LABEL_OFFSET,
        axis_label,
        scale=LABEL_SCALE,
    )
    return canvas.png()


@dataclass(frozen=True)
class _Axis:
    """A linear map from data values ``[low, high]`` to pixels ``[start, end]``."""

    low: float
    high: float
    start: int
    end: int

    def pixel(self, value: float) -> int:
        return round(
            self.start + (value - self.low) / (self.high - self.low) * (self.end - self.start)
        )


def _draw_panel(
    canvas: Canvas, panel: Panel, x_pixels: Sequence[int], top: int, colour: RGB
) -> None:
    """One panel: title, y grid and tick labels, x grid at the sizes, axes, the line, the points
    and their values."""
    left, right, bottom = PLOT_LEFT, PLOT_WIDTH - PLOT_RIGHT, top + PANEL_HEIGHT
    y_low, y_high = panel.y_range
    y_pad = (y_high - y_low) * AXIS_PADDING
    y_axis = _Axis(y_low - y_pad, y_high + y_pad, bottom, top)
    label_height = GLYPH_HEIGHT * LABEL_SCALE
    canvas.text(left, top - GLYPH_HEIGHT * TITLE_SCALE - TICK_GAP, panel.title, scale=TITLE_SCALE)
    for tick in nice_ticks(y_low, y_high):
        y = y_axis.pixel(tick)
        canvas.line(left, y, right, y, GRID)
        label = _format_tick(tick)
        canvas.text(
            left - TICK_GAP - Canvas.text_width(label, LABEL_SCALE),
            y - label_height // 2,
            label,
            scale=LABEL_SCALE,
        )
    for x in x_pixels:
        canvas.line(x, top, x, bottom, GRID, dash=GRID_DASH)
    canvas.line(left, top, left, bottom, INK)
    canvas.line(left, bottom, right, bottom, INK)
    points = [(x, y_axis.pixel(value)) for x, value in zip(x_pixels, panel.values, strict=True)]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        canvas.line(x0, y0, x1, y1, colour, width=LINE_WIDTH)
    for (x, y), value in zip(points, panel.values, strict=True):
        canvas.disc(x, y, POINT_RADIUS, colour)
        label = panel.label(value)
        label_y = y - POINT_RADIUS - TICK_GAP - label_height
        if label_y < top:  # no room above the point: write below it
            label_y = y + POINT_RADIUS + TICK_GAP
        canvas.text(
            x - Canvas.text_width(label, LABEL_SCALE) // 2,
            label_y,
            label,
            colour,
            scale=LABEL_SCALE,
        )


def plot_report(report: dict[str, Any]) -> bytes:
    """The PNG chart of a report: success rate, mean hops and mean datagrams per lookup
    against network size."""
    results = report["results"]
    params = report["parameters"]
    sizes = [entry["nodes"] for entry in results]
    success = [100 * entry["success_rate"] for entry in results]
    hops = [entry["hops"]["mean"] for entry in results]
    datagrams = [entry["datagrams"]["mean"] for entry in results]
    lowest = min(success)
    success_floor = 90.0 if lowest >= 90 else (50.0 if lowest >= 50 else 0.0)
    low, high = params["latency_s"]
    heading = [
        "P2PNODE DHT SIMULATION: LOOKUPS VS NETWORK SIZE",
        f"LOSS {params['loss']:.0%}, CHURN {params['churn']:.0%}, LATENCY "
        f"{low * 1000:g}-{high * 1000:g} MS, {params['lookups']} LOOKUPS PER SIZE, "
        f"SEED {params['seed']}",
    ]
    panels = [
        Panel("LOOKUP SUCCESS RATE (%)", success, (success_floor, 100.0), lambda v: f"{v:.1f}%"),
        Panel(
            "MEAN HOPS PER LOOKUP (ROUNDS)",
            hops,
            (0.0, max(1.0, math.ceil(max(hops) * 1.25))),
            lambda v: f"{v:.2f}",
        ),
        Panel(
            "MEAN DATAGRAMS PER LOOKUP (NETWORK-WIDE)",
            datagrams,
            (0.0, max(1.0, math.ceil(max(datagrams) * 1.25))),
            lambda v: f"{v:.1f}",
        ),
    ]
    return render_plot(sizes, panels, heading)


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the report's JSON, Markdown and PNG into ``out_dir`` (created if missing).

    Returns:
        The path of each file, by kind (``json``, ``markdown``, ``png``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / REPORT_NAME,
        "markdown": out_dir / TABLE_NAME,
        "png": out_dir / PLOT_NAME,
    }
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(report))
    paths["png"].write_bytes(plot_report(report))
    return paths


# --- command line ------------------------------------------------------------------------------


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of sizes: {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def _parse_latency(text: str) -> tuple[float, float]:
    try:
        parts = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not MIN,MAX seconds: {text!r}") from None
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"not MIN,MAX seconds: {text!r}")
    return (parts[0], parts[1])


def _print_progress(result: SizeResult, wall_seconds: float) -> None:
    entry = size_summary(result)
    print(
        f"N={entry['nodes']}: success {entry['success_rate']:.1%} "
        f"({entry['successes']}/{entry['lookups']}), mean hops {entry['hops']['mean']:.2f}, "
        f"mean datagrams {entry['datagrams']['mean']:.1f}, "
        f"median latency {entry['latency_ms']['median']:.1f} ms; wall {wall_seconds:.1f} s ("
        + ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.wall_seconds.items())
        + ")",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for bad arguments)."""
    parser = argparse.ArgumentParser(
        prog="python -m p2pnode.sim",
        description="Deterministic in-process DHT simulation: lookup success, hops and "
        "datagrams per lookup against network size (see docs/SIMULATION.md).",
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=list(DEFAULT_SIZES),
        help="comma-separated network sizes (default: %(default)s)",
    )
    parser.add_argument("--loss", type=float, default=DEFAULT_LOSS, help="datagram loss rate")
    parser.add_argument("--churn", type=float, default=DEFAULT_CHURN, help="fraction that leaves")
    parser.add_argument(
        "--latency",
        type=_parse_latency,
        default=DEFAULT_LATENCY,
        help="one-way latency MIN,MAX in seconds (default: 0.005,0.05)",
    )
    parser.add_argument("--lookups", type=int, default=DEFAULT_LOOKUPS, help="lookups per size")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of everything random")
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_SECONDS,
        help="virtual seconds between churn and republish (default: %(default)s, one refresh)",
    )
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="output directory")
    args = parser.parse_args(argv)
    try:
        for size in args.sizes:
            SimConfig(
                size,
                loss=args.loss,
                churn=args.churn,
                latency=args.latency,
                lookups=args.lookups,
                seed=args.seed,
                settle_seconds=args.settle,
            )
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    report = run_sweep(
        args.sizes,
        loss=args.loss,
        churn=args.churn,
        latency=args.latency,
        lookups=args.lookups,
        seed=args.seed,
        settle_seconds=args.settle,
        progress=_print_progress,
    )
    paths = write_outputs(report, args.out)
    print(markdown_table(report), end="")
    print(
        f"wrote {', '.join(str(path) for path in paths.values())} "
        f"in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
