"""Commands that work on the node home directly: ``init``, ``id`` and ``daemon``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from p2pnode.cli.common import (
    emit,
    home_option,
    json_option,
    main,
    node_home,
    now_ms,
    passphrase_option,
    read_passphrase,
)
from p2pnode.cli.logs import configure_logging
from p2pnode.dht.seeds import (
    SeedError,
    default_seeds,
    parse_host_port,
    read_seed_list,
)
from p2pnode.home import HOME_ENV, HomeError
from p2pnode.keystore import init_node, read_identity_key
from p2pnode.nodeid import NodeId


@main.command()
@home_option
@passphrase_option
@json_option
def init(home: Path | None, passphrase_file: Path | None, as_json: bool) -> None:
    """Create a node: an identity key and an encryption key in a private home directory.

    Running it on an existing node changes nothing and prints the node's ID.
    """
    where = node_home(home)
    passphrase = read_passphrase(passphrase_file)
    try:
        result = init_node(where, passphrase, now_ms())
    except HomeError as exc:
        raise click.ClickException(str(exc)) from exc
    node_id = str(result.identity.node_id)
    data = {"id": node_id, "home": str(where.path), "created": result.created}
    if result.created:
        text = f"Created a new node.\nID:   {node_id}\nhome: {where.path}"
    else:
        text = (
            f"A node already exists in {where.path}; its keys were left as they were.\n"
            f"ID:   {node_id}\nhome: {where.path}"
        )
    emit(as_json, data, text)


@main.command("id")
@home_option
@json_option
def show_id(home: Path | None, as_json: bool) -> None:
    """Print this node's ID, the string others use to send to it."""
    where = node_home(home)
    try:
        key = read_identity_key(where)
    except HomeError as exc:
        raise click.ClickException(str(exc)) from exc
    node_id = str(NodeId.from_key(key))
    emit(as_json, {"id": node_id, "home": str(where.path), "identity_key": key.hex()}, node_id)


def _host_port(value: str, option: str, *, listen: bool = False) -> tuple[str, int]:
    try:
        return parse_host_port(value, allow_port_zero=listen)
    except SeedError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


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
@passphrase_option
@click.option(
    "--listen",
    default="0.0.0.0:4001",
    show_default=True,
    metavar="HOST:PORT",
    help="TCP address for links from other nodes (port 0 picks one).",
)
@click.option(
    "--advertise",
    multiple=True,
    metavar="HOST:PORT",
    help="Link address to publish in the DHT (repeatable). Default: the --listen address, "
    "or the local address towards the first seed when listening on all interfaces.",
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
@click.option(
    "--dht-only",
    is_flag=True,
    help="Run only the DHT (a bootstrap node): no identity, no messages.",
)
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
    help="Log lines on stderr for people, or one JSON object per line.",
)
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.option("-q", "--quiet", count=True, help="Less log output.")
def daemon(
    home: Path | None,
    passphrase_file: Path | None,
    listen: str,
    advertise: tuple[str, ...],
    dht_host: str,
    dht_port: int,
    bootstrap: tuple[str, ...],
    seeds_file: Path | None,
    dht_only: bool,
    log_format: str,
    verbose: int,
    quiet: int,
) -> None:
    """Run the node in the foreground until SIGTERM or Ctrl-C.

    It joins the DHT, publishes its record, delivers queued messages, receives messages, and
    serves the control API on <home>/api.sock. Once up it prints one line, "ready id ID links
    HOST:PORT dht HOST:PORT api PATH", and tells systemd (Type=notify) it is ready.

    With --dht-only it is a DHT bootstrap node (no identity needed); it prints "listening on
    HOST:PORT node-id HEX" once up. Known DHT peers are kept in the home so that a restarted
    node rejoins even when every seed is down.
    """
    # Imported here, not at the top: the daemon pulls in trio, the DHT, Starlette and hypercorn
    # (about 0.25 s), which every other command, run once per call, does not need.
    from p2pnode.daemon import DaemonError, DaemonOptions, run_daemon, run_dht_only  # noqa: PLC0415
    from p2pnode.dht.service import DhtConfig  # noqa: PLC0415

    configure_logging(verbose, quiet, log_format)
    seeds = _seed_addresses(bootstrap, seeds_file)
    if dht_only:
        peers_file = None
        if home is not None or os.environ.get(HOME_ENV):
            where = node_home(home)
            try:
                where.create()
            except HomeError as exc:
                raise click.ClickException(str(exc)) from exc
            peers_file = where.dht_peers
        config = DhtConfig(listen=(dht_host, dht_port), seeds=seeds, peers_file=peers_file)
        try:
            run_dht_only(config)
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on {dht_host}:{dht_port}/udp: {exc.strerror or exc}"
            ) from exc
        return
    options = DaemonOptions(
        home=node_home(home),
        passphrase=read_passphrase(passphrase_file),
        listen=_host_port(listen, "--listen", listen=True),
        dht_listen=(dht_host, dht_port),
        seeds=seeds,
        advertise=[_host_port(a, "--advertise") for a in advertise],
    )
    try:
        run_daemon(options)
    except (DaemonError, HomeError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot start the daemon: {exc}") from exc
    logging.shutdown()
    sys.stdout.flush()
