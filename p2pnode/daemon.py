"""Running a node process: composition, the home lock, signals, readiness, shutdown.

:class:`Daemon` puts the parts together in one ``trio.run``: the DHT, the node service (links,
delivery, receiving) and the control API. It holds an exclusive lock on the home so a second
daemon on the same home is refused, reports readiness on standard output and to systemd
(``NOTIFY_SOCKET``), and shuts down cleanly on SIGTERM or SIGINT: links are closed, the commit
in progress finishes and the store is closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from p2pnode.api.app import create_app
from p2pnode.api.server import serve_api
from p2pnode.clock import wall_clock_ms
from p2pnode.dht.seeds import format_host_port
from p2pnode.dht.service import DhtConfig, DhtService
from p2pnode.dht.wire import Address
from p2pnode.home import NodeHome
from p2pnode.identity import Identity
from p2pnode.keyfile import Passphrase
from p2pnode.keystore import load_identity, rotate_if_due
from p2pnode.node import NodeConfig, NodeService
from p2pnode.store import Store

log = logging.getLogger(__name__)


class DaemonError(Exception):
    """The daemon cannot start; the message says why and what to do."""


@dataclass
class DaemonOptions:
    """How to run a daemon (the ``p2pnode daemon`` options)."""

    home: NodeHome
    passphrase: Passphrase | None = None
    listen: Address = ("0.0.0.0", 4001)  # noqa: S104 (links must be reachable by peers)
    dht_listen: Address = ("0.0.0.0", 4000)  # noqa: S104
    seeds: Sequence[tuple[str, int]] = ()
    advertise: Sequence[Address] = ()
    node: NodeConfig = field(default_factory=NodeConfig)


@contextlib.contextmanager
def home_lock(home: NodeHome) -> Iterator[None]:
    """Hold an exclusive lock on ``home`` for the daemon's lifetime.

    Raises:
        DaemonError: if another daemon holds it.
    """
    path = home.path / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DaemonError(
                f"another p2pnode daemon (pid {other}) is already running on {home.path}; "
                "stop it first, or give this one another --home"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def notify_systemd(message: str) -> None:
    """Send ``message`` (e.g. ``READY=1``) to systemd if it is supervising us."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", target, exc)


