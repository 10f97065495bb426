"""Seed lists: where a node first looks for the DHT.

A seed list is UTF-8 text, one ``HOST:PORT`` per line (IPv6 as ``[ADDR]:PORT``); blank lines
and everything after ``#`` are ignored. The default list ships as ``bootstrap/seeds.txt`` (in a
wheel: ``p2pnode/default-seeds.txt``). Any reachable DHT node is as good a seed as any other:
there is no single point the network depends on.
"""

from __future__ import annotations

import ipaddress
from importlib import resources
from pathlib import Path
from typing import Final

from p2pnode.dht.wire import Address

#: Longest seed list read; a list is a handful of lines, this only stops a wrong file.
MAX_SEED_LIST_SIZE: Final = 64 * 1024
#: Seeds tried at most; more adds nothing but start-up traffic.
MAX_SEEDS: Final = 64
_PACKAGED_NAME: Final = "default-seeds.txt"


class SeedError(ValueError):
    """A seed address or seed list that cannot be used; the message says where and why."""


def parse_host_port(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT``.

    HOST may be an IP address or a DNS name (resolved when the node starts). Port 0 ("pick
    one") is accepted only with ``allow_port_zero`` (for addresses we listen on).

    Raises:
        SeedError: naming what is wrong.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise SeedError(f"{text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SeedError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise SeedError(f"{text!r}: expected HOST:PORT")
        if ":" in host:
            raise SeedError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    lowest = 0 if allow_port_zero else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise SeedError(f"{text!r}: port must be a number from {lowest} to 65535")
    if len(host) > 253:
        raise SeedError(f"{text!r}: host name too long")
    return host, int(port_text)


def format_host_port(address: Address) -> str:
    """The inverse of :func:`parse_host_port`."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_seed_list(text: str, *, source: str = "seed list") -> list[tuple[str, int]]:
    """Parse a seed list (see the module docstring).

    Raises:
        SeedError: naming ``source`` and the line number of the first bad entry.
    """
    seeds: list[tuple[str, int]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            seeds.append(parse_host_port(entry))
        except SeedError as exc:
            raise SeedError(f"{source}, line {number}: {exc}") from None
    return seeds[:MAX_SEEDS]


def read_seed_list(path: Path) -> list[tuple[str, int]]:
    """Read and parse the seed list at ``path``.

    Raises:
        SeedError: if it cannot be read, is too large, or has a bad entry.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SEED_LIST_SIZE + 1)
    except OSError as exc:
        raise SeedError(f"cannot read seed list {path}: {exc.strerror}") from exc
    if len(data) > MAX_SEED_LIST_SIZE:
        raise SeedError(f"seed list {path} is larger than {MAX_SEED_LIST_SIZE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SeedError(f"seed list {path} is not UTF-8 text") from None
    return parse_seed_list(text, source=str(path))


def default_seed_list_path() -> Path:
    """Where the default seed list is: packaged in a wheel, or ``bootstrap/seeds.txt`` of a
    source checkout (editable install)."""
    packaged = resources.files("p2pnode").joinpath(_PACKAGED_NAME)
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "bootstrap" / "seeds.txt"


def default_seeds() -> list[tuple[str, int]]:
    """The default seed list (empty if none is installed).

    Raises:
        SeedError: if the installed list is malformed.
    """
    path = default_seed_list_path()
    if not path.is_file():
        return []
    return read_seed_list(path)
