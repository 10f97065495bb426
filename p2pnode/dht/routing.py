"""The routing table: k-buckets with the hygiene the kademlia package lacks.

Built on the kademlia package's :class:`kademlia.routing.KBucket` and
:class:`kademlia.node.Node`; replaces its ``RoutingTable`` and ``TableTraverser``:

- :meth:`RoutingTable.find_neighbors` considers every contact, so it never returns fewer than
  ``k`` while the table holds more (the stock traverser can return none of 30; upstream PR #52).
- A contact is added only by :meth:`RoutingTable.add_verified`, which the protocol calls when
  the node answered *our* ping at its claimed address.
- At most one node ID per ``ip:port``; at most :data:`MAX_PER_SUBNET_PER_BUCKET` contacts from
  one /24 (IPv6: /64) in a bucket, so one host cannot fill the slots around a target.
- A contact is evicted only after :data:`MAX_FAILURES` consecutive unanswered requests (the
  stock table evicts on the first lost packet).

Pure: no I/O, no clock. Decisions that need the network (pinging the head of a full bucket)
are returned to the caller.
"""

from __future__ import annotations

import bisect
import enum
import functools
import heapq
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from kademlia.node import Node
from kademlia.routing import KBucket

from p2pnode.dht.wire import Address, Contact

#: Kademlia's k: bucket size and replication factor (the paper's and the package's default).
DEFAULT_KSIZE: Final = 20
#: Consecutive unanswered requests before a contact is evicted. The paper suggests tolerating
#: several failures; 3 survives a 5 % loss rate with high probability.
MAX_FAILURES: Final = 3
#: Contacts from one /24 (IPv6 /64) allowed in a single bucket, as in BitTorrent's mainline
#: DHT hardening: a host with many addresses gains at most this many slots per bucket.
MAX_PER_SUBNET_PER_BUCKET: Final = 2
_ID_SPACE: Final = 2**160


class AddResult(enum.Enum):
    """Outcome of :meth:`RoutingTable.add_verified`."""

    ADDED = "added"
    UPDATED = "updated"  # already known; moved to the tail as most recently seen
    BUCKET_FULL = "bucket-full"  # kept as a replacement; the caller should ping the head
    OWN_ID = "own-id"
    ADDRESS_TAKEN = "address-taken"  # another ID already lives at this ip:port
    SUBNET_FULL = "subnet-full"


@dataclass(frozen=True)
class Added:
    """What :meth:`RoutingTable.add_verified` did, and which contact to ping if a bucket is
    full (``ping``)."""

    result: AddResult
    ping: Contact | None = None


