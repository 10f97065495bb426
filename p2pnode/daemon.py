"""Running node processes: the foreground loop, signal handling and readiness reporting.

Only the DHT-only mode (a bootstrap node) exists so far; the messaging daemon builds on it.
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from p2pnode.dht.seeds import format_host_port
from p2pnode.dht.service import DhtConfig, DhtService

log = logging.getLogger(__name__)


async def _cancel_on_signals(scope: trio.CancelScope, *, task_status: object) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()  # type: ignore[attr-defined]
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


async def serve_dht_only(config: DhtConfig) -> None:
    """Run a DHT-only node until SIGTERM or SIGINT.

    Once bound and joined, prints ``listening on HOST:PORT node-id HEX`` on standard output
    (one line, flushed) so that scripts and supervisors can wait for it.

    Raises:
        OSError: if the UDP address cannot be bound.
    """
    service = DhtService(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(_cancel_on_signals, nursery.cancel_scope)
        await nursery.start(service.run)
        node = service.node
        assert node is not None
        print(
            f"listening on {format_host_port(node.address)} node-id {node.node_id.hex()}",
            flush=True,
        )
    log.info("stopped")


def run_dht_only(config: DhtConfig) -> None:
    """Synchronous entry point of :func:`serve_dht_only`."""
    trio.run(serve_dht_only, config)
    sys.stdout.flush()
