"""What a p2pnode DHT node stores for others: verified peer records, within fixed limits.

Stock ``kademlia`` stores whatever any sender offers, under any key, without limit (GUIDE
section 5). :class:`RecordStorage` instead accepts a value only if it is a valid signed peer
record for the key it is offered under (:func:`~p2pnode.dht.records.verify_record`), keeps only
the highest sequence number per key, drops records when they expire, and bounds how much any
one sender, and all senders together, can make it hold.

It implements the ``kademlia`` :class:`~kademlia.storage.IStorage` interface so it can stand in
where the package expects a storage, but network input must go through :meth:`offer` with the
sender's address: the interface's ``__setitem__`` is for the node's own records and is exempt
from the per-sender quota.

This module is pure: no I/O. :meth:`RecordStorage.offer` and :meth:`RecordStorage.expire` take
the time as integer milliseconds since the epoch; the interface methods, which have no time
parameter, read the clock injected at construction.
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from kademlia.storage import IStorage

from p2pnode.clock import wall_clock_ms
from p2pnode.dht.records import (
    DHT_KEY_SIZE,
    RecordError,
    RecordRejection,
    SignedRecord,
    verify_record,
)

#: Most records held for other nodes. At the 1 KiB record cap that is about 10 MB of record
#: bytes (roughly twice that with Python's per-object overhead): affordable for any node, and
#: far more than a node is responsible for in a network of a million nodes (k=20 copies of a
#: million records spread over a million nodes is about 20 per node).
MAX_RECORDS: Final = 10_000

#: Most keys one source (an IPv4 address, or an IPv6 /64, which one host usually controls in
#: full) may have stored here at a time. An honest node stores its own record and republishes
#: the few it holds; 64 leaves room for several nodes behind one NAT while making it take
#: MAX_RECORDS / 64 (about 156) distinct sources to fill the store.
MAX_RECORDS_PER_SOURCE: Final = 64

#: Most records the node itself may store (``source_ip=None``, or ``__setitem__``). These are
#: exempt from :data:`MAX_RECORDS` and the per-source quota, so they get their own small bound:
#: a node publishes one record per identity it runs.
MAX_OWN_RECORDS: Final = 16

#: Bits of an IPv6 source address that identify one quota holder: a /64 is the smallest prefix
#: normally assigned to a site (RFC 6177), and a host can pick any address within it.
IPV6_QUOTA_PREFIX: Final = 64

#: The expiry heap is rebuilt once stale entries (left by replaced or removed records) make it
#: larger than twice the live records plus this slack; rebuilding costs O(n) after at least n
#: pushes, so amortised O(1) per push, and the heap stays bounded by the record limits.
_HEAP_SLACK: Final = 64


class StoreOutcome(enum.Enum):
    """What :meth:`RecordStorage.offer` did with a record. Values are stable strings."""

    #: The record was new, or replaced one with a lower ``seq``.
    STORED = "stored"
    #: The identical record is already stored (its republish time is refreshed).
    UNCHANGED = "unchanged"
    #: A record with the same or a higher ``seq`` (and different bytes) is already stored.
    STALE = "stale"
    #: The record did not verify; :attr:`StoreResult.rejection` says why.
    INVALID = "invalid"
    #: The source already has :data:`MAX_RECORDS_PER_SOURCE` keys stored here.
    OVER_QUOTA = "over-quota"
    #: The store holds :data:`MAX_RECORDS` records for others (or :data:`MAX_OWN_RECORDS` own).
    FULL = "full"


@dataclass(frozen=True)
class StoreResult:
    """The outcome of :meth:`RecordStorage.offer_result`, and for INVALID the verification
    failure's reason."""

    outcome: StoreOutcome
    rejection: RecordRejection | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        """True if the offered record is now stored (STORED or UNCHANGED)."""
        return self.outcome in (StoreOutcome.STORED, StoreOutcome.UNCHANGED)


@dataclass
class _Entry:
    signed: SignedRecord
    #: When the record stops being served: the earlier of its own expiry and its encryption
    #: key's, since a record whose key has expired can no longer be used to send to its node.
    expires: int
    #: When the record was stored, or last offered again unchanged (for republishing).
    stored_at: int
    #: Quota bucket charged for this key, or None for the node's own (exempt) records.
    source: str | None


def quota_source(source_ip: str) -> str:
    """Return the quota bucket of a sender address: the IPv4 address or the IPv6 /64 prefix.

    IPv4-mapped IPv6 addresses (from a dual-stack socket) count as their IPv4 address, and an
    IPv6 scope ID is ignored.

    Raises:
        ValueError: if ``source_ip`` is not an IP address literal.
    """
    ip = ipaddress.ip_address(source_ip)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        host_bits = 128 - IPV6_QUOTA_PREFIX
        prefix = ipaddress.IPv6Address(int(ip) >> host_bits << host_bits)
        return f"{prefix}/{IPV6_QUOTA_PREFIX}"
    return str(ip)


