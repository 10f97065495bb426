"""Message envelopes and receipts: sign-then-seal, bound to the recipient.

A message is built as (GUIDE section 3a)::

    inner  = {v, kind: "msg", id, from: IK_S, to: IK_R, ts, body}
    signed = [canonical(inner), S_S("p2pnode/msg/v1" || canonical(inner))]
    wire   = crypto_box_seal(pad(canonical(signed)), XK_R)

The recipient's identity key is inside the signed part, so a recipient cannot re-seal a message
it received to a third party and pass it off as sent to them (Davis, "Defective Sign & Encrypt",
2001). Padding (libsodium's ISO/IEC 7816-4 ``sodium_pad``) rounds the plaintext up to a power of
two, so the wire size says little about the body's size.

A receipt ``{v, kind: "receipt", ids: [id, ...], from: IK_R, to: IK_S, ts}`` is signed by the
recipient with ``"p2pnode/receipt/v1"`` and travels inside the (already encrypted) link. It names
every message of one sender that one durable commit stored (GUIDE section 3 names a single
``id``; a list keeps the promise per message and costs one signature per commit instead of one
per message).

Everything here is pure: the caller passes the time in, as integer milliseconds since the epoch.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils

from p2pnode import codec, signing
from p2pnode.codec import DecodeError, Field

ENVELOPE_VERSION: Final = 1
MESSAGE_ID_SIZE: Final = 16
KEY_SIZE: Final = 32

#: Largest message body. 63 KiB leaves room for the envelope's own fields (about 200 bytes) so
#: that the largest message still fits the 64 KiB padding bucket.
MAX_BODY_SIZE: Final = 63 * 1024

#: Padded plaintext sizes: powers of two from 256 bytes to 64 KiB.
MIN_PADDED_SIZE: Final = 256
MAX_PADDED_SIZE: Final = 64 * 1024

#: Largest sealed envelope: the largest bucket plus the sealed box's ephemeral key and MAC.
MAX_WIRE_SIZE: Final = MAX_PADDED_SIZE + nacl.bindings.crypto_box_SEALBYTES

#: Accepted difference between a sender's timestamp and the receiver's clock, either way.
#: Five minutes, as Kerberos allows, tolerates unsynchronised clocks while bounding how long a
#: captured envelope is worth replaying to a node that has pruned its seen-id table.
DEFAULT_CLOCK_WINDOW_MS: Final = 5 * 60 * 1000

#: Message ids one receipt may acknowledge. The receiver acknowledges everything one group
#: commit stored for a peer with one signature (a signature per message would cost the
#: receiver a signing and the sender a verification each: about a third of the crypto per
#: delivered message); 256 ids keep a receipt within 5 KiB.
MAX_RECEIPT_IDS: Final = 256
#: A receipt: a 5-field map with up to :data:`MAX_RECEIPT_IDS` ids (17 bytes each encoded),
#: and a signature.
MAX_RECEIPT_SIZE: Final = 512 + 17 * MAX_RECEIPT_IDS

_INNER_SCHEMA: Final = {
    "v": Field(int, min_value=ENVELOPE_VERSION, max_value=ENVELOPE_VERSION),
    "kind": Field(str, 1, 16),
    "id": Field(bytes, MESSAGE_ID_SIZE, MESSAGE_ID_SIZE),
    "from": Field(bytes, KEY_SIZE, KEY_SIZE),
    "to": Field(bytes, KEY_SIZE, KEY_SIZE),
    "ts": Field(int, min_value=0, max_value=2**63 - 1),
    # The body's bound is checked separately so an oversized body has its own reason.
    "body": Field(bytes),
}
_RECEIPT_SCHEMA: Final = {
    "v": _INNER_SCHEMA["v"],
    "kind": _INNER_SCHEMA["kind"],
    "ids": Field(list, 1, MAX_RECEIPT_IDS, items=_INNER_SCHEMA["id"]),
    "from": _INNER_SCHEMA["from"],
    "to": _INNER_SCHEMA["to"],
    "ts": _INNER_SCHEMA["ts"],
}


class Rejection(enum.Enum):
    """Why an envelope or receipt was refused. Values are stable strings for logs/counters."""

    OVERSIZED = "oversized"
    NOT_FOR_US = "not-for-this-recipient"
    MALFORMED = "malformed"
    BAD_SIGNATURE = "bad-signature"
    FORWARDED = "signed-for-another-recipient"
    CLOCK = "timestamp-outside-window"
    BODY_TOO_LARGE = "body-too-large"
    WRONG_KIND = "wrong-kind"
    RECEIPT_MISMATCH = "receipt-mismatch"


class EnvelopeError(Exception):
    """An envelope or receipt was refused; ``reason`` says why, ``detail`` says more."""

    def __init__(self, reason: Rejection, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    """A verified message: ``sender`` signed it for ``recipient`` at ``timestamp`` (ms)."""

    id: bytes
    sender: bytes
    recipient: bytes
    timestamp: int
    body: bytes


@dataclass(frozen=True)
class Receipt:
    """A verified receipt: ``sender`` (the messages' recipient) confirms storing the messages
    ``ids`` sent by ``recipient``."""

    ids: tuple[bytes, ...]
    sender: bytes
    recipient: bytes
    timestamp: int


def new_message_id() -> bytes:
    """Return a fresh 16-byte random message id (libsodium's CSPRNG)."""
    return nacl.utils.random(MESSAGE_ID_SIZE)


def _padded_size(length: int) -> int:
    size = MIN_PADDED_SIZE
    while size <= length:  # sodium_pad always adds at least one byte
        size *= 2
    return size


def seal_message(
    sender: nacl.signing.SigningKey,
    recipient_identity: bytes,
    recipient_encryption: bytes,
    body: bytes,
    *,
    now_ms: int,
    message_id: bytes | None = None,
) -> tuple[bytes, bytes]:
    """Sign ``body`` for ``recipient_identity`` and seal it to ``recipient_encryption``.

    Args:
        sender: the sender's identity signing key.
        recipient_identity: the recipient's 32-byte Ed25519 identity key (bound in the
            signature).
        recipient_encryption: the recipient's current 32-byte X25519 key, from its verified
            record.
        body: at most :data:`MAX_BODY_SIZE` bytes.
        now_ms: the sender's timestamp.
        message_id: the 16-byte id (a fresh random one if omitted); a retry must reuse it.

    Returns:
        ``(message_id, wire_bytes)``.

    Raises:
        EnvelopeError: ``BODY_TOO_LARGE`` if the body exceeds the limit.
        ValueError: for keys or an id of the wrong length (a caller's bug).
    """
    if len(body) > MAX_BODY_SIZE:
        raise EnvelopeError(
            Rejection.BODY_TOO_LARGE, f"body of {len(body)} bytes exceeds {MAX_BODY_SIZE}"
        )
    if message_id is None:
        message_id = new_message_id()
    if len(message_id) != MESSAGE_ID_SIZE:
        raise ValueError(f"message id must be {MESSAGE_ID_SIZE} bytes")
    if len(recipient_identity) != KEY_SIZE or len(recipient_encryption) != KEY_SIZE:
        raise ValueError("recipient keys must be 32 bytes")
    inner = codec.encode(
        {
            "v": ENVELOPE_VERSION,
            "kind": "msg",
            "id": message_id,
            "from": bytes(sender.verify_key),
            "to": recipient_identity,
            "ts": now_ms,
            "body": bytes(body),
        }
    )
    signed = codec.encode([inner, signing.sign(sender, signing.TAG_MESSAGE, inner)])
    padded = nacl.bindings.sodium_pad(signed, _padded_size(len(signed)))
    wire = nacl.public.SealedBox(nacl.public.PublicKey(recipient_encryption)).encrypt(padded)
    return message_id, bytes(wire)


def open_message(
    wire: bytes,
    *,
    own_identity: bytes,
    decryption_keys: Sequence[nacl.public.PrivateKey],
    now_ms: int,
    clock_window_ms: int = DEFAULT_CLOCK_WINDOW_MS,
) -> Message:
    """Open, unpad, decode and verify a sealed envelope addressed to this node.

    Whether the id was seen before is the caller's (the store's) business: a seen id must be
    acknowledged again, not stored again.

    Args:
        wire: the untrusted sealed bytes.
        own_identity: this node's identity key; the message must be signed for it.
        decryption_keys: this node's usable X25519 private keys, newest first.
        now_ms: the receiver's clock.
        clock_window_ms: accepted difference between the sender's timestamp and ``now_ms``.

    Returns:
        The verified :class:`Message`.

    Raises:
        EnvelopeError: with reason ``OVERSIZED``, ``NOT_FOR_US`` (no key opens it),
            ``MALFORMED``, ``BODY_TOO_LARGE``, ``WRONG_KIND``, ``BAD_SIGNATURE``,
            ``FORWARDED`` (validly signed, but for another recipient: re-sealed by someone
            else) or ``CLOCK``. Nothing else, whatever the input.
    """
    if len(wire) > MAX_WIRE_SIZE:
        raise EnvelopeError(
            Rejection.OVERSIZED, f"envelope of {len(wire)} bytes exceeds {MAX_WIRE_SIZE}"
        )
    padded = _unseal(wire, decryption_keys)
    try:
        signed = nacl.bindings.sodium_unpad(padded, _padded_size(len(padded) - 1))
    except (ValueError, nacl.exceptions.CryptoError):
        raise EnvelopeError(Rejection.MALFORMED, "bad padding") from None
    fields, inner, signature = _decode_signed(signed, _INNER_SCHEMA, "message", MAX_PADDED_SIZE)
    if fields["kind"] != "msg":
        raise EnvelopeError(Rejection.WRONG_KIND, f"expected a message, got {fields['kind']!r}")
    if len(fields["body"]) > MAX_BODY_SIZE:
        raise EnvelopeError(
            Rejection.BODY_TOO_LARGE,
            f"body of {len(fields['body'])} bytes exceeds {MAX_BODY_SIZE}",
        )
    _verify(fields["from"], signing.TAG_MESSAGE, inner, signature, "sender")
    if fields["to"] != own_identity:
        raise EnvelopeError(
            Rejection.FORWARDED,
            "the sender signed this message for another recipient; someone re-sealed it to us",
        )
    _check_clock(fields["ts"], now_ms, clock_window_ms)
    return Message(fields["id"], fields["from"], fields["to"], fields["ts"], fields["body"])


def _unseal(wire: bytes, keys: Sequence[nacl.public.PrivateKey]) -> bytes:
    # A sealed box is exactly a bucket size plus the overhead; anything else cannot be ours.
    if len(wire) - nacl.bindings.crypto_box_SEALBYTES < MIN_PADDED_SIZE:
        raise EnvelopeError(Rejection.MALFORMED, f"envelope of {len(wire)} bytes is too short")
    for key in keys:
        try:
            return bytes(nacl.public.SealedBox(key).decrypt(wire))
        except nacl.exceptions.CryptoError:
            continue
    raise EnvelopeError(
        Rejection.NOT_FOR_US, "no encryption key of this node opens it: not for this recipient"
    )


def _decode_signed(
    data: bytes, schema: dict[str, Field], what: str, max_size: int
) -> tuple[dict[str, Any], bytes, bytes]:
    """Decode ``[body, signature]`` and ``body`` against ``schema``; the caller verifies."""
    try:
        body, signature = codec.decode_signed(data, what=what, max_body=max_size)
        fields = codec.decode_map(body, schema, what=what, max_size=max_size)
    except DecodeError as exc:
        raise EnvelopeError(Rejection.MALFORMED, exc.reason) from None
    return fields, body, signature


def _verify(public_key: bytes, tag: bytes, body: bytes, signature: bytes, who: str) -> None:
    if not signing.verify(public_key, tag, body, signature):
        raise EnvelopeError(Rejection.BAD_SIGNATURE, f"the {who}'s signature does not verify")


def _check_clock(timestamp: int, now_ms: int, window_ms: int) -> None:
    if abs(timestamp - now_ms) > window_ms:
        raise EnvelopeError(
            Rejection.CLOCK,
            f"timestamp is {(timestamp - now_ms) / 1000:+.0f} s from our clock "
            f"(accepted: +-{window_ms / 1000:.0f} s)",
        )


def make_receipt(
    recipient: nacl.signing.SigningKey, sender: bytes, ids: Sequence[bytes], *, now_ms: int
) -> bytes:
    """Sign one receipt for the messages ``ids`` that ``sender`` sent, with the recipient's
    identity key.

    Call this only after every one of those messages is durably stored: a receipt is a promise.

    Raises:
        ValueError: for no ids, more than :data:`MAX_RECEIPT_IDS`, a repeated id or one of the
            wrong length (a caller's bug).
    """
    if not 1 <= len(ids) <= MAX_RECEIPT_IDS:
        raise ValueError(f"a receipt names 1 to {MAX_RECEIPT_IDS} messages, not {len(ids)}")
    if len(set(ids)) != len(ids) or any(len(i) != MESSAGE_ID_SIZE for i in ids):
        raise ValueError(f"receipt ids must be distinct and {MESSAGE_ID_SIZE} bytes each")
    body = codec.encode(
        {
            "v": ENVELOPE_VERSION,
            "kind": "receipt",
            "ids": [bytes(i) for i in ids],
            "from": bytes(recipient.verify_key),
            "to": sender,
            "ts": now_ms,
        }
    )
    return codec.encode([body, signing.sign(recipient, signing.TAG_RECEIPT, body)])


def open_receipt(
    data: bytes, *, own_identity: bytes, peer_identity: bytes, message_id: bytes | None = None
) -> Receipt:
    """Verify a receipt from ``peer_identity`` for messages this node sent.

    With ``message_id``, the receipt must name that message. Otherwise the caller checks each
    returned id against what it sent to that peer (the node service looks them up in its
    outbox).

    The receipt's timestamp is reported, not checked against a window: a late receipt for a
    message we did send is still proof of delivery.

    Raises:
        EnvelopeError: ``OVERSIZED``, ``MALFORMED`` (also for an id named twice),
            ``WRONG_KIND``, ``BAD_SIGNATURE`` or ``RECEIPT_MISMATCH`` (a valid receipt, but from
            another peer, for another sender or not naming ``message_id``). Nothing else,
            whatever the input.
    """
    if len(data) > MAX_RECEIPT_SIZE:
        raise EnvelopeError(
            Rejection.OVERSIZED, f"receipt of {len(data)} bytes exceeds {MAX_RECEIPT_SIZE}"
        )
    fields, body, signature = _decode_signed(data, _RECEIPT_SCHEMA, "receipt", MAX_RECEIPT_SIZE)
    if fields["kind"] != "receipt":
        raise EnvelopeError(Rejection.WRONG_KIND, f"expected a receipt, got {fields['kind']!r}")
    ids = tuple(fields["ids"])
    if len(set(ids)) != len(ids):
        raise EnvelopeError(Rejection.MALFORMED, "receipt: a message id is named twice")
    _verify(fields["from"], signing.TAG_RECEIPT, body, signature, "recipient")
    if fields["from"] != peer_identity:
        raise EnvelopeError(
            Rejection.RECEIPT_MISMATCH,
            "the receipt is signed by another peer than the message's recipient",
        )
    if fields["to"] != own_identity:
        raise EnvelopeError(
            Rejection.RECEIPT_MISMATCH, "the receipt is addressed to another sender"
        )
    if message_id is not None and message_id not in ids:
        raise EnvelopeError(Rejection.RECEIPT_MISMATCH, "the receipt is for other messages")
    return Receipt(ids, fields["from"], fields["to"], fields["ts"])
