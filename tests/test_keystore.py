"""Tests for a node's keys in its home: p2pnode.home, p2pnode.keyfile, p2pnode.keystore and the
key rotation rules of p2pnode.identity."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from nacl.pwhash import argon2id

from p2pnode import codec
from p2pnode.home import (
    HomeError,
    InsecurePermissionsError,
    NodeHome,
    write_private_file,
)
from p2pnode.identity import (
    DECRYPT_GRACE_MS,
    ENCRYPTION_KEY_LIFETIME_MS,
    ROTATE_BEFORE_EXPIRY_MS,
    EncryptionKey,
    EncryptionKeyCert,
    Identity,
)
from p2pnode.keyfile import KeyFileError, Passphrase, PassphraseError, encode_key_file
from p2pnode.keystore import (
    KIND_ENCRYPTION,
    KIND_IDENTITY,
    init_node,
    load_identity,
    read_identity_key,
)

NOW = 1_700_000_000_000  # a fixed "now" in milliseconds since the epoch


def fast_passphrase(secret: bytes) -> Passphrase:
    """A passphrase whose new files use libsodium's minimum Argon2id cost (tests stay fast)."""
    return Passphrase(secret, opslimit=argon2id.OPSLIMIT_MIN, memlimit=argon2id.MEMLIMIT_MIN)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (names, including temporary files) with its bytes."""
    return {entry.name: entry.read_bytes() for entry in directory.iterdir()}


def enc_publics(identity: Identity) -> list[bytes]:
    return [key.cert.public_key for key in identity.encryption_keys]


@pytest.fixture
def home(tmp_path: Path) -> NodeHome:
    """A node home path that does not exist yet."""
    return NodeHome(tmp_path / "node")


@pytest.fixture
def node(home: NodeHome) -> tuple[NodeHome, Identity]:
    """An initialised node without a passphrase."""
    return home, init_node(home, None, NOW).identity


@pytest.fixture
def kdf_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count Argon2id derivations (p2pnode.keyfile calls ``argon2id.kdf`` on this module)."""
    calls: list[int] = []
    real_kdf = argon2id.kdf

    def counting_kdf(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real_kdf(*args, **kwargs)

    monkeypatch.setattr(argon2id, "kdf", counting_kdf)
    return calls


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


# --- init_node --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000], indirect=True, ids=["umask022", "umask000"])
def test_init_creates_private_home_and_key_files_whatever_the_umask(
    home: NodeHome, umask: int
) -> None:
    result = init_node(home, None, NOW)

    assert result.created is True
    assert mode_of(home.path) == 0o700
    assert mode_of(home.identity_key) == 0o600
    assert mode_of(home.encryption_key) == 0o600
    assert sorted(p.name for p in home.path.iterdir()) == ["encryption.key", "identity.key"]


def test_init_creates_missing_parent_directories(tmp_path: Path) -> None:
    home = NodeHome(tmp_path / "a" / "b" / "node")
    assert init_node(home, None, NOW).created is True
    assert load_identity(home, None, NOW).public_key == read_identity_key(home)


def test_second_init_keeps_the_existing_node_byte_for_byte(
    node: tuple[NodeHome, Identity],
) -> None:
    home, identity = node
    before = snapshot(home.path)

    again = init_node(home, None, NOW + 1000)

    assert again.created is False
    assert again.identity.public_key == identity.public_key
    assert again.identity.node_id == identity.node_id
    assert snapshot(home.path) == before


def test_load_identity_round_trips_the_keys(node: tuple[NodeHome, Identity]) -> None:
    home, identity = node

    loaded = load_identity(home, None, NOW)

    assert loaded.public_key == identity.public_key
    assert bytes(loaded.signing_key) == bytes(identity.signing_key)
    assert bytes(loaded.encryption_key.private_key) == bytes(identity.encryption_key.private_key)
    assert loaded.encryption_key.cert == identity.encryption_key.cert
    cert = EncryptionKeyCert.from_bytes(loaded.encryption_key.cert.to_bytes())
    assert cert.identity_key == identity.public_key
    assert cert.public_key == bytes(identity.encryption_key.private_key.public_key)
    assert cert.expires == NOW + ENCRYPTION_KEY_LIFETIME_MS
    assert cert.valid_at(NOW)


def test_read_identity_key_matches_the_node_id(node: tuple[NodeHome, Identity]) -> None:
    home, identity = node
    assert read_identity_key(home) == identity.public_key


# --- permissions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "mode"),
    [("identity_key", 0o644), ("encryption_key", 0o640), ("identity_key", 0o604)],
)
def test_key_file_readable_by_others_is_refused_with_the_chmod(
    node: tuple[NodeHome, Identity], which: str, mode: int
) -> None:
    home, _ = node
    path: Path = getattr(home, which)
    os.chmod(path, mode)

    for attempt in (
        lambda: load_identity(home, None, NOW),
        lambda: init_node(home, None, NOW),
    ):
        with pytest.raises(InsecurePermissionsError) as excinfo:
            attempt()
        message = str(excinfo.value)
        assert str(path) in message
        assert f"chmod 600 {path}" in message
    assert mode_of(path) == mode  # reported, not silently "fixed"


