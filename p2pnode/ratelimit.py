"""Token buckets: how p2pnode says "this much, this often" to peers.

Pure: the caller passes the time in (seconds, any monotonic clock).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

#: Buckets a :class:`KeyedLimiter` remembers; the least recently used is forgotten beyond this,
#: so a peer cycling through addresses cannot grow our memory.
MAX_TRACKED_KEYS: Final = 4096
#: Tokens a bucket may be short of ``amount`` and still grant it: refilling in floating point
#: can leave it a hair under a whole token at exactly the time :meth:`TokenBucket.wait_time`
#: named, and a caller that waited that long must then get its token.
ROUNDING_TOLERANCE: Final = 1e-6


@dataclass
class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    rate: float
    burst: float
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if self.updated is not None and now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now if self.updated is None else max(self.updated, now)

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if there are enough; True if taken. After waiting
        :meth:`wait_time` seconds (and nothing else taking tokens) this succeeds."""
        self._refill(now)
        if self.tokens >= amount - ROUNDING_TOLERANCE:
            self.tokens = max(0.0, self.tokens - amount)
            return True
        return False

    def wait_time(self, now: float, amount: float = 1.0) -> float:
        """Seconds until ``amount`` tokens are available (0 if they are now)."""
        self._refill(now)
        missing = amount - self.tokens
        return 0.0 if missing <= ROUNDING_TOLERANCE else missing / self.rate


class KeyedLimiter:
    """One :class:`TokenBucket` per key (a peer, a source address), with bounded memory."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = MAX_TRACKED_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[object, TokenBucket] = OrderedDict()

    def bucket(self, key: object) -> TokenBucket:
        """The bucket for ``key`` (a new, full one if it was not tracked)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def try_take(self, key: object, now: float, amount: float = 1.0) -> bool:
        """Take from ``key``'s bucket; True if allowed."""
        return self.bucket(key).try_take(now, amount)
