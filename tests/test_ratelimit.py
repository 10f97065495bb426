"""Token buckets: bursts, sustained rate, and a wait that always ends with the token."""

from __future__ import annotations

import random

import pytest

from p2pnode.ratelimit import KeyedLimiter, TokenBucket


def test_a_bucket_grants_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0)
    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(100.0) == pytest.approx(0.1)
    assert not bucket.try_take(100.05)
    assert bucket.try_take(100.1)
    # Refilling stops at the burst.
    assert [bucket.try_take(1000.0) for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("seed", range(20))
def test_waiting_the_computed_time_always_gets_the_token(seed: int) -> None:
    rng = random.Random(seed)
    rate = rng.choice([3.0, 5.0, 7.0, 5000.0, 12345.678])
    bucket = TokenBucket(rate=rate, burst=rng.choice([1.0, 10.0]))
    now = rng.uniform(0, 1e5)
    while bucket.try_take(now):  # drain it
        pass
    for _ in range(500):
        now += bucket.wait_time(now)
        assert bucket.try_take(now), (rate, now)
        assert bucket.tokens >= 0.0


def test_a_limiter_forgets_the_least_recently_used_key() -> None:
    limiter = KeyedLimiter(rate=1.0, burst=1.0, max_keys=2)
    assert limiter.try_take("a", 0.0)
    assert limiter.try_take("b", 0.0)
    assert not limiter.try_take("a", 0.0)  # "a" is now the most recently used
    assert limiter.try_take("c", 0.0)  # evicts "b"
    assert limiter.try_take("b", 0.0)  # a fresh, full bucket
    assert not limiter.try_take("c", 0.0)