def test_id_refuses_identity_key_readable_by_others(node: tuple[NodeHome, Identity]) -> None:
    home, _ = node
    os.chmod(home.identity_key, 0o644)
    with pytest.raises(InsecurePermissionsError, match="chmod 600"):
        read_identity_key(home)


@pytest.mark.parametrize("mode", [0o755, 0o710, 0o701])
def test_home_accessible_to_others_is_refused_with_the_chmod(
    node: tuple[NodeHome, Identity], mode: int
) -> None:
    home, _ = node
    os.chmod(home.path, mode)

    for attempt in (
        lambda: load_identity(home, None, NOW),
        lambda: init_node(home, None, NOW),
        lambda: read_identity_key(home),
    ):
        with pytest.raises(InsecurePermissionsError) as excinfo:
            attempt()
        assert f"chmod 700 {home.path}" in str(excinfo.value)


def test_init_refuses_an_existing_empty_home_accessible_to_others(home: NodeHome) -> None:
    home.path.mkdir(mode=0o755)
    os.chmod(home.path, 0o755)
    with pytest.raises(InsecurePermissionsError, match="chmod 700"):
        init_node(home, None, NOW)
    assert list(home.path.iterdir()) == []


def test_home_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node"
    path.write_bytes(b"not a directory")
    with pytest.raises(HomeError, match="not a directory"):
        init_node(NodeHome(path), None, NOW)
    assert path.read_bytes() == b"not a directory"


def test_missing_home_tells_the_user_to_run_init(home: NodeHome) -> None:
    for attempt in (lambda: load_identity(home, None, NOW), lambda: read_identity_key(home)):
        with pytest.raises(HomeError, match="p2pnode init"):
            attempt()
    assert not home.path.exists()


# --- passphrase -------------------------------------------------------------------------------


@pytest.fixture
def protected_node(home: NodeHome) -> tuple[NodeHome, Identity]:
    return home, init_node(home, fast_passphrase(b"correct horse"), NOW).identity


def test_passphrase_right_one_unlocks_the_keys(
    protected_node: tuple[NodeHome, Identity],
) -> None:
    home, identity = protected_node

    loaded = load_identity(home, fast_passphrase(b"correct horse"), NOW)

    assert loaded.public_key == identity.public_key
    assert bytes(loaded.encryption_key.private_key) == bytes(identity.encryption_key.private_key)


def test_passphrase_wrong_one_is_refused(protected_node: tuple[NodeHome, Identity]) -> None:
    home, _ = protected_node
    before = snapshot(home.path)

    for attempt in (
        lambda: load_identity(home, fast_passphrase(b"battery staple"), NOW),
        lambda: init_node(home, fast_passphrase(b"battery staple"), NOW),
    ):
        with pytest.raises(PassphraseError, match="wrong passphrase"):
            attempt()
    assert snapshot(home.path) == before


def test_passphrase_missing_says_how_to_give_it(
    protected_node: tuple[NodeHome, Identity],
) -> None:
    home, _ = protected_node

    with pytest.raises(PassphraseError) as excinfo:
        load_identity(home, None, NOW)

    assert "--passphrase-file" in str(excinfo.value)
    assert "P2PNODE_PASSPHRASE" in str(excinfo.value)