class RecordStorage(IStorage):  # type: ignore[misc]  # kademlia has no type hints
    """Verified, bounded storage of signed peer records, keyed by 20-byte DHT keys.

    Values are the published record bytes. A key holds at most one record, the one with the
    highest ``seq`` offered while it was valid. Expired records are never returned, and are
    dropped by :meth:`expire` (which :meth:`offer` and the read methods call first).

    Memory is bounded in all cases: at most ``max_records`` records stored for others plus
    :data:`MAX_OWN_RECORDS` own records, each at most
    :data:`~p2pnode.dht.records.MAX_RECORD_SIZE` bytes, and an expiry heap at most about twice
    that many entries.

    Args:
        clock: returns the current time in ms since the epoch, for the methods of the
            ``IStorage`` interface (which take no time); defaults to :func:`wall_clock_ms`.
        max_records: limit on records stored for others (tests lower it).
        max_records_per_source: limit on keys stored per quota source (tests lower it).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], int] = wall_clock_ms,
        max_records: int = MAX_RECORDS,
        max_records_per_source: int = MAX_RECORDS_PER_SOURCE,
    ) -> None:
        self._clock = clock
        self._max_records = max_records
        self._max_per_source = max_records_per_source
        self._entries: dict[bytes, _Entry] = {}
        self._per_source: dict[str, int] = {}
        self._own_count = 0
        # (expires, key); an item is stale unless the key's entry still has that expiry.
        self._heap: list[tuple[int, bytes]] = []

    # -- the main entry point -------------------------------------------------------------

    def offer(
        self, key: bytes, value: bytes, *, source_ip: str | None, now_ms: int
    ) -> StoreOutcome:
        """Verify ``value`` as a record for ``key`` and store it if it is new or newer.

        The same as :meth:`offer_result` but returns only the outcome; use that method when the
        reason for an INVALID outcome is wanted (for logs or counters).

        Raises:
            ValueError: if ``source_ip`` is not an IP address literal (a caller's bug).
        """
        return self.offer_result(key, value, source_ip=source_ip, now_ms=now_ms).outcome

    def offer_result(
        self, key: bytes, value: bytes, *, source_ip: str | None, now_ms: int
    ) -> StoreResult:
        """Verify ``value`` as a record for ``key`` and store it if it is new or newer.

        Args:
            key: the DHT key the sender asks to store under (untrusted; any type is refused
                cleanly unless it is 20 bytes).
            value: the published record bytes (untrusted).
            source_ip: the sender's IP address, as seen on the socket; ``None`` for the node
                itself, which is exempt from the quotas and from :data:`MAX_RECORDS` (but not
                from verification, nor from :data:`MAX_OWN_RECORDS`).
            now_ms: the current time.

        Returns:
            A :class:`StoreResult`. A key not stored yet counts against its source's quota;
            replacing the record of a key already stored does not (the key stays charged to
            the source that first stored it, or becomes exempt if the node itself replaces it).
            An identical record offered again is UNCHANGED without re-verification, and
            refreshes its republish time (Kademlia's rule: whoever stored it has also stored it
            on the other closest nodes). A peer cannot make this raise.

        Raises:
            ValueError: if ``source_ip`` is not an IP address literal (a caller's bug).
        """
        source = None if source_ip is None else quota_source(source_ip)
        self.expire(now_ms)
        if type(key) is not bytes or len(key) != DHT_KEY_SIZE:
            return StoreResult(
                StoreOutcome.INVALID, RecordRejection.WRONG_KEY, "a DHT key is 20 bytes"
            )
        existing = self._entries.get(key)
        if existing is not None and existing.signed.data == value:
            existing.stored_at = now_ms
            return StoreResult(StoreOutcome.UNCHANGED, detail="already stored")
        if existing is None:
            # Cheap checks first, so a flood of new keys costs no signature verification.
            refusal = self._capacity_refusal(source)
            if refusal is not None:
                return refusal
        try:
            signed = verify_record(value, key=key, now_ms=now_ms)
        except RecordError as exc:
            return StoreResult(StoreOutcome.INVALID, exc.reason, exc.detail)
        if existing is not None and signed.record.seq <= existing.signed.record.seq:
            return StoreResult(
                StoreOutcome.STALE,
                detail=f"seq {signed.record.seq} does not exceed the stored "
                f"{existing.signed.record.seq}",
            )
        if existing is None:
            charged = source
        else:
            # An update: the key stays charged where it was, unless the node itself now
            # stores it, which makes it exempt (releasing the quota it was charged to).
            charged = None if source is None else existing.source
            self._release(existing.source)
        self._charge(charged)
        record = signed.record
        entry = _Entry(
            signed=signed,
            expires=min(record.expires, record.encryption_key_expires),
            stored_at=now_ms,
            source=charged,
        )
        self._entries[key] = entry
        self._push(entry.expires, key)
        return StoreResult(StoreOutcome.STORED)

    def _capacity_refusal(self, source: str | None) -> StoreResult | None:
        if source is None:
            if self._own_count >= MAX_OWN_RECORDS:
                return StoreResult(
                    StoreOutcome.FULL, detail=f"{MAX_OWN_RECORDS} own records already stored"
                )
            return None
        if self._per_source.get(source, 0) >= self._max_per_source:
            return StoreResult(
                StoreOutcome.OVER_QUOTA,
                detail=f"{source} already has {self._max_per_source} keys stored",
            )
        if len(self._entries) - self._own_count >= self._max_records:
            return StoreResult(
                StoreOutcome.FULL, detail=f"{self._max_records} records already stored"
            )
        return None

    def _charge(self, source: str | None) -> None:
        if source is None:
            self._own_count += 1
        else:
            self._per_source[source] = self._per_source.get(source, 0) + 1

    def _release(self, source: str | None) -> None:
        if source is None:
            self._own_count -= 1
            return
        remaining = self._per_source[source] - 1
        if remaining:
            self._per_source[source] = remaining
        else:
            del self._per_source[source]  # so the quota table is bounded by live keys

    def _push(self, expires: int, key: bytes) -> None:
        heapq.heappush(self._heap, (expires, key))
        if len(self._heap) > 2 * len(self._entries) + _HEAP_SLACK:
            self._heap = [(entry.expires, k) for k, entry in self._entries.items()]
            heapq.heapify(self._heap)

    # -- expiry and removal ---------------------------------------------------------------

    def expire(self, now_ms: int) -> int:
        """Drop every record that has expired at ``now_ms``, releasing its quota.

        A record expires at the earlier of its ``expires`` and its encryption key's expiry.
        Costs O(log n) per expired record (plus amortised O(1) per stale heap item).

        Returns:
            The number of records dropped.
        """
        removed = 0
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            expires, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.expires == expires:
                self._drop(key, entry)
                removed += 1
        return removed

    def remove(self, key: bytes) -> bool:
        """Drop the record stored under ``key``, releasing its quota; False if there was none."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._drop(key, entry)
        return True

    def _drop(self, key: bytes, entry: _Entry) -> None:
        del self._entries[key]
        self._release(entry.source)
        # The entry's heap item goes stale and is skipped (or compacted) later.

    # -- reads ----------------------------------------------------------------------------

    def get_record(self, key: bytes) -> SignedRecord | None:
        """Return the live verified record stored under ``key``, or None (also for a ``key``
        that is not ``bytes``, so an untrusted key never raises)."""
        self.expire(self._clock())
        entry = self._entries.get(key) if type(key) is bytes else None
        return None if entry is None else entry.signed

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        """Return the live record bytes stored under ``key``, or ``default``."""
        signed = self.get_record(key)
        return default if signed is None else signed.data

    def __getitem__(self, key: bytes) -> bytes:
        """Return the live record bytes stored under ``key``.

        Raises:
            KeyError: if there is none (never stored, removed or expired).
        """
        signed = self.get_record(key)
        if signed is None:
            raise KeyError(key)
        return signed.data

    def __setitem__(self, key: bytes, value: bytes) -> None:
        """Store the node's own record (``offer`` with ``source_ip=None`` at ``clock()``).

        Raises:
            ValueError: if the record is refused for any reason (invalid, stale, or
                :data:`MAX_OWN_RECORDS` reached); the message says why.
        """
        result = self.offer_result(key, value, source_ip=None, now_ms=self._clock())
        if not result.accepted:
            reason = result.rejection.value if result.rejection else result.outcome.value
            raise ValueError(f"record refused ({reason}): {result.detail}")

    def __contains__(self, key: object) -> bool:
        self.expire(self._clock())
        return type(key) is bytes and key in self._entries

    def __len__(self) -> int:
        """The number of live records, own records included."""
        self.expire(self._clock())
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """Yield ``(key, value)`` for every live record (a snapshot taken at the call)."""
        self.expire(self._clock())
        return iter([(key, entry.signed.data) for key, entry in self._entries.items()])

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        """Return ``(key, value)`` of live records stored at least ``seconds_old`` seconds ago.

        "Stored" means stored, replaced, or last offered again unchanged; the caller
        republishes these. O(n) over stored records: call it once per republish round.
        """
        now = self._clock()
        self.expire(now)
        cutoff = now - seconds_old * 1000
        return [
            (key, entry.signed.data)
            for key, entry in self._entries.items()
            if entry.stored_at <= cutoff
        ]

    def keys_closer_to(self, node_long_id: int, own_long_id: int) -> list[bytes]:
        """Return the keys of live records that ``node_long_id`` is XOR-closer to than we are.

        Used when a new node joins: these are the records to hand it (Kademlia's store-on-join).
        Ids are 160-bit integers as ``kademlia.node.Node.long_id`` (big-endian). This is O(n)
        over stored keys: call it once per newly verified contact, never per packet.
        """
        self.expire(self._clock())
        closer = []
        for key in self._entries:
            point = int.from_bytes(key, "big")
            if point ^ node_long_id < point ^ own_long_id:
                closer.append(key)
        return closer

    def quota_used(self, source_ip: str) -> int:
        """Return how many keys stored here are charged to ``source_ip``'s quota source.

        Raises:
            ValueError: if ``source_ip`` is not an IP address literal.
        """
        return self._per_source.get(quota_source(source_ip), 0)
