"""The on-disk format of secret key files, optionally protected by a passphrase.

A key file is one canonical CBOR map::

    {"v": 1, "kind": "identity" | "encryption", "protection": "none" | "argon2id-secretbox",
     "payload": bytes, "public": bytes, "salt": bytes, "ops": int, "mem": int}

``public`` (optional) is the public half of the key, in clear, so that ``p2pnode id`` can show
the node's ID without asking for the passphrase; whoever unlocks the file checks it matches.

``salt``, ``ops`` and ``mem`` are present only with a passphrase; then ``payload`` is a
``SecretBox`` (XSalsa20-Poly1305) box under the key that Argon2id (``nacl.pwhash.argon2id``)
derives from the passphrase. Cost parameters read from a file are bounded, so a tampered file
cannot make unlocking take unbounded memory or time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.secret
import nacl.utils
from nacl.pwhash import argon2id

from p2pnode import codec
from p2pnode.codec import Field
from p2pnode.home import HomeError

FORMAT_VERSION: Final = 1
PROTECTION_NONE: Final = "none"
PROTECTION_PASSPHRASE: Final = "argon2id-secretbox"  # noqa: S105 (a format name, not a secret)

#: Argon2id cost used for new files: libsodium's "moderate" profile (256 MiB, about 0.7 s
#: here), meant for keys that guard long-term secrets and are unlocked once per daemon start.
DEFAULT_OPSLIMIT: Final = argon2id.OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT: Final = argon2id.MEMLIMIT_MODERATE

#: Bounds on costs read from a file: libsodium's minimum up to its "sensitive" profile (1 GiB).
_OPS_RANGE: Final = (argon2id.OPSLIMIT_MIN, argon2id.OPSLIMIT_SENSITIVE)
_MEM_RANGE: Final = (argon2id.MEMLIMIT_MIN, argon2id.MEMLIMIT_SENSITIVE)

#: Largest key file read: a handful of 32-byte secrets with their certificates.
MAX_KEY_FILE_SIZE: Final = 16 * 1024

_SCHEMA: Final = {
    "v": Field(int, min_value=FORMAT_VERSION, max_value=FORMAT_VERSION),
    "kind": Field(str, 1, 32),
    "protection": Field(str, 1, 32),
    "payload": Field(bytes, 1, MAX_KEY_FILE_SIZE),
    "public": Field(bytes, 1, 64, optional=True),
    "salt": Field(bytes, argon2id.SALTBYTES, argon2id.SALTBYTES, optional=True),
    "ops": Field(int, min_value=_OPS_RANGE[0], max_value=_OPS_RANGE[1], optional=True),
    "mem": Field(int, min_value=_MEM_RANGE[0], max_value=_MEM_RANGE[1], optional=True),
}


class KeyFileError(HomeError):
    """A key file cannot be used: it is corrupt, of the wrong kind, or cannot be unlocked.

    The file is never modified or replaced by the code that raises this.
    """


class PassphraseError(KeyFileError):
    """The passphrase is missing or wrong."""


class Passphrase:
    """A passphrase, and the box keys derived from it, cached per (salt, cost) so that several
    files sharing a salt cost one Argon2id run.

    New files are written with the salt and cost of the last file read or written through this
    object, so a node's key files share one derivation.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        opslimit: int = DEFAULT_OPSLIMIT,
        memlimit: int = DEFAULT_MEMLIMIT,
    ) -> None:
        if not secret:
            raise PassphraseError("the passphrase is empty")
        self._secret = secret
        self._derived: dict[tuple[bytes, int, int], bytes] = {}
        self._write_params: tuple[bytes, int, int] | None = None
        self._opslimit = opslimit
        self._memlimit = memlimit

    def box_key(self, salt: bytes, ops: int, mem: int) -> bytes:
        """Return the SecretBox key for this passphrase under ``salt`` and the given cost."""
        params = (salt, ops, mem)
        key = self._derived.get(params)
        if key is None:
            key = argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, self._secret, salt, ops, mem)
            self._derived[params] = key
        self._write_params = params
        return key

    def write_params(self) -> tuple[bytes, int, int]:
        """Salt and cost for the next file written (fresh random salt the first time)."""
        if self._write_params is None:
            salt = nacl.utils.random(argon2id.SALTBYTES)
            self._write_params = (salt, self._opslimit, self._memlimit)
        return self._write_params


def encode_key_file(
    kind: str, payload: bytes, passphrase: Passphrase | None, *, public: bytes | None = None
) -> bytes:
    """Serialise ``payload`` as a key file of ``kind``, boxed if a passphrase is given, with
    the optional ``public`` bytes in clear."""
    doc: dict[str, Any] = {"v": FORMAT_VERSION, "kind": kind}
    if public is not None:
        doc["public"] = public
    if passphrase is None:
        doc |= {"protection": PROTECTION_NONE, "payload": payload}
    else:
        salt, ops, mem = passphrase.write_params()
        box = nacl.secret.SecretBox(passphrase.box_key(salt, ops, mem))
        doc |= {
            "protection": PROTECTION_PASSPHRASE,
            "payload": bytes(box.encrypt(payload)),
            "salt": salt,
            "ops": ops,
            "mem": mem,
        }
    return codec.encode(doc)


_UNTOUCHED: Final = "the file was not modified; restore it from a backup"


def read_public_part(path: Path, kind: str) -> bytes | None:
    """Return the clear ``public`` field of the key file at ``path`` without unlocking it
    (``None`` if the file has none).

    Raises:
        KeyFileError: if the file is unreadable, corrupt or of another kind.
    """
    public = _read_document(path, kind).get("public")
    return None if public is None else bytes(public)


def read_key_file(path: Path, kind: str, passphrase: Passphrase | None) -> bytes:
    """Read and unlock the key file at ``path``, which must be of ``kind``.

    Returns:
        The payload.

    Raises:
        KeyFileError: if the file is unreadable, corrupt, too large or of another kind.
        PassphraseError: if it is protected and no passphrase was given, or the passphrase is
            wrong.
    """
    doc = _read_document(path, kind)
    if doc["protection"] == PROTECTION_NONE:
        return bytes(doc["payload"])
    if doc["protection"] != PROTECTION_PASSPHRASE or not {"salt", "ops", "mem"} <= doc.keys():
        raise KeyFileError(f"key file {path} is corrupt (unknown protection); {_UNTOUCHED}")
    if passphrase is None:
        raise PassphraseError(
            f"{path} is protected by a passphrase; give it with --passphrase-file FILE "
            "or the P2PNODE_PASSPHRASE environment variable"
        )
    box = nacl.secret.SecretBox(passphrase.box_key(doc["salt"], doc["ops"], doc["mem"]))
    try:
        return bytes(box.decrypt(doc["payload"]))
    except nacl.exceptions.CryptoError:
        raise PassphraseError(
            f"cannot unlock {path}: wrong passphrase (or the file was altered)"
        ) from None


def _read_document(path: Path, kind: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_SIZE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    try:
        doc = codec.decode_map(data, _SCHEMA, what="key file", max_size=MAX_KEY_FILE_SIZE)
    except codec.DecodeError as exc:
        raise KeyFileError(f"key file {path} is corrupt ({exc.reason}); {_UNTOUCHED}") from None
    if doc["kind"] != kind:
        raise KeyFileError(f"{path} holds a {doc['kind']!r} key, expected {kind!r}")
    return doc