def test_passphrase_protected_files_do_not_contain_the_secrets(
    protected_node: tuple[NodeHome, Identity],
) -> None:
    home, identity = protected_node
    identity_file = home.identity_key.read_bytes()
    encryption_file = home.encryption_key.read_bytes()

    assert bytes(identity.signing_key) not in identity_file
    assert bytes(identity.encryption_key.private_key) not in encryption_file
    # ... whereas an unprotected file does hold the seed, so the check above can fail.
    plain = NodeHome(home.path.parent / "plain")
    plain_identity = init_node(plain, None, NOW).identity
    assert bytes(plain_identity.signing_key) in plain.identity_key.read_bytes()


def test_unlocking_both_key_files_costs_one_argon2id_derivation(
    protected_node: tuple[NodeHome, Identity], kdf_calls: list[int]
) -> None:
    home, identity = protected_node

    loaded = load_identity(home, fast_passphrase(b"correct horse"), NOW)

    assert loaded.public_key == identity.public_key
    assert len(kdf_calls) == 1


def test_init_with_passphrase_costs_one_argon2id_derivation(
    home: NodeHome, kdf_calls: list[int]
) -> None:
    init_node(home, fast_passphrase(b"correct horse"), NOW)
    assert len(kdf_calls) == 1


def test_read_identity_key_needs_no_passphrase(
    protected_node: tuple[NodeHome, Identity], kdf_calls: list[int]
) -> None:
    home, identity = protected_node
    assert read_identity_key(home) == identity.public_key
    assert kdf_calls == []


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(PassphraseError, match="empty"):
        Passphrase(b"")


# --- corrupt key files ------------------------------------------------------------------------


def _garbage(path: Path, identity: Identity) -> bytes:
    return b"\x00\xffthis is not a key file\n" * 3


def _truncated(path: Path, identity: Identity) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


def _wrong_field_type(path: Path, identity: Identity) -> bytes:
    kind = KIND_IDENTITY if path.name == "identity.key" else KIND_ENCRYPTION
    # A well-formed canonical CBOR map whose payload is a text string instead of bytes.
    return codec.encode({"v": 1, "kind": kind, "protection": "none", "payload": "x" * 32})


def _cert_from_another_identity(path: Path, identity: Identity) -> bytes:
    other = nacl.signing.SigningKey.generate()
    key = EncryptionKey.generate(other, NOW + ENCRYPTION_KEY_LIFETIME_MS)
    payload = codec.encode([[bytes(key.private_key), key.cert.to_bytes()]])
    return encode_key_file(KIND_ENCRYPTION, payload, None)


def _cert_that_does_not_match_its_secret(path: Path, identity: Identity) -> bytes:
    stranger = EncryptionKey.generate(identity.signing_key, NOW + ENCRYPTION_KEY_LIFETIME_MS)
    payload = codec.encode([[bytes(stranger.private_key), identity.encryption_key.cert.to_bytes()]])
    return encode_key_file(KIND_ENCRYPTION, payload, None)


CORRUPTIONS: list[tuple[str, Callable[[Path, Identity], bytes]]] = [
    ("identity_key", _garbage),
    ("identity_key", _truncated),
    ("identity_key", _wrong_field_type),
    ("encryption_key", _garbage),
    ("encryption_key", _truncated),
    ("encryption_key", _wrong_field_type),
    ("encryption_key", _cert_from_another_identity),
    ("encryption_key", _cert_that_does_not_match_its_secret),
]


@pytest.mark.parametrize(
    ("which", "corrupt"),
    CORRUPTIONS,
    ids=[f"{which}-{corrupt.__name__.strip('_')}" for which, corrupt in CORRUPTIONS],
)
def test_corrupt_key_file_is_reported_and_never_overwritten(
    node: tuple[NodeHome, Identity],
    which: str,
    corrupt: Callable[[Path, Identity], bytes],
) -> None:
    home, identity = node
    path: Path = getattr(home, which)
    path.write_bytes(corrupt(path, identity))  # keeps mode 0600
    before = snapshot(home.path)

    for attempt in (
        lambda: load_identity(home, None, NOW),
        lambda: init_node(home, None, NOW),
        # late enough that a loadable node would rotate, i.e. rewrite encryption.key
        lambda: load_identity(home, None, NOW + ENCRYPTION_KEY_LIFETIME_MS),
    ):
        with pytest.raises(KeyFileError) as excinfo:
            attempt()
        message = str(excinfo.value)
        assert str(path) in message
        assert "corrupt" in message
        assert snapshot(home.path) == before


