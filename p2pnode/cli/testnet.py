"""``p2pnode testnet``: a local network of real daemons, for trying p2pnode out by hand."""

from __future__ import annotations

import json
import shlex
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from p2pnode.cli.common import json_option, main
from p2pnode.cli.logs import configure_logging
from p2pnode.home import HOME_ENV

if TYPE_CHECKING:
    from p2pnode.testnet import Testnet, TestNode

#: The line that says the network is up (scripts may wait for it).
UP_LINE = "testnet up: {n} nodes; Ctrl-C (or SIGTERM) stops every node"


@main.group()
def testnet() -> None:
    """Run a local network of nodes for trying p2pnode out (see docs/TESTNET.md)."""


@testnet.command("up")
@click.option(
    "-n",
    "--nodes",
    "n",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Nodes to start.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory for the nodes' homes and logs (kept). Default: a temporary directory, "
    "removed when the network stops.",
)
@json_option
@click.option("-v", "--verbose", count=True, help="More log output (repeat for debug).")
@click.option("-q", "--quiet", count=True, help="Less log output.")
def up(n: int, root: Path | None, as_json: bool, verbose: int, quiet: int) -> None:
    """Start N daemons on loopback and run them in the foreground.

    The first node is the DHT bootstrap of the others. Once every node is ready it prints a
    table of the nodes (name, node ID, home, API socket) and how to use each from another
    terminal, e.g. `P2PNODE_HOME=DIR/node0 p2pnode send ID 'hello'`. Each daemon logs to
    DIR/nodeN.log.

    Ctrl-C or SIGTERM stops every daemon cleanly, then the command exits 0. A --root used
    before starts the same nodes again, with their messages.
    """
    import trio  # noqa: PLC0415 (deferred, as for `p2pnode daemon`)

    from p2pnode.testnet import TestnetError  # noqa: PLC0415

    configure_logging(verbose, quiet)
    try:
        came_up = trio.run(_serve, n, root, as_json)
    except BaseExceptionGroup as group:
        failed, _ = group.split(TestnetError)
        if failed is None:
            raise
        raise click.ClickException(str(failed.exceptions[0])) from group
    except TestnetError as exc:
        raise click.ClickException(str(exc)) from exc
    if not came_up:
        raise click.ClickException("interrupted before every node was up; all were stopped")


async def _serve(n: int, root: Path | None, as_json: bool) -> bool:
    """Run the testnet until SIGINT or SIGTERM; returns whether it came up.

    A signal while the nodes start aborts the start (the nodes already started are stopped);
    once up, a signal stops the network in order. Signals that come while it stops are
    absorbed: the daemons are still waited for.
    """
    import trio  # noqa: PLC0415

    from p2pnode.testnet import Testnet  # noqa: PLC0415

    stop = trio.Event()
    running = trio.Event()
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        trio.CancelScope() as starting,
    ):

        async def watch() -> None:
            async for signum in signals:
                click.echo(f"{signal.Signals(signum).name}: stopping the testnet", err=True)
                stop.set()
                if not running.is_set():
                    starting.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with Testnet(n, root=root) as net:
                running.set()
                click.echo(_describe(net, as_json))
                await stop.wait()
            click.echo("testnet stopped", err=True)
            nursery.cancel_scope.cancel()
    return not starting.cancelled_caught


def _describe(net: Testnet, as_json: bool) -> str:
    """The table of nodes and how to use them (or one JSON object)."""
    nodes = list(net)
    if as_json:
        return json.dumps(
            {
                "root": str(net.root),
                "nodes": [_node_json(node) for node in nodes],
            }
        )
    header = ["NAME", "NODE ID", "HOME", "API SOCKET"]
    rows = [[node.name, node.id, str(node.home), str(node.api_socket)] for node in nodes]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    table = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    usage = []
    for i, node in enumerate(nodes):
        other = nodes[(i + 1) % len(nodes)]
        usage.append(
            f"  {HOME_ENV}={shlex.quote(str(node.home))} p2pnode send {other.id} "
            f"{shlex.quote(f'hello from {node.name}')}"
        )
    return "\n".join(
        [
            f"homes and logs in {net.root}",
            *table,
            "",
            "Use a node from another terminal (status, inbox --follow, peers work the same way):",
            *usage,
            "",
            UP_LINE.format(n=len(nodes)),
        ]
    )


def _node_json(node: TestNode) -> dict[str, Any]:
    return {
        "name": node.name,
        "id": node.id,
        "home": str(node.home),
        "api_socket": str(node.api_socket),
        "links": node.links,
        "dht": node.dht,
        "log": str(node.log_path),
    }
