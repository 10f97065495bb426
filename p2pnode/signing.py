"""Domain-separated Ed25519 signatures.

Every signature p2pnode makes covers ``tag || message`` where ``tag`` is one of the distinct
ASCII domain strings below, so a signature made for one purpose (a peer record, say) can never
be replayed as another (a message or a receipt). All primitives come from libsodium via PyNaCl.
"""

from __future__ import annotations

from typing import Final

import nacl.exceptions
import nacl.signing

#: Signature over an encryption-key certificate: the identity key vouches for its X25519 key.
TAG_ENCRYPTION_KEY: Final = b"p2pnode/xk/v1"
#: Signature over a peer record published in the DHT.
TAG_RECORD: Final = b"p2pnode/record/v1"
#: Responder's and initiator's signatures over the link handshake transcript.
TAG_LINK_RESPONDER: Final = b"p2pnode/link/resp/v1"
TAG_LINK_INITIATOR: Final = b"p2pnode/link/init/v1"
#: Sender's signature over a message envelope's inner structure.
TAG_MESSAGE: Final = b"p2pnode/msg/v1"
#: Recipient's signature over a delivery receipt.
TAG_RECEIPT: Final = b"p2pnode/receipt/v1"

ALL_TAGS: Final = (
    TAG_ENCRYPTION_KEY,
    TAG_RECORD,
    TAG_LINK_RESPONDER,
    TAG_LINK_INITIATOR,
    TAG_MESSAGE,
    TAG_RECEIPT,
)

PUBLIC_KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64


def sign(key: nacl.signing.SigningKey, tag: bytes, message: bytes) -> bytes:
    """Return the 64-byte Ed25519 signature of ``tag || message`` by ``key``."""
    return key.sign(tag + message).signature


def verify(public_key: bytes, tag: bytes, message: bytes, signature: bytes) -> bool:
    """Tell whether ``signature`` is a valid signature of ``tag || message`` by ``public_key``.

    Returns ``False`` (never raises) for a wrong signature, a malformed key or a malformed
    signature, since all three come from peers.
    """
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(tag + message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        return False
    return True
