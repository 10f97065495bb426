"""A node's keys: a long-term Ed25519 identity key and rotating X25519 encryption keys.

The identity key never encrypts anything: it signs. Each X25519 encryption key carries a
certificate, signed by the identity key, that names its expiry (libsodium's FAQ advises distinct
key pairs over converting Ed25519 keys). Senders seal to the current encryption key; the node
keeps each older key until :data:`DECRYPT_GRACE_MS` after its expiry so that messages sealed to
it while it was current can still be opened.

This module is pure: times come in as integer milliseconds since the epoch. Reading and writing
keys in a node home is :mod:`p2pnode.keystore`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import nacl.public
import nacl.signing

from p2pnode import codec, signing
from p2pnode.codec import DecodeError, Field
from p2pnode.nodeid import NodeId

DAY_MS: Final = 24 * 60 * 60 * 1000

#: Lifetime of a new encryption key. Thirty days bounds how long a stolen encryption key opens
#: new messages, while the identity key (and so the node ID) stays the same.
ENCRYPTION_KEY_LIFETIME_MS: Final = 30 * DAY_MS

#: A key is replaced when less than this much of its lifetime remains, so that peers see the
#: new key in the node's record well before the old one expires.
ROTATE_BEFORE_EXPIRY_MS: Final = 10 * DAY_MS

#: How long past its expiry a key still opens messages: a sender may have sealed to it just
#: before it expired and kept retrying; matches the outbox's default delivery expiry (7 days).
DECRYPT_GRACE_MS: Final = 7 * DAY_MS

#: A certificate claiming to be valid for longer than this is refused as absurd.
MAX_CERT_LIFETIME_MS: Final = 400 * DAY_MS

_CERT_VERSION: Final = 1
_CERT_SCHEMA: Final = {
    "v": Field(int, min_value=_CERT_VERSION, max_value=_CERT_VERSION),
    "ik": Field(bytes, 32, 32),
    "xk": Field(bytes, 32, 32),
    "expires": Field(int, min_value=0, max_value=2**63 - 1),
}
#: Encoded certificate size bound: a 3-field map of two 32-byte keys plus a signature.
MAX_CERT_SIZE: Final = 256


@dataclass(frozen=True)
class EncryptionKeyCert:
    """The identity key's signed statement that ``public_key`` is its X25519 key until
    ``expires`` (milliseconds since the epoch)."""

    identity_key: bytes
    public_key: bytes
    expires: int
    signature: bytes

    @property
    def body(self) -> bytes:
        """The canonical CBOR that the signature covers (after the domain tag)."""
        return codec.encode(
            {
                "v": _CERT_VERSION,
                "ik": self.identity_key,
                "xk": self.public_key,
                "expires": self.expires,
            }
        )

    @classmethod
    def issue(
        cls, signing_key: nacl.signing.SigningKey, public_key: bytes, expires: int
    ) -> EncryptionKeyCert:
        """Sign a certificate for ``public_key`` with ``signing_key``."""
        unsigned = cls(bytes(signing_key.verify_key), public_key, expires, b"")
        signature = signing.sign(signing_key, signing.TAG_ENCRYPTION_KEY, unsigned.body)
        return cls(unsigned.identity_key, public_key, expires, signature)

    def to_bytes(self) -> bytes:
        """Encode as a signed pair ``[body, signature]``."""
        return codec.encode([self.body, self.signature])

    @classmethod
    def from_bytes(cls, data: bytes) -> EncryptionKeyCert:
        """Decode and verify a certificate.

        Raises:
            DecodeError: if it is malformed or its signature does not verify under the
                identity key it names. Expiry is not checked here (see :meth:`valid_at`).
        """
        body, signature = codec.decode_signed(
            data, what="encryption key certificate", max_body=MAX_CERT_SIZE
        )
        fields = codec.decode_map(body, _CERT_SCHEMA, what="encryption key certificate")
        if not signing.verify(fields["ik"], signing.TAG_ENCRYPTION_KEY, body, signature):
            raise DecodeError("encryption key certificate: bad signature")
        return cls(fields["ik"], fields["xk"], fields["expires"], signature)

    def valid_at(self, now_ms: int) -> bool:
        """True if unexpired at ``now_ms`` and not claiming an absurdly long life."""
        return now_ms < self.expires <= now_ms + MAX_CERT_LIFETIME_MS


@dataclass(frozen=True)
class EncryptionKey:
    """An X25519 key pair with its certificate."""

    private_key: nacl.public.PrivateKey
    cert: EncryptionKeyCert

    @classmethod
    def generate(cls, signing_key: nacl.signing.SigningKey, expires: int) -> EncryptionKey:
        """Make a fresh key pair, certified by ``signing_key`` until ``expires``."""
        private_key = nacl.public.PrivateKey.generate()
        cert = EncryptionKeyCert.issue(signing_key, bytes(private_key.public_key), expires)
        return cls(private_key, cert)


@dataclass(frozen=True)
class Identity:
    """A node's secret keys: the identity signing key and its encryption keys, newest first.

    Invariant: ``encryption_keys`` is non-empty and every certificate names this identity key.
    """

    signing_key: nacl.signing.SigningKey
    encryption_keys: tuple[EncryptionKey, ...]

    def __post_init__(self) -> None:
        if not self.encryption_keys:
            raise ValueError("an identity needs at least one encryption key")
        for key in self.encryption_keys:
            if key.cert.identity_key != self.public_key:
                raise ValueError("encryption key certificate names another identity")

    @classmethod
    def generate(cls, now_ms: int) -> Identity:
        """Create a new identity with one encryption key valid for the default lifetime."""
        signing_key = nacl.signing.SigningKey.generate()
        key = EncryptionKey.generate(signing_key, now_ms + ENCRYPTION_KEY_LIFETIME_MS)
        return cls(signing_key, (key,))

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 identity public key (``IK``)."""
        return bytes(self.signing_key.verify_key)

    @property
    def node_id(self) -> NodeId:
        """The human-readable ID of this node."""
        return NodeId.from_key(self.public_key)

    @property
    def encryption_key(self) -> EncryptionKey:
        """The current (newest) encryption key, the one peers should seal to."""
        return self.encryption_keys[0]

    def decryption_keys(self, now_ms: int) -> Sequence[nacl.public.PrivateKey]:
        """Private keys that may open a message at ``now_ms``: unexpired ones, and expired
        ones still within :data:`DECRYPT_GRACE_MS`. Newest first; never empty (the current key
        is always included, so a node whose keys all lapsed still reads what it is sent until
        it rotates)."""
        usable = [
            key.private_key
            for key in self.encryption_keys
            if now_ms < key.cert.expires + DECRYPT_GRACE_MS
        ]
        return usable or [self.encryption_key.private_key]

    def needs_rotation(self, now_ms: int) -> bool:
        """True when the current encryption key has less than :data:`ROTATE_BEFORE_EXPIRY_MS`
        left."""
        return self.encryption_key.cert.expires - now_ms < ROTATE_BEFORE_EXPIRY_MS

    def rotated(self, now_ms: int) -> Identity:
        """Return this identity with a new current encryption key, keeping older keys only while
        they can still open messages (see :meth:`decryption_keys`)."""
        new_key = EncryptionKey.generate(self.signing_key, now_ms + ENCRYPTION_KEY_LIFETIME_MS)
        kept = tuple(
            key for key in self.encryption_keys if now_ms < key.cert.expires + DECRYPT_GRACE_MS
        )
        return Identity(self.signing_key, (new_key, *kept))
