"""Iterative Kademlia lookups as a pure state machine.

A :class:`Lookup` knows which contacts to ask next and when it is done; it sends nothing and
waits for nothing. The driver asks for :meth:`Lookup.next_queries`, sends them, and feeds every
outcome back (:meth:`Lookup.on_contacts`, :meth:`Lookup.on_value`, :meth:`Lookup.on_failure`).

Unlike the kademlia package's crawler, a lookup keeps up to ``alpha`` requests in flight at all
times (it does not wait for a whole round), skips contacts that failed instead of stopping, and
a value lookup does not stop at the first value: it collects values from several nodes
(:data:`VALUE_QUORUM`) so the caller can pick the highest valid sequence number rather than the
first or the most common answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from p2pnode.dht.wire import Contact

#: Kademlia's alpha: requests in flight per lookup (the paper's and the package's default).
DEFAULT_ALPHA: Final = 3
#: A value lookup finishes early once this many distinct nodes returned a valid value: enough
#: that one stale or withholding node cannot decide the answer, few enough to stay fast.
VALUE_QUORUM: Final = 3


@dataclass
class _State:
    contact: Contact
    distance: int
    status: str = "new"  # new -> asked -> answered | failed


@dataclass
class Lookup:
    """One lookup of ``target`` (a 20-byte key).

    Args:
        target: the ID or key looked up.
        seeds: contacts to start from (usually the k closest in our routing table).
        ksize: how many closest nodes the lookup must hear from before it is done.
        alpha: requests in flight.
        want_value: a value lookup (find_value) rather than a node lookup (find_node).
        own_id: our node ID, never queried.
    """

    target: bytes
    seeds: Iterable[Contact]
    ksize: int = 20
    alpha: int = DEFAULT_ALPHA
    want_value: bool = False
    own_id: bytes | None = None
    values: list[tuple[Contact, bytes]] = field(default_factory=list)
    _states: dict[bytes, _State] = field(default_factory=dict)
    _in_flight: int = 0

    def __post_init__(self) -> None:
        self._target_id = int.from_bytes(self.target, "big")
        self._add(self.seeds)

    def _add(self, contacts: Iterable[Contact]) -> None:
        for contact in contacts:
            if contact.node_id == self.own_id or contact.node_id in self._states:
                continue
            distance = int.from_bytes(contact.node_id, "big") ^ self._target_id
            self._states[contact.node_id] = _State(contact, distance)

    def _frontier(self) -> list[_State]:
        """The k closest contacts not known to have failed, closest first."""
        alive = (s for s in self._states.values() if s.status != "failed")
        return sorted(alive, key=lambda s: s.distance)[: self.ksize]

    @property
    def finished(self) -> bool:
        """True when a value lookup has its quorum of values (requests still in flight are
        abandoned: waiting for one sent to a departed node would cost a full timeout), or when
        nothing is in flight and the k closest live contacts have all answered."""
        if self.want_value and len(self.values) >= VALUE_QUORUM:
            return True
        if self._in_flight:
            return False
        return all(s.status == "answered" for s in self._frontier())

    def next_queries(self) -> list[Contact]:
        """Contacts to ask now (marked as asked); empty if ``alpha`` are in flight or none is
        left to ask."""
        if self.want_value and len(self.values) >= VALUE_QUORUM:
            return []
        out = []
        for state in self._frontier():
            if self._in_flight >= self.alpha:
                break
            if state.status == "new":
                state.status = "asked"
                self._in_flight += 1
                out.append(state.contact)
        return out

    def _settle(self, contact: Contact, status: str) -> None:
        state = self._states.get(contact.node_id)
        if state is None or state.status != "asked":
            return
        state.status = status
        self._in_flight -= 1

    def on_contacts(self, contact: Contact, contacts: Iterable[Contact]) -> None:
        """``contact`` answered with (up to k) contacts closer to the target."""
        if self._states.get(contact.node_id, _State(contact, 0)).status != "asked":
            return
        self._settle(contact, "answered")
        self._add(contacts)

    def on_value(self, contact: Contact, value: bytes) -> None:
        """``contact`` answered with a value the caller has already checked is valid."""
        if self._states.get(contact.node_id, _State(contact, 0)).status != "asked":
            return
        self._settle(contact, "answered")
        self.values.append((contact, value))

    def on_failure(self, contact: Contact) -> None:
        """``contact`` did not answer, or answered with something invalid."""
        self._settle(contact, "failed")

    def closest_answered(self) -> list[Contact]:
        """The (at most k) closest contacts that answered, closest first."""
        answered = [s for s in self._states.values() if s.status == "answered"]
        answered.sort(key=lambda s: s.distance)
        return [s.contact for s in answered[: self.ksize]]

    @property
    def asked_count(self) -> int:
        """How many contacts were asked in all (hops/messages statistics)."""
        return sum(1 for s in self._states.values() if s.status != "new")
