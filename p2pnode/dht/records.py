"""Signed peer records: what a node publishes in the DHT so that others can reach it.

A record says "identity key ``IK`` can be reached at these addresses, and seals to this X25519
key until then" (GUIDE section 3a)::

    rec  = {"v": 1, "ik": IK, "xk": XK, "xk_expires": ms, "xk_sig": S_IK(cert(XK)),
            "addrs": [[host, port], ...], "seq": n, "expires": ms}
    data = canonical([canonical(rec), S_IK("p2pnode/record/v1" || canonical(rec))])

It is stored under :func:`dht_key` of ``IK``, which is also the node's DHT node ID, so a record
can only live under the key its own identity key hashes to. ``xk_sig`` is the identity key's
:class:`~p2pnode.identity.EncryptionKeyCert` signature, so a reader gets the encryption key and
its certification in one signed unit. A higher ``seq`` supersedes a lower one.

Addresses are IP literals only: looking a record up must never trigger a DNS query (which would
leak who is being contacted, and let a record's publisher point readers at whatever a resolver
says). Everything here is pure; times are integer milliseconds since the epoch, passed in.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import nacl.encoding
import nacl.hash

from p2pnode import codec, signing
from p2pnode.codec import DecodeError, Field
from p2pnode.identity import EncryptionKeyCert, Identity

HOUR_MS: Final = 60 * 60 * 1000

#: Size of a DHT key and node ID: 160 bits, as Kademlia and the ``kademlia`` package use.
DHT_KEY_SIZE: Final = 20

#: BLAKE2b personalisation for :func:`dht_key` (at most 16 bytes), so a DHT key can never
#: collide with a BLAKE2b hash of the same key made for another purpose.
DHT_KEY_PERSON: Final = b"p2pnode/dht-id"

RECORD_VERSION: Final = 1
KEY_SIZE: Final = 32

#: Largest published record accepted. Eight IPv6 addresses plus the keys, signatures and
#: integers fit in under 700 bytes (606 with eight 39-character IPv6 hosts and 64-bit
#: integers), so 1 KiB leaves room while keeping a record well inside one UDP datagram and
#: bounding what a storing node holds per key.
MAX_RECORD_SIZE: Final = 1024

#: Most addresses in one record: enough for a few IPv4 and IPv6 addresses per interface, small
#: enough to keep a record within :data:`MAX_RECORD_SIZE`.
MAX_ADDRESSES: Final = 8

#: Longest host string accepted on the wire: INET6_ADDRSTRLEN (46) minus its terminating NUL.
MAX_HOST_LENGTH: Final = 45

#: Lifetime of a freshly published record. A day keeps a vanished node's record from lingering
#: long, while republishing (see :data:`REPUBLISH_AFTER_MS`) keeps a live node's record present.
DEFAULT_RECORD_LIFETIME_MS: Final = 24 * HOUR_MS

#: A node republishes its record after half its lifetime (its half-life), so the record never
#: lapses even if one republish round is lost or the storing nodes churn.
REPUBLISH_AFTER_MS: Final = DEFAULT_RECORD_LIFETIME_MS // 2

#: A record claiming to stay valid longer than this (from the verifier's clock) is refused as
#: absurd: it would outlive any republish schedule. Twice the default lifetime tolerates clock
#: skew between publisher and verifier.
MAX_RECORD_LIFETIME_MS: Final = 48 * HOUR_MS

_MAX_INT: Final = 2**63 - 1
_TIME: Final = Field(int, min_value=0, max_value=_MAX_INT)
_RECORD_SCHEMA: Final = {
    "v": Field(int, min_value=RECORD_VERSION, max_value=RECORD_VERSION),
    "ik": Field(bytes, KEY_SIZE, KEY_SIZE),
    "xk": Field(bytes, KEY_SIZE, KEY_SIZE),
    "xk_expires": _TIME,
    "xk_sig": Field(bytes, signing.SIGNATURE_SIZE, signing.SIGNATURE_SIZE),
    "addrs": Field(list, 1, MAX_ADDRESSES, items=Field(list, 2, 2)),
    "seq": Field(int, min_value=0, max_value=_MAX_INT),
    "expires": _TIME,
}
_HOST: Final = Field(str, 1, MAX_HOST_LENGTH)
_PORT: Final = Field(int, min_value=1, max_value=65535)


def dht_key(identity_key: bytes) -> bytes:
    """Return the 20-byte DHT key of a node: its node ID and the key its record is stored under.

    Args:
        identity_key: the node's 32-byte Ed25519 identity public key.

    Returns:
        ``BLAKE2b-160(identity_key)`` personalised with :data:`DHT_KEY_PERSON`.
    """
    return nacl.hash.blake2b(
        bytes(identity_key),
        digest_size=DHT_KEY_SIZE,
        person=DHT_KEY_PERSON,
        encoder=nacl.encoding.RawEncoder,
    )


class RecordRejection(enum.Enum):
    """Why a record was refused. Values are stable strings for logs and counters."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    BAD_SIGNATURE = "bad-signature"
    WRONG_KEY = "wrong-key"
    EXPIRED = "expired"
    TOO_FAR_FUTURE = "too-far-future"
    BAD_ENCRYPTION_KEY = "bad-encryption-key"