@pytest.mark.parametrize("corrupt", [_garbage, _truncated, _wrong_field_type])
def test_id_reports_a_corrupt_identity_key(
    node: tuple[NodeHome, Identity], corrupt: Callable[[Path, Identity], bytes]
) -> None:
    home, identity = node
    home.identity_key.write_bytes(corrupt(home.identity_key, identity))
    with pytest.raises(KeyFileError) as excinfo:
        read_identity_key(home)
    assert str(home.identity_key) in str(excinfo.value)
    assert "corrupt" in str(excinfo.value)


def test_swapped_key_files_are_refused(node: tuple[NodeHome, Identity]) -> None:
    home, _ = node
    identity_bytes = home.identity_key.read_bytes()
    home.identity_key.write_bytes(home.encryption_key.read_bytes())
    home.encryption_key.write_bytes(identity_bytes)
    before = snapshot(home.path)

    with pytest.raises(KeyFileError, match="expected 'identity'"):
        load_identity(home, None, NOW)
    with pytest.raises(KeyFileError, match="expected 'identity'"):
        read_identity_key(home)
    assert snapshot(home.path) == before


def test_identity_key_whose_clear_public_key_was_altered_is_refused(
    node: tuple[NodeHome, Identity],
) -> None:
    home, identity = node
    impostor = nacl.signing.SigningKey.generate()
    write_private_file(
        home.identity_key,
        encode_key_file(
            KIND_IDENTITY, bytes(identity.signing_key), None, public=bytes(impostor.verify_key)
        ),
    )
    with pytest.raises(KeyFileError, match="does not match"):
        load_identity(home, None, NOW)


# --- half-created homes -----------------------------------------------------------------------


def test_init_completes_a_home_with_only_an_identity_key(
    node: tuple[NodeHome, Identity],
) -> None:
    home, identity = node
    identity_file = home.identity_key.read_bytes()
    home.encryption_key.unlink()

    result = init_node(home, None, NOW)

    assert result.created is False
    assert result.identity.public_key == identity.public_key
    assert home.identity_key.read_bytes() == identity_file
    assert mode_of(home.encryption_key) == 0o600
    loaded = load_identity(home, None, NOW)
    assert loaded.public_key == identity.public_key
    assert enc_publics(loaded) == enc_publics(result.identity)


def test_init_completes_a_protected_home_sharing_one_derivation(
    protected_node: tuple[NodeHome, Identity], kdf_calls: list[int]
) -> None:
    home, identity = protected_node
    home.encryption_key.unlink()

    init_node(home, fast_passphrase(b"correct horse"), NOW)
    kdf_calls.clear()
    loaded = load_identity(home, fast_passphrase(b"correct horse"), NOW)

    assert loaded.public_key == identity.public_key
    assert len(kdf_calls) == 1
    assert bytes(loaded.encryption_key.private_key) not in home.encryption_key.read_bytes()


def test_init_does_not_complete_a_home_whose_identity_key_is_corrupt(
    node: tuple[NodeHome, Identity],
) -> None:
    home, _ = node
    home.encryption_key.unlink()
    home.identity_key.write_bytes(b"garbage")

    with pytest.raises(KeyFileError, match="corrupt"):
        init_node(home, None, NOW)
    assert snapshot(home.path) == {"identity.key": b"garbage"}


def test_init_refuses_a_home_with_only_an_encryption_key(
    node: tuple[NodeHome, Identity],
) -> None:
    home, _ = node
    home.identity_key.unlink()
    before = snapshot(home.path)

    with pytest.raises(HomeError) as excinfo:
        init_node(home, None, NOW)

    assert "no identity key" in str(excinfo.value)
    assert snapshot(home.path) == before


def test_load_reports_a_missing_encryption_key(node: tuple[NodeHome, Identity]) -> None:
    home, _ = node
    home.encryption_key.unlink()
    with pytest.raises(HomeError, match=r"encryption\.key is missing"):
        load_identity(home, None, NOW)
    assert not home.encryption_key.exists()


# --- rotation ---------------------------------------------------------------------------------


