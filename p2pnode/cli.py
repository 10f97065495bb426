"""The ``p2pnode`` command line.

Exit codes: 0 success, 1 error (the message says what and how to fix it), 2 usage error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from p2pnode import __version__
from p2pnode.daemon import run_dht_only
from p2pnode.dht.seeds import SeedError, default_seeds, parse_host_port, read_seed_list
from p2pnode.dht.service import DhtConfig
from p2pnode.home import HOME_ENV, HomeError, NodeHome, resolve_home
from p2pnode.keyfile import Passphrase
from p2pnode.keystore import init_node, read_identity_key
from p2pnode.nodeid import NodeId

PASSPHRASE_ENV: Final = "P2PNODE_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
#: A passphrase file larger than this is surely the wrong file.
MAX_PASSPHRASE_FILE_SIZE: Final = 4096

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2

F = TypeVar("F", bound=Callable[..., Any])


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def home_option(func: F) -> F:
    """The ``--home`` option shared by every command that works on a node."""
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Node data directory. Default: ${HOME_ENV}, else the per-user data directory.",
    )(func)


def json_option(func: F) -> F:
    """The ``--json`` option of every command that prints data."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(func)


def _read_passphrase(passphrase_file: Path | None) -> Passphrase | None:
    if passphrase_file is not None:
        try:
            with open(passphrase_file, "rb") as handle:
                data = handle.read(MAX_PASSPHRASE_FILE_SIZE + 1)
        except OSError as exc:
            raise click.ClickException(
                f"cannot read passphrase file {passphrase_file}: {exc.strerror}"
            ) from exc
        if len(data) > MAX_PASSPHRASE_FILE_SIZE:
            raise click.ClickException(f"passphrase file {passphrase_file} is too large")
        # One trailing newline is an artefact of `echo pass > file`, not part of the passphrase.
        secret = data.removesuffix(b"\n")
        if not secret:
            raise click.ClickException(f"passphrase file {passphrase_file} is empty")
        return Passphrase(secret)
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return Passphrase(env.encode())
    return None


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    if as_json:
        click.echo(json.dumps(data))
    else:
        click.echo(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2pnode")
def main() -> None:
    """p2pnode: a peer-to-peer, end-to-end encrypted messaging node.

    \b
    Exit codes:
      0  success
      1  error (the message says what went wrong and how to fix it)
      2  usage error
    """


@main.command()
@home_option
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help=f"Protect the keys with the passphrase in this file (or set ${PASSPHRASE_ENV}).",
)
@json_option
def init(home: Path | None, passphrase_file: Path | None, as_json: bool) -> None:
    """Create a node: an identity key and an encryption key in a private home directory.

    Running it on an existing node changes nothing and prints the node's ID.
    """
    node_home = NodeHome(resolve_home(home))
    passphrase = _read_passphrase(passphrase_file)
    try:
        result = init_node(node_home, passphrase, _now_ms())
    except HomeError as exc:
        raise click.ClickException(str(exc)) from exc
    node_id = str(result.identity.node_id)
    data = {"id": node_id, "home": str(node_home.path), "created": result.created}
    if result.created:
        text = f"Created a new node.\nID:   {node_id}\nhome: {node_home.path}"
    else:
        text = (
            f"A node already exists in {node_home.path}; its keys were left as they were.\n"
            f"ID:   {node_id}\nhome: {node_home.path}"
        )
    _emit(as_json, data, text)


@main.command("id")
@home_option
@json_option
def show_id(home: Path | None, as_json: bool) -> None:
    """Print this node's ID, the string others use to send to it."""
    node_home = NodeHome(resolve_home(home))
    try:
        key = read_identity_key(node_home)
    except HomeError as exc:
        raise click.ClickException(str(exc)) from exc
    node_id = str(NodeId.from_key(key))
    _emit(
        as_json,
        {"id": node_id, "home": str(node_home.path), "identity_key": key.hex()},
        node_id,
    )


def _configure_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO - 10 * verbose + 10 * quiet
    logging.basicConfig(
        level=max(logging.DEBUG, min(level, logging.CRITICAL)),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _seed_addresses(bootstrap: tuple[str, ...], seeds_file: Path | None) -> list[tuple[str, int]]:
    try:
        if bootstrap or seeds_file:
            chosen = [parse_host_port(text) for text in bootstrap]
            if seeds_file is not None:
                chosen += read_seed_list(seeds_file)
            return chosen
        return default_seeds()
    except SeedError as exc:
        raise click.BadParameter(str(exc), param_hint="--bootstrap/--seeds") from exc


@main.command()
@home_option
@click.option(
    "--dht-only",
    is_flag=True,
    help="Run only the DHT (a bootstrap node): no identity, no messages.",
)
@click.option(
    "--dht-host",
    default="0.0.0.0",  # noqa: S104 (a DHT node must be reachable by its peers)
    show_default=True,
    help="Address to bind the DHT's UDP socket to.",
)
@click.option(
    "--dht-port",
    type=click.IntRange(0, 65535),
    default=4000,
    show_default=True,
    help="UDP port of the DHT (0 picks a free one).",
)
@click.option(
    "--bootstrap",
    multiple=True,
    metavar="HOST:PORT",
    help="A DHT peer to join through (repeatable). Default: the packaged seed list.",
)
@click.option(
    "--seeds",
    "seeds_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A seed list file (one HOST:PORT per line) to join through.",
)
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.option("-q", "--quiet", count=True, help="Less log output.")
def daemon(
    home: Path | None,
    dht_only: bool,
    dht_host: str,
    dht_port: int,
    bootstrap: tuple[str, ...],
    seeds_file: Path | None,
    verbose: int,
    quiet: int,
) -> None:
    """Run a node in the foreground until SIGTERM or Ctrl-C.

    With --dht-only it is a DHT bootstrap node; it prints "listening on HOST:PORT node-id
    HEX" once it is up. Known peers are kept in the home (if given) so that a restarted node
    rejoins even when every seed is down.
    """
    if not dht_only:
        raise click.UsageError(
            "this version runs only DHT nodes: add --dht-only. The messaging daemon (links, "
            "control API) is not built yet."
        )
    _configure_logging(verbose, quiet)
    peers_file = None
    if home is not None or os.environ.get(HOME_ENV):
        node_home = NodeHome(resolve_home(home))
        try:
            node_home.create()
        except HomeError as exc:
            raise click.ClickException(str(exc)) from exc
        peers_file = node_home.dht_peers
    config = DhtConfig(
        listen=(dht_host, dht_port),
        seeds=_seed_addresses(bootstrap, seeds_file),
        peers_file=peers_file,
    )
    try:
        run_dht_only(config)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {dht_host}:{dht_port}/udp: {exc.strerror or exc}"
        ) from exc