def local_address_towards(host: str, port: int) -> str | None:
    """The local IP address the system would use to reach ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((host, port))
        except OSError:
            return None
        return str(sock.getsockname()[0])


def advertised_addresses(
    bound: Address, advertise: Sequence[Address], seeds: Sequence[tuple[str, int]]
) -> list[Address]:
    """Link addresses to publish: the explicit ones, else the bound address if it is specific,
    else the local address that routes towards the first seed (or loopback, with a warning)."""
    if advertise:
        return list(advertise)
    host, port = bound
    if host not in ("0.0.0.0", "::"):  # noqa: S104
        return [bound]
    for seed_host, seed_port in seeds:
        local = local_address_towards(seed_host, seed_port)
        if local is not None:
            return [(local, port)]
    log.warning(
        "links listen on all interfaces but no --advertise address was given and no seed "
        "shows the route out; advertising 127.0.0.1:%d (reachable from this machine only)",
        port,
    )
    return [("127.0.0.1", port)]


#: Seconds between a running daemon's checks whether its encryption key is due for rotation
#: (:data:`~p2pnode.identity.ROTATE_BEFORE_EXPIRY_MS` before it expires: ten days to spare).
KEY_ROTATION_CHECK_INTERVAL: Final = 3600.0


async def keep_encryption_key_fresh(
    home: NodeHome,
    passphrase: Passphrase | None,
    identity: Identity,
    on_rotated: Callable[[Identity], None],
    *,
    clock: Callable[[], int] = wall_clock_ms,
    interval: float = KEY_ROTATION_CHECK_INTERVAL,
) -> None:
    """Rotate the encryption key of a long-running node when it is due, until cancelled.

    Every ``interval`` seconds: if the current key is due (see
    :meth:`~p2pnode.identity.Identity.needs_rotation`), the rotated keys are written to
    ``home`` and then handed to ``on_rotated`` (which republishes the record and starts opening
    with the new key). Without this a daemon up for more than 30 days would advertise an
    expired key, and no one could send to it.

    Error handling: a key file that cannot be written is logged and tried again at the next
    check; the old key stays in use meanwhile.
    """
    while True:
        await trio.sleep(interval)
        try:
            rotated = await trio.to_thread.run_sync(
                rotate_if_due, home, identity, passphrase, clock()
            )
        except OSError as exc:
            log.error("could not save a rotated encryption key (will retry): %s", exc)
            continue
        if rotated is not None:
            identity = rotated
            on_rotated(rotated)


class Daemon:
    """A running node: DHT, node service and control API over one home."""

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.home = str(options.home.path)
        self.started_at = time.monotonic()
        self.node: NodeService
        self.dht: DhtService | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started(self)`` once serving.

        Raises:
            DaemonError: if the home is locked by another daemon or unusable.
            HomeError, PassphraseError: for key problems (the messages say how to fix them).
            OSError: if an address cannot be bound.
        """
        options = self.options
        options.home.check()
        with home_lock(options.home):
            identity = load_identity(options.home, options.passphrase, wall_clock_ms())
            store = Store.open(options.home.database)
            try:
                dht = DhtService(
                    DhtConfig(
                        listen=options.dht_listen,
                        seeds=options.seeds,
                        peers_file=options.home.dht_peers,
                    ),
                    identity=identity,
                )
                self.dht = dht
                config = options.node
                config.listen = options.listen
                self.node = NodeService(identity, store, dht, config=config)
                async with trio.open_nursery() as nursery:
                    await nursery.start(dht.run)
                    await nursery.start(self.node.run)
                    links = self.node.links.listen_address
                    assert links is not None
                    advertised = advertised_addresses(links, options.advertise, options.seeds)
                    await dht.advertise(advertised)
                    await nursery.start(serve_api, create_app(self), options.home.api_socket)
                    nursery.start_soon(
                        keep_encryption_key_fresh,
                        options.home,
                        options.passphrase,
                        identity,
                        self._use_identity,
                    )
                    self.started_at = time.monotonic()
                    task_status.started(self)
            finally:
                store.close()

    def _use_identity(self, identity: Identity) -> None:
        self.node.use_identity(identity)
        if self.dht is not None:
            self.dht.set_identity(identity)


async def _cancel_on_signals(scope: trio.CancelScope, *, task_status: Any) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            scope.cancel()
            return


async def serve_daemon(options: DaemonOptions) -> None:
    """Run a full daemon until SIGTERM or SIGINT, printing a readiness line once up."""
    daemon = Daemon(options)
    async with trio.open_nursery() as nursery:
        await nursery.start(_cancel_on_signals, nursery.cancel_scope)
        await nursery.start(daemon.run)
        node = daemon.node
        dht = daemon.dht.node if daemon.dht is not None else None
        links = node.links.listen_address
        assert links is not None
        print(
            f"ready id {node.identity.node_id} links {format_host_port(links)} "
            f"dht {format_host_port(dht.address) if dht else '-'} "
            f"api {options.home.api_socket}",
            flush=True,
        )
        log.info("daemon ready; node ID %s", node.identity.node_id)
        log.info(
            "use it from another terminal: P2PNODE_HOME=%s p2pnode status | inbox --follow | "
            "send ID-OR-CONTACT 'hello'; others send to it with: p2pnode send %s 'hello'",
            options.home.path,
            node.identity.node_id,
        )
        notify_systemd("READY=1")
    notify_systemd("STOPPING=1")
    log.info("stopped")


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
        notify_systemd("READY=1")
    log.info("stopped")


def _run(main: Callable[[Any], Awaitable[None]], arg: Any) -> None:
    """``trio.run`` that reports a start-up failure as itself, not wrapped in the exception
    group the nursery adds."""
    try:
        trio.run(main, arg)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise
    finally:
        sys.stdout.flush()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def run_dht_only(config: DhtConfig) -> None:
    """Synchronous entry point of :func:`serve_dht_only`."""
    _run(serve_dht_only, config)


def run_daemon(options: DaemonOptions) -> None:
    """Synchronous entry point of :func:`serve_daemon`."""
    _run(serve_daemon, options)