def test_load_rotates_the_encryption_key_when_due_and_persists_it(
    node: tuple[NodeHome, Identity],
) -> None:
    home, identity = node
    old = identity.encryption_key
    identity_file = home.identity_key.read_bytes()
    now = old.cert.expires - ROTATE_BEFORE_EXPIRY_MS + 1

    rotated = load_identity(home, None, now)

    assert rotated.public_key == identity.public_key
    assert rotated.encryption_key.cert.public_key != old.cert.public_key
    assert rotated.encryption_key.cert.expires == now + ENCRYPTION_KEY_LIFETIME_MS
    assert rotated.encryption_key.cert.identity_key == identity.public_key
    assert bytes(old.private_key) in [bytes(k) for k in rotated.decryption_keys(now)]
    assert home.identity_key.read_bytes() == identity_file
    assert mode_of(home.encryption_key) == 0o600

    reloaded = load_identity(home, None, now)
    assert enc_publics(reloaded) == enc_publics(rotated)
    assert len(reloaded.encryption_keys) == 2


def test_load_does_not_rewrite_keys_that_are_not_due(node: tuple[NodeHome, Identity]) -> None:
    home, identity = node
    before = snapshot(home.path)
    now = identity.encryption_key.cert.expires - ROTATE_BEFORE_EXPIRY_MS

    loaded = load_identity(home, None, now)

    assert enc_publics(loaded) == enc_publics(identity)
    assert snapshot(home.path) == before


def test_rotation_of_a_protected_node_keeps_it_protected(
    protected_node: tuple[NodeHome, Identity], kdf_calls: list[int]
) -> None:
    home, identity = protected_node
    now = identity.encryption_key.cert.expires

    rotated = load_identity(home, fast_passphrase(b"correct horse"), now)
    assert bytes(rotated.encryption_key.private_key) not in home.encryption_key.read_bytes()
    with pytest.raises(PassphraseError):
        load_identity(home, None, now)
    kdf_calls.clear()
    reloaded = load_identity(home, fast_passphrase(b"correct horse"), now)

    assert enc_publics(reloaded) == enc_publics(rotated)
    assert len(kdf_calls) == 1  # the rewritten file still shares the identity file's salt


def test_rotated_keeps_old_keys_only_through_their_grace_period() -> None:
    identity = Identity.generate(NOW)
    old = identity.encryption_key
    last_useful = old.cert.expires + DECRYPT_GRACE_MS - 1

    kept = identity.rotated(last_useful)
    dropped = identity.rotated(last_useful + 1)

    assert enc_publics(kept)[1:] == [old.cert.public_key]
    assert bytes(old.private_key) in [bytes(k) for k in kept.decryption_keys(last_useful)]
    assert len(dropped.encryption_keys) == 1
    assert dropped.encryption_key.cert.public_key != old.cert.public_key
    assert bytes(old.private_key) not in [
        bytes(k) for k in dropped.decryption_keys(last_useful + 1)
    ]


def test_repeated_rotation_drops_only_keys_past_their_grace() -> None:
    first = Identity.generate(NOW)
    second = first.rotated(NOW + ENCRYPTION_KEY_LIFETIME_MS - ROTATE_BEFORE_EXPIRY_MS)
    later = second.encryption_key.cert.expires - ROTATE_BEFORE_EXPIRY_MS
    # first's key expired at NOW + 30 days, far more than the 7-day grace before `later`.
    assert later > first.encryption_key.cert.expires + DECRYPT_GRACE_MS

    third = second.rotated(later)

    assert enc_publics(third)[1:] == [second.encryption_key.cert.public_key]


def test_identity_refuses_an_encryption_key_certified_by_another_identity() -> None:
    mine = nacl.signing.SigningKey.generate()
    theirs = EncryptionKey.generate(nacl.signing.SigningKey.generate(), NOW + 1000)
    with pytest.raises(ValueError, match="another identity"):
        Identity(mine, (theirs,))


# --- write_private_file -----------------------------------------------------------------------


def test_write_private_file_replaces_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)

    write_private_file(path, b"new")

    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_write_private_file_failure_leaves_the_original_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret"
    write_private_file(path, b"original")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_private_file(path, b"replacement")

    assert path.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]


def test_write_private_file_survives_a_stale_temp_file_from_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "encryption.key"
    path.write_bytes(b"old")
    stale = tmp_path / f".encryption.key.{os.getpid()}.tmp"
    stale.write_bytes(b"half-written by a process that crashed")

    write_private_file(path, b"new")

    assert path.read_bytes() == b"new"
