"""The iterative lookup as a pure state machine: alpha requests in flight, done when the k
closest answered, failures skipped, a value lookup collects a quorum."""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable

import pytest

from p2pnode.dht.lookup import DEFAULT_ALPHA, VALUE_QUORUM, Lookup
from p2pnode.dht.wire import Contact

TARGET = hashlib.sha1(b"target").digest()
K = 8


def make_contact(i: int) -> Contact:
    return Contact(hashlib.sha1(i.to_bytes(4, "big")).digest(), f"10.{i // 250}.{i % 250}.1", 4000)


def distance(contact: Contact, target: bytes = TARGET) -> int:
    return int.from_bytes(contact.node_id, "big") ^ int.from_bytes(target, "big")


def by_distance(contacts: list[Contact], target: bytes = TARGET) -> list[Contact]:
    return sorted(contacts, key=lambda c: distance(c, target))


class Network:
    """``size`` nodes, each with a proper Kademlia table (up to k contacts per bucket), as a
    reply oracle: a node answers find_node with the k closest it knows."""

    def __init__(self, size: int, seed: int, k: int = K) -> None:
        rng = random.Random(seed)
        self.nodes = [make_contact(i) for i in range(size)]
        self.tables: dict[bytes, list[Contact]] = {}
        for node in self.nodes:
            buckets: dict[int, list[Contact]] = {}
            others = [other for other in self.nodes if other is not node]
            rng.shuffle(others)
            for other in others:
                bucket = buckets.setdefault(distance(other, node.node_id).bit_length(), [])
                if len(bucket) < k:
                    bucket.append(other)
            self.tables[node.node_id] = [c for bucket in buckets.values() for c in bucket]

    def reply(self, node: Contact, target: bytes, k: int = K) -> list[Contact]:
        return by_distance(self.tables[node.node_id], target)[:k]


def drive(
    lookup: Lookup,
    answer: Callable[[Contact], list[Contact] | bytes | None],
    *,
    max_steps: int = 10_000,
) -> int:
    """Run ``lookup`` to completion, replying in the order requests were sent; ``answer``
    returns contacts, a value, or None for no answer. Returns the most ever in flight."""
    in_flight: deque[Contact] = deque()
    most = 0
    for _ in range(max_steps):
        in_flight.extend(lookup.next_queries())
        most = max(most, len(in_flight))
        if not in_flight:
            break
        contact = in_flight.popleft()
        outcome = answer(contact)
        if outcome is None:
            lookup.on_failure(contact)
        elif isinstance(outcome, bytes):
            lookup.on_value(contact, outcome)
        else:
            lookup.on_contacts(contact, outcome)
    assert lookup.finished
    return most


# --- alpha in flight --------------------------------------------------------------------------


def test_asks_the_alpha_closest_first_and_keeps_alpha_in_flight() -> None:
    seeds = [make_contact(i) for i in range(10)]
    ordered = by_distance(seeds)
    lookup = Lookup(TARGET, seeds, ksize=K)
    first = lookup.next_queries()
    assert first == ordered[:DEFAULT_ALPHA]
    assert lookup.next_queries() == []  # alpha already in flight
    assert not lookup.finished
    lookup.on_contacts(first[0], [])
    assert lookup.next_queries() == [ordered[3]]  # one slot freed, one more asked
    lookup.on_failure(first[1])
    assert lookup.next_queries() == [ordered[4]]
    assert lookup.asked_count == 5


def test_never_asks_itself_or_anyone_twice() -> None:
    own = make_contact(0)
    seeds = [make_contact(i) for i in range(5)]
    lookup = Lookup(TARGET, seeds, ksize=K, own_id=own.node_id)
    asked: list[Contact] = []

    def answer(contact: Contact) -> list[Contact]:
        asked.append(contact)
        return [own, *seeds, contact]  # everyone repeats what is already known

    drive(lookup, answer)
    assert own not in asked
    assert len(asked) == len(set(asked)) == 4


def test_an_empty_lookup_is_finished_at_once() -> None:
    lookup = Lookup(TARGET, [], ksize=K)
    assert lookup.finished
    assert lookup.next_queries() == []
    assert lookup.closest_answered() == []


# --- completeness -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_finds_exactly_the_k_closest_nodes_of_the_network(seed: int) -> None:
    network = Network(250, seed)
    rng = random.Random(seed)
    start = rng.choice(network.nodes)
    target = rng.randbytes(20)
    lookup = Lookup(target, network.reply(start, target), ksize=K, own_id=start.node_id)
    most = drive(lookup, lambda c: network.reply(c, target))
    assert most <= DEFAULT_ALPHA
    others = [n for n in network.nodes if n != start]
    assert lookup.closest_answered() == by_distance(others, target)[:K]
    assert lookup.asked_count < len(others) // 4  # a lookup, not a flood


def test_not_finished_while_any_of_the_k_closest_known_is_unanswered() -> None:
    seeds = [make_contact(i) for i in range(20)]
    lookup = Lookup(TARGET, seeds, ksize=K)
    answered = 0
    while not lookup.finished:
        queries = lookup.next_queries()
        assert queries, "not finished, yet nothing left to ask"
        for contact in queries:
            lookup.on_contacts(contact, [])
            answered += 1
    assert answered == K  # the farther 12 seeds were never needed
    assert lookup.closest_answered() == by_distance(seeds)[:K]