class RecordError(ValueError):
    """A record was refused; ``reason`` says why, ``detail`` says more."""

    def __init__(self, reason: RecordRejection, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _canonical_address(host: object, port: object) -> tuple[str, int]:
    """Return ``(host, port)`` with ``host`` in its canonical text form.

    Raises:
        ValueError: unless ``host`` is an IPv4 or IPv6 address literal without a scope ID that
            is neither unspecified nor multicast, and ``port`` is an int in 1..65535.
    """
    if type(host) is not str:
        raise ValueError(f"address host must be a string, got {type(host).__name__}")
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"address port must be an int in 1..65535, got {port!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"address host {host[:64]!r} is not an IP address literal") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError(f"address {host!r} has a scope ID, meaningless to other hosts")
        if ip.ipv4_mapped is not None:
            # Publish the plain IPv4 form: the text form of mapped addresses differs between
            # Python versions (3.13 changed it), which would break the canonical-form check.
            ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"address {host!r} cannot be dialled")
    return str(ip), port


@dataclass(frozen=True)
class PeerRecord:
    """The content of a peer record: how to reach and encrypt to ``identity_key``.

    ``encryption_key_signature`` is the identity key's :class:`EncryptionKeyCert` signature
    over ``encryption_key`` and ``encryption_key_expires``. Times are ms since the epoch.

    Raises:
        ValueError: on construction, if a field has the wrong type or size, or an address is
            not ``(canonical IP literal, port)`` (see :meth:`create`, which canonicalises).
    """

    identity_key: bytes
    encryption_key: bytes
    encryption_key_expires: int
    encryption_key_signature: bytes
    addresses: tuple[tuple[str, int], ...]
    seq: int
    expires: int

    def __post_init__(self) -> None:
        for name, value, size in (
            ("identity_key", self.identity_key, KEY_SIZE),
            ("encryption_key", self.encryption_key, KEY_SIZE),
            ("encryption_key_signature", self.encryption_key_signature, signing.SIGNATURE_SIZE),
        ):
            if type(value) is not bytes or len(value) != size:
                raise ValueError(f"{name} must be {size} bytes")
        for name, number in (
            ("encryption_key_expires", self.encryption_key_expires),
            ("seq", self.seq),
            ("expires", self.expires),
        ):
            if type(number) is not int or not 0 <= number <= _MAX_INT:
                raise ValueError(f"{name} must be an int in 0..2**63-1")
        if type(self.addresses) is not tuple:
            raise ValueError("addresses must be a tuple of (host, port) tuples")
        if not 1 <= len(self.addresses) <= MAX_ADDRESSES:
            raise ValueError(f"a record needs 1 to {MAX_ADDRESSES} addresses")
        for address in self.addresses:
            if type(address) is not tuple or len(address) != 2:
                raise ValueError("each address must be a (host, port) tuple")
            if _canonical_address(*address) != address:
                raise ValueError(f"address host {address[0]!r} is not in canonical form")
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError("duplicate address")

    @classmethod
    def create(
        cls,
        identity: Identity,
        addresses: Iterable[tuple[str, int]],
        seq: int,
        now_ms: int,
        lifetime_ms: int = DEFAULT_RECORD_LIFETIME_MS,
    ) -> SignedRecord:
        """Build and sign a record for ``identity`` with its current encryption key.

        Args:
            identity: the publishing node's keys.
            addresses: 1 to :data:`MAX_ADDRESSES` ``(ip_literal, port)`` pairs; hosts are
                canonicalised (``"0::1"`` becomes ``"::1"``, IPv4-mapped IPv6 becomes IPv4).
            seq: the sequence number; must exceed the last one published for peers to take it.
            now_ms: the current time.
            lifetime_ms: how long the record stays valid, at most
                :data:`MAX_RECORD_LIFETIME_MS`.

        Returns:
            The signed record, whose ``data`` is what to publish.

        Raises:
            ValueError: for an address that is not an IP literal (DNS names are refused), a bad
                port, too many or no addresses, a bad ``seq`` or ``lifetime_ms``, or an expired
                current encryption key (rotate the identity first).
        """
        if type(lifetime_ms) is not int or not 0 < lifetime_ms <= MAX_RECORD_LIFETIME_MS:
            raise ValueError(f"lifetime_ms must be in 1..{MAX_RECORD_LIFETIME_MS}")
        cert = identity.encryption_key.cert
        if not cert.valid_at(now_ms):
            raise ValueError("the current encryption key is expired or invalid; rotate it first")
        record = cls(
            identity_key=identity.public_key,
            encryption_key=cert.public_key,
            encryption_key_expires=cert.expires,
            encryption_key_signature=cert.signature,
            addresses=tuple(_canonical_address(host, port) for host, port in addresses),
            seq=seq,
            expires=now_ms + lifetime_ms,
        )
        body = record.body
        signature = signing.sign(identity.signing_key, signing.TAG_RECORD, body)
        data = codec.encode([body, signature])
        if len(data) > MAX_RECORD_SIZE:  # unreachable within MAX_ADDRESSES; kept as a guard
            raise ValueError(f"record of {len(data)} bytes exceeds {MAX_RECORD_SIZE}")
        return SignedRecord(record, data)

    @property
    def body(self) -> bytes:
        """The canonical CBOR of the record map, which the signature covers after its tag."""
        return codec.encode(
            {
                "v": RECORD_VERSION,
                "ik": self.identity_key,
                "xk": self.encryption_key,
                "xk_expires": self.encryption_key_expires,
                "xk_sig": self.encryption_key_signature,
                "addrs": [[host, port] for host, port in self.addresses],
                "seq": self.seq,
                "expires": self.expires,
            }
        )

    @property
    def encryption_key_cert(self) -> EncryptionKeyCert:
        """The identity key's certificate for :attr:`encryption_key` (not verified here)."""
        return EncryptionKeyCert(
            self.identity_key,
            self.encryption_key,
            self.encryption_key_expires,
            self.encryption_key_signature,
        )

    @property
    def key(self) -> bytes:
        """The DHT key this record belongs under: :func:`dht_key` of :attr:`identity_key`."""
        return dht_key(self.identity_key)


