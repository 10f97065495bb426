"""Every remaining decoder of the foundation meets random and mutated input with its own error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode.codec import DecodeError
from p2pnode.identity import EncryptionKeyCert, Identity
from p2pnode.keyfile import KeyFileError, encode_key_file, read_key_file

NOW = 1_800_000_000_000
IDENTITY = Identity.generate(NOW)
CERT = IDENTITY.encryption_key.cert.to_bytes()


def test_certificate_round_trips() -> None:
    cert = EncryptionKeyCert.from_bytes(CERT)
    assert cert == IDENTITY.encryption_key.cert
    assert cert.identity_key == IDENTITY.public_key
    assert cert.valid_at(NOW) and not cert.valid_at(cert.expires)


@given(st.data())
def test_every_mutation_of_a_certificate_is_refused(data: st.DataObject) -> None:
    mutated = bytearray(CERT)
    index = data.draw(st.integers(0, len(mutated) - 1))
    mutated[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(DecodeError):
        EncryptionKeyCert.from_bytes(bytes(mutated))


@given(st.binary(max_size=400))
def test_random_certificates_raise_only_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        EncryptionKeyCert.from_bytes(data)


KEY_FILE = encode_key_file("identity", b"s" * 32, None, public=b"p" * 32)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.binary(max_size=300)
    | st.just(KEY_FILE)
    .map(bytearray)
    .flatmap(
        lambda b: st.integers(0, len(b) - 1).map(lambda i: bytes(b[:i] + b"\x00" + b[i + 1 :]))
    )
)
def test_random_and_mutated_key_files_raise_only_key_file_error(
    tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(data)
    try:
        payload = read_key_file(path, "identity", None)
    except KeyFileError:
        return
    assert len(payload) > 0  # a mutation that still parses is a well-formed key file