def test_a_closer_contact_learned_late_is_still_asked() -> None:
    seeds = [make_contact(i) for i in range(K)]
    closer = by_distance([make_contact(i) for i in range(1000, 1200)])[0]
    assert distance(closer) < distance(by_distance(seeds)[0])
    lookup = Lookup(TARGET, seeds, ksize=K)
    drive(lookup, lambda c: [closer] if c == by_distance(seeds)[-1] else [])
    assert lookup.closest_answered()[0] == closer


# --- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_skips_failed_nodes_and_still_finds_the_k_closest_live_ones(seed: int) -> None:
    network = Network(250, seed + 100)
    rng = random.Random(seed)
    start = rng.choice(network.nodes)
    target = rng.randbytes(20)
    dead = {n.node_id for n in rng.sample(network.nodes, 75) if n != start}
    # The closest node of all is among the dead for sure.
    dead.add(by_distance([n for n in network.nodes if n != start], target)[0].node_id)

    # Responders name their 2k closest: they cannot know who is dead, so with k names and 30 %
    # dead nobody might name the k-th closest live node (a limit of Kademlia, not the lookup).
    def answer(contact: Contact) -> list[Contact] | None:
        return None if contact.node_id in dead else network.reply(contact, target, 2 * K)

    lookup = Lookup(target, network.reply(start, target, 2 * K), ksize=K, own_id=start.node_id)
    drive(lookup, answer)
    live = [n for n in network.nodes if n != start and n.node_id not in dead]
    result = lookup.closest_answered()
    assert result == by_distance(live, target)[:K]
    assert not {c.node_id for c in result} & dead


def test_finishes_when_every_node_fails() -> None:
    lookup = Lookup(TARGET, [make_contact(i) for i in range(30)], ksize=K)
    drive(lookup, lambda c: None)
    assert lookup.closest_answered() == []
    assert lookup.asked_count == 30


# --- outcomes that do not belong to the lookup ------------------------------------------------


def test_outcomes_for_contacts_not_asked_are_ignored() -> None:
    seeds = [make_contact(i) for i in range(10)]
    stranger = make_contact(500)
    lookup = Lookup(TARGET, seeds, ksize=K)
    asked = lookup.next_queries()
    unasked = by_distance(seeds)[5]
    lookup.on_contacts(stranger, [make_contact(501)])  # never asked, unknown
    lookup.on_contacts(unasked, [make_contact(502)])  # known, not asked yet
    lookup.on_failure(unasked)
    lookup.on_value(unasked, b"value")
    assert lookup.values == []
    assert lookup.next_queries() == []  # still alpha in flight: nothing was settled
    lookup.on_contacts(asked[0], [])
    lookup.on_contacts(asked[0], [])  # a duplicate reply settles nothing more
    assert len(lookup.next_queries()) == 1
    known = {c for c in seeds}
    assert all(c in known for c in lookup.closest_answered())


# --- value lookups ----------------------------------------------------------------------------


def test_value_lookup_stops_at_the_quorum() -> None:
    network = Network(200, 7)
    target = random.Random(7).randbytes(20)
    holders = {n.node_id for n in by_distance(network.nodes, target)[:6]}
    start = by_distance(network.nodes, target)[-1]

    def answer(contact: Contact) -> list[Contact] | bytes:
        if contact.node_id in holders:
            return b"record from " + contact.node_id
        return network.reply(contact, target)

    lookup = Lookup(
        target, network.reply(start, target), ksize=K, want_value=True, own_id=start.node_id
    )
    drive(lookup, answer)
    assert len(lookup.values) >= VALUE_QUORUM
    assert len({c.node_id for c, _ in lookup.values}) == len(lookup.values)  # distinct nodes
    assert all(value == b"record from " + c.node_id for c, value in lookup.values)
    assert lookup.next_queries() == []


def test_value_lookup_with_fewer_holders_than_the_quorum_asks_all_k_closest() -> None:
    network = Network(200, 8)
    target = random.Random(8).randbytes(20)
    closest = by_distance(network.nodes, target)
    holder = closest[2].node_id
    start = closest[-1]

    def answer(contact: Contact) -> list[Contact] | bytes:
        return b"the value" if contact.node_id == holder else network.reply(contact, target)

    lookup = Lookup(
        target, network.reply(start, target), ksize=K, want_value=True, own_id=start.node_id
    )
    drive(lookup, answer)
    assert [(c.node_id, v) for c, v in lookup.values] == [(holder, b"the value")]
    assert lookup.closest_answered() == closest[:K]


def test_one_node_cannot_fill_the_quorum_alone() -> None:
    seeds = [make_contact(i) for i in range(10)]
    lookup = Lookup(TARGET, seeds, ksize=K, want_value=True)
    first = lookup.next_queries()[0]
    for _ in range(VALUE_QUORUM):
        lookup.on_value(first, b"value")
    assert len(lookup.values) == 1
    assert not lookup.finished
