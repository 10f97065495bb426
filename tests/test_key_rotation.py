"""A long-running node rotates its encryption key when due, and keeps reading old-key messages."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pnode.daemon import KEY_ROTATION_CHECK_INTERVAL, keep_encryption_key_fresh
from p2pnode.home import NodeHome
from p2pnode.identity import DAY_MS, ENCRYPTION_KEY_LIFETIME_MS, ROTATE_BEFORE_EXPIRY_MS, Identity
from p2pnode.keystore import init_node, load_identity

T0 = 1_700_000_000_000


def test_a_running_node_rotates_its_key_when_due_and_saves_it_first(tmp_path: Path) -> None:
    home = NodeHome(tmp_path / "node")
    init_node(home, None, T0)
    identity = load_identity(home, None, T0)
    rotations: list[tuple[int, Identity]] = []

    def wall() -> int:
        return T0 + int(trio.current_time() * 1000)

    def on_rotated(rotated: Identity) -> None:
        # Saved before it is used: a restart now would load exactly this key.
        on_disk = load_identity(home, None, wall())
        assert on_disk.encryption_key.cert == rotated.encryption_key.cert
        rotations.append((wall(), rotated))

    second_rotation = trio.Event()

    def on_rotated_twice(rotated: Identity) -> None:
        on_rotated(rotated)
        if len(rotations) == 2:
            second_rotation.set()

    async def scenario() -> None:
        # Waiting on an event (no deadline of its own) lets the mock clock jump only to the
        # rotation loop's checks, and never while a key file is being written in a thread.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    keep_encryption_key_fresh, home, None, identity, on_rotated_twice, clock=wall
                )
            )
            await second_rotation.wait()
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    due = ENCRYPTION_KEY_LIFETIME_MS - ROTATE_BEFORE_EXPIRY_MS  # 20 days after creation
    (first_at, first), (second_at, second) = rotations
    assert T0 + due <= first_at <= T0 + due + KEY_ROTATION_CHECK_INTERVAL * 1000
    assert first.encryption_key.cert != identity.encryption_key.cert
    assert first.public_key == identity.public_key
    # Messages sealed to the old key (by senders with its record) still open.
    old = bytes(identity.encryption_key.private_key)
    assert old in [bytes(k) for k in first.decryption_keys(first_at)]
    # And the next rotation comes 20 days after the first, from the rotated identity.
    assert second_at - first_at == pytest.approx(due, abs=KEY_ROTATION_CHECK_INTERVAL * 1000)
    assert second.encryption_key.cert != first.encryption_key.cert
    assert second_at - T0 < 41 * DAY_MS
