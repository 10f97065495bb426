"""Reading and writing a node's keys in its home.

``identity.key`` holds the 32-byte Ed25519 seed. ``encryption.key`` holds the encryption keys,
newest first, each as ``[x25519 secret, certificate]`` in a canonical CBOR list. Both use the
:mod:`p2pnode.keyfile` format and share the passphrase's salt, so unlocking a node costs one
Argon2id run.

Existing key files are never overwritten by :func:`init_node`; a corrupt or unreadable one is
reported and left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

import nacl.bindings
import nacl.public
import nacl.signing

from p2pnode import codec
from p2pnode.codec import DecodeError, Field
from p2pnode.home import HomeError, NodeHome, check_private_file, write_private_file
from p2pnode.identity import (
    ENCRYPTION_KEY_LIFETIME_MS,
    EncryptionKey,
    EncryptionKeyCert,
    Identity,
)
from p2pnode.keyfile import (
    KeyFileError,
    Passphrase,
    encode_key_file,
    read_key_file,
    read_public_part,
)

log = logging.getLogger(__name__)

KIND_IDENTITY: Final = "identity"
KIND_ENCRYPTION: Final = "encryption"

#: At most this many encryption keys are kept (current plus those in their grace period).
MAX_ENCRYPTION_KEYS: Final = 16

_ENTRY: Final = Field(list, 2, 2)


@dataclass(frozen=True)
class InitResult:
    """What :func:`init_node` did: the node's identity and whether it was newly created."""

    identity: Identity
    created: bool


def init_node(home: NodeHome, passphrase: Passphrase | None, now_ms: int) -> InitResult:
    """Create a node in ``home``, or load the one that is already there.

    Keys are never replaced: if ``identity.key`` exists it is loaded (and any problem with it
    is raised, not papered over). A home left half-initialised by a crash (identity key but no
    encryption key) is completed.

    Raises:
        HomeError: for an unusable home, insecure permissions, or a corrupt key file.
        PassphraseError: for a missing or wrong passphrase on an existing node.
    """
    home.create()
    if home.identity_key.exists():
        if not home.encryption_key.exists():
            return InitResult(_complete_half_created(home, passphrase, now_ms), created=False)
        return InitResult(load_identity(home, passphrase, now_ms), created=False)
    if home.encryption_key.exists():
        raise HomeError(
            f"{home.path} has an encryption key but no identity key; it was not modified. "
            "Restore identity.key from a backup, or move the home aside and run init again."
        )
    identity = Identity.generate(now_ms)
    # The identity file is written first: a crash before the encryption key is written leaves
    # a home that the next init completes (see _complete_half_created).
    seed = bytes(identity.signing_key)
    write_private_file(
        home.identity_key,
        encode_key_file(KIND_IDENTITY, seed, passphrase, public=identity.public_key),
    )
    _write_encryption_keys(home, identity, passphrase)
    return InitResult(identity, created=True)


def _complete_half_created(home: NodeHome, passphrase: Passphrase | None, now_ms: int) -> Identity:
    check_private_file(home.identity_key)
    signing_key = _read_signing_key(home, passphrase)
    key = EncryptionKey.generate(signing_key, now_ms + ENCRYPTION_KEY_LIFETIME_MS)
    identity = Identity(signing_key, (key,))
    _write_encryption_keys(home, identity, passphrase)
    log.warning("%s had no encryption key (interrupted init?); created one", home.path)
    return identity


def _read_signing_key(home: NodeHome, passphrase: Passphrase | None) -> nacl.signing.SigningKey:
    seed = read_key_file(home.identity_key, KIND_IDENTITY, passphrase)
    if len(seed) != nacl.bindings.crypto_sign_SEEDBYTES:
        raise KeyFileError(
            f"key file {home.identity_key} is corrupt (bad seed length); it was not modified"
        )
    signing_key = nacl.signing.SigningKey(seed)
    public = read_public_part(home.identity_key, KIND_IDENTITY)
    if public is not None and public != bytes(signing_key.verify_key):
        raise KeyFileError(
            f"key file {home.identity_key} is corrupt (its public key does not match the "
            "secret key); it was not modified"
        )
    return signing_key