@dataclass(frozen=True)
class SignedRecord:
    """A record together with ``data``, the exact bytes that were (or are to be) published."""

    record: PeerRecord
    data: bytes


def verify_record(data: bytes, *, key: bytes, now_ms: int) -> SignedRecord:
    """Decode and fully verify a published record found (or offered) under DHT key ``key``.

    Args:
        data: untrusted bytes from the network.
        key: the DHT key the record was stored under or looked up by.
        now_ms: the verifier's current time.

    Returns:
        The verified record with ``data`` as given.

    Raises:
        RecordError: with ``reason`` OVERSIZED (more than :data:`MAX_RECORD_SIZE` bytes),
            MALFORMED (not strict canonical CBOR of the record schema, or a bad address),
            BAD_SIGNATURE (not signed over :data:`~p2pnode.signing.TAG_RECORD` by ``ik``),
            WRONG_KEY (``dht_key(ik) != key``), EXPIRED (``expires <= now_ms``),
            TOO_FAR_FUTURE (``expires`` more than :data:`MAX_RECORD_LIFETIME_MS` ahead) or
            BAD_ENCRYPTION_KEY (the encryption key's certificate is expired, absurdly long or
            not signed by ``ik``). No other exception escapes, whatever ``data`` and ``key``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RecordError(RecordRejection.MALFORMED, f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_RECORD_SIZE:
        raise RecordError(
            RecordRejection.OVERSIZED, f"{len(data)} bytes exceeds the limit of {MAX_RECORD_SIZE}"
        )
    try:
        body, signature = codec.decode_signed(data, what="peer record", max_body=MAX_RECORD_SIZE)
        fields = codec.decode_map(body, _RECORD_SCHEMA, what="peer record body")
        record = _record_from_fields(fields)
    except DecodeError as exc:
        raise RecordError(RecordRejection.MALFORMED, exc.reason) from None
    except (ValueError, TypeError) as exc:
        raise RecordError(RecordRejection.MALFORMED, f"peer record: {exc}") from None
    if not signing.verify(record.identity_key, signing.TAG_RECORD, body, signature):
        raise RecordError(RecordRejection.BAD_SIGNATURE, "signature does not verify under ik")
    if record.key != key:
        raise RecordError(RecordRejection.WRONG_KEY, "record stored under the wrong key")
    if record.expires <= now_ms:
        raise RecordError(RecordRejection.EXPIRED, "record has expired")
    if record.expires > now_ms + MAX_RECORD_LIFETIME_MS:
        raise RecordError(
            RecordRejection.TOO_FAR_FUTURE,
            f"record claims to stay valid more than {MAX_RECORD_LIFETIME_MS} ms from now",
        )
    cert = record.encryption_key_cert
    if not cert.valid_at(now_ms):
        raise RecordError(
            RecordRejection.BAD_ENCRYPTION_KEY, "encryption key expired or absurdly long-lived"
        )
    if not signing.verify(cert.identity_key, signing.TAG_ENCRYPTION_KEY, cert.body, cert.signature):
        raise RecordError(
            RecordRejection.BAD_ENCRYPTION_KEY, "encryption key certificate signature is invalid"
        )
    return SignedRecord(record, data)


def _record_from_fields(fields: dict[str, Any]) -> PeerRecord:
    """Build a record from schema-checked fields; raises DecodeError/ValueError if invalid."""
    addresses = []
    for index, (host, port) in enumerate(fields["addrs"]):
        _HOST.check(f"addrs[{index}] host", host)
        _PORT.check(f"addrs[{index}] port", port)
        addresses.append((host, port))
    return PeerRecord(
        identity_key=fields["ik"],
        encryption_key=fields["xk"],
        encryption_key_expires=fields["xk_expires"],
        encryption_key_signature=fields["xk_sig"],
        addresses=tuple(addresses),
        seq=fields["seq"],
        expires=fields["expires"],
    )