@functools.lru_cache(maxsize=4096)
def subnet_of(host: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) prefix of ``host``, as text."""
    address = ipaddress.ip_address(host)
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{host}/{prefix}", strict=False))


def _to_node(contact: Contact) -> Node:
    return Node(contact.node_id, contact.host, contact.port)


def _to_contact(node: Node) -> Contact:
    return Contact(node.id, node.ip, node.port)


class RoutingTable:
    """Kademlia k-buckets for the node whose ID is ``own_id``.

    Args:
        own_id: this node's 20-byte ID.
        ksize: bucket size.
        exempt_loopback: do not apply the subnet limit to loopback addresses (many local nodes
            on 127.0.0.1 are one user's test network, not an attack).
    """

    def __init__(
        self, own_id: bytes, *, ksize: int = DEFAULT_KSIZE, exempt_loopback: bool = True
    ) -> None:
        self.own = Node(own_id)
        self.ksize = ksize
        self.exempt_loopback = exempt_loopback
        self._buckets: list[KBucket] = [KBucket(0, _ID_SPACE - 1, ksize)]
        self._lower_bounds: list[int] = [0]
        self._by_address: dict[Address, bytes] = {}
        self._failures: dict[bytes, int] = {}

    # --- queries -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets)

    def __iter__(self) -> Iterator[Contact]:
        for bucket in self._buckets:
            for node in bucket.get_nodes():
                yield _to_contact(node)

    def __contains__(self, node_id: object) -> bool:
        if not isinstance(node_id, bytes):
            return False
        return node_id in self._bucket_for(int.from_bytes(node_id, "big")).nodes

    def contact_at(self, address: Address) -> bytes | None:
        """The ID of the contact at ``address``, if any."""
        return self._by_address.get(address)

    def find_neighbors(
        self, target: bytes, k: int | None = None, *, exclude: Address | None = None
    ) -> list[Contact]:
        """The ``k`` contacts closest to ``target`` by XOR distance, closest first.

        Every contact is considered (O(n) over the table; a full table of 160 buckets holds at
        most a few thousand), so the answer is complete. ``exclude`` leaves out the contact at
        that address (the requester itself).
        """
        k = k or self.ksize
        target_id = int.from_bytes(target, "big")
        candidates = (
            node
            for bucket in self._buckets
            for node in bucket.nodes.values()
            if exclude is None or (node.ip, node.port) != exclude
        )
        closest = heapq.nsmallest(k, candidates, key=lambda node: node.long_id ^ target_id)
        return [_to_contact(node) for node in closest]

    def bucket_count(self) -> int:
        """How many buckets the table has split into."""
        return len(self._buckets)

    def bucket_ranges(self) -> list[tuple[int, int]]:
        """The inclusive ID ranges of the buckets, for refreshing lonely ones."""
        return [bucket.range for bucket in self._buckets]

    # --- updates -----------------------------------------------------------------------------

    def add_verified(self, contact: Contact) -> Added:
        """Add or refresh a contact that has just answered our ping at ``contact.address``.

        Never call this for a node that merely claimed an ID in a request: that is how the
        stock package lets one ``ip:port`` fill every slot around a target.
        """
        if contact.node_id == self.own.id:
            return Added(AddResult.OWN_ID)
        owner = self._by_address.get(contact.address)
        if owner is not None and owner != contact.node_id:
            return Added(AddResult.ADDRESS_TAKEN)
        node = _to_node(contact)
        bucket = self._bucket_for(node.long_id)
        self._failures.pop(contact.node_id, None)
        if node.id in bucket.nodes:
            old = bucket.nodes[node.id]
            if (old.ip, old.port) != contact.address:
                # Same ID at a new address: allowed only because it answered there just now,
                # and only if the new address's subnet has room in this bucket (else moving
                # contacts would bypass the subnet limit).
                moves_subnet = subnet_of(old.ip) != subnet_of(contact.host)
                if moves_subnet and not self._subnet_allows(bucket, contact.host):
                    return Added(AddResult.SUBNET_FULL)
                self._by_address.pop((old.ip, old.port), None)
            bucket.add_node(node)
            self._by_address[contact.address] = node.id
            return Added(AddResult.UPDATED)
        if not self._subnet_allows(bucket, contact.host):
            return Added(AddResult.SUBNET_FULL)
        if bucket.add_node(node):
            self._by_address[contact.address] = node.id
            return Added(AddResult.ADDED)
        # Full. Split if the bucket covers our own ID (or per the paper's depth rule), else keep
        # the newcomer as a replacement and ask the caller to check the head is still alive.
        bucket.replacement_nodes.pop(node.id, None)  # add_node filed it as a replacement
        if bucket.has_in_range(self.own) or bucket.depth() % 5 != 0:
            self._split(bucket)
            return self.add_verified(contact)
        bucket.add_node(node)  # files it as a replacement (bounded by the bucket)
        return Added(AddResult.BUCKET_FULL, ping=_to_contact(bucket.head()))

    def record_failure(self, node_id: bytes) -> bool:
        """Count an unanswered request to ``node_id``; evict it after :data:`MAX_FAILURES` in
        a row, promoting a replacement. Returns True if it was evicted."""
        bucket = self._bucket_for(int.from_bytes(node_id, "big"))
        if node_id not in bucket.nodes:
            bucket.replacement_nodes.pop(node_id, None)
            return False
        failures = self._failures.get(node_id, 0) + 1
        if failures < MAX_FAILURES:
            self._failures[node_id] = failures
            return False
        self.remove(node_id)
        return True

    def record_success(self, node_id: bytes) -> None:
        """Reset the failure count of a contact that answered."""
        self._failures.pop(node_id, None)

    def remove(self, node_id: bytes) -> None:
        """Remove a contact (a replacement, if any, takes its place)."""
        bucket = self._bucket_for(int.from_bytes(node_id, "big"))
        node = bucket.nodes.get(node_id) or bucket.replacement_nodes.get(node_id)
        if node is None:
            return
        self._failures.pop(node_id, None)
        bucket.replacement_nodes.pop(node_id, None)
        if bucket.nodes.pop(node_id, None) is not None:
            if self._by_address.get((node.ip, node.port)) == node_id:
                del self._by_address[(node.ip, node.port)]
            self._promote(bucket)

    # --- internals ---------------------------------------------------------------------------

    def _bucket_for(self, long_id: int) -> KBucket:
        index = bisect.bisect_right(self._lower_bounds, long_id) - 1
        return self._buckets[index]

    def _split(self, bucket: KBucket) -> None:
        # Not KBucket.split: it promotes replacements into the halves' free slots unchecked,
        # which would bypass the address and subnet rules (see _promote).
        index = self._buckets.index(bucket)
        low, high = bucket.range
        midpoint = (low + high) // 2
        one, two = KBucket(low, midpoint, self.ksize), KBucket(midpoint + 1, high, self.ksize)
        for node in bucket.nodes.values():
            (one if node.long_id <= midpoint else two).nodes[node.id] = node
        for node in bucket.replacement_nodes.values():  # oldest first, as they were filed
            (one if node.long_id <= midpoint else two).replacement_nodes[node.id] = node
        self._buckets[index : index + 1] = [one, two]
        self._lower_bounds[index : index + 1] = [one.range[0], two.range[0]]
        self._promote(one)
        self._promote(two)

    def _promote(self, bucket: KBucket) -> None:
        """Fill free slots of ``bucket`` from its replacements, newest first.

        A replacement was checked when it was filed, but the table has changed since: another
        ID may now live at its address, or its subnet may have filled up. Such a replacement is
        dropped rather than promoted, so promotion cannot bypass the one-ID-per-address and
        per-subnet limits.
        """
        while len(bucket.nodes) < self.ksize and bucket.replacement_nodes:
            _, node = bucket.replacement_nodes.popitem()
            address = (node.ip, node.port)
            if self._by_address.get(address, node.id) != node.id:
                continue
            if not self._subnet_allows(bucket, node.ip):
                continue
            bucket.nodes[node.id] = node
            self._by_address[address] = node.id

    def _subnet_allows(self, bucket: KBucket, host: str) -> bool:
        if self.exempt_loopback and ipaddress.ip_address(host).is_loopback:
            return True
        subnet = subnet_of(host)
        same = sum(1 for node in bucket.get_nodes() if subnet_of(node.ip) == subnet)
        return same < MAX_PER_SUBNET_PER_BUCKET


def closest(target: bytes, contacts: Iterable[Contact], k: int) -> list[Contact]:
    """The ``k`` of ``contacts`` closest to ``target``, closest first."""
    target_id = int.from_bytes(target, "big")
    return heapq.nsmallest(k, contacts, key=lambda c: int.from_bytes(c.node_id, "big") ^ target_id)