def read_identity_key(home: NodeHome) -> bytes:
    """Return the node's 32-byte identity public key without unlocking any secret.

    Raises:
        HomeError: if there is no node, the permissions are insecure or the file is corrupt.
    """
    home.check()
    try:
        check_private_file(home.identity_key)
    except FileNotFoundError:
        raise HomeError(
            f"no node in {home.path}; create one with: p2pnode init --home {home.path}"
        ) from None
    public = read_public_part(home.identity_key, KIND_IDENTITY)
    if public is None or len(public) != 32:
        raise KeyFileError(
            f"key file {home.identity_key} is corrupt (no public key); it was not modified"
        )
    return public


def load_identity(home: NodeHome, passphrase: Passphrase | None, now_ms: int) -> Identity:
    """Load the node in ``home``, rotating its encryption key if it is due.

    Raises:
        HomeError: if there is no node, the permissions are insecure, or a key file is corrupt.
        PassphraseError: for a missing or wrong passphrase.
    """
    home.check()
    for path in (home.identity_key, home.encryption_key):
        try:
            check_private_file(path)
        except FileNotFoundError:
            raise HomeError(
                f"{path} is missing; the node in {home.path} is incomplete. Restore it from a "
                "backup, or move the home aside and run: p2pnode init"
            ) from None
    signing_key = _read_signing_key(home, passphrase)
    payload = read_key_file(home.encryption_key, KIND_ENCRYPTION, passphrase)
    keys = _decode_encryption_keys(payload, bytes(signing_key.verify_key), home)
    identity = Identity(signing_key, keys)
    return rotate_if_due(home, identity, passphrase, now_ms) or identity


def rotate_if_due(
    home: NodeHome, identity: Identity, passphrase: Passphrase | None, now_ms: int
) -> Identity | None:
    """If ``identity``'s encryption key is due for rotation, rotate it and save the keys in
    ``home`` (written before the new key is used); returns the new identity, else None.

    Raises:
        OSError: if the key file cannot be written (nothing changed then).
    """
    if not identity.needs_rotation(now_ms):
        return None
    rotated = identity.rotated(now_ms)
    _write_encryption_keys(home, rotated, passphrase)
    log.info(
        "rotated the encryption key; the new one expires at %d",
        rotated.encryption_key.cert.expires,
    )
    return rotated


def _write_encryption_keys(
    home: NodeHome, identity: Identity, passphrase: Passphrase | None
) -> None:
    entries = [
        [bytes(key.private_key), key.cert.to_bytes()]
        for key in identity.encryption_keys[:MAX_ENCRYPTION_KEYS]
    ]
    payload = codec.encode(entries)
    write_private_file(home.encryption_key, encode_key_file(KIND_ENCRYPTION, payload, passphrase))


def _decode_encryption_keys(
    payload: bytes, identity_key: bytes, home: NodeHome
) -> tuple[EncryptionKey, ...]:
    path = home.encryption_key
    try:
        entries = codec.decode(payload)
        Field(list, 1, MAX_ENCRYPTION_KEYS, items=_ENTRY).check("keys", entries)
        keys = []
        for secret, cert_bytes in entries:
            Field(bytes, 32, 32).check("secret", secret)
            Field(bytes, 1, 1024).check("certificate", cert_bytes)
            cert = EncryptionKeyCert.from_bytes(cert_bytes)
            private_key = nacl.public.PrivateKey(secret)
            if bytes(private_key.public_key) != cert.public_key:
                raise DecodeError("secret does not match its certificate")
            if cert.identity_key != identity_key:
                raise DecodeError("certificate names another identity key")
            keys.append(EncryptionKey(private_key, cert))
    except DecodeError as exc:
        raise KeyFileError(
            f"key file {path} is corrupt ({exc.reason}); the file was not modified"
        ) from None
    return tuple(keys)
