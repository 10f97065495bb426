"""A network of real p2pnode daemons on one machine, for integration tests.

::

    async with Testnet(n=5) as net:          # homes in a temporary directory
        await net[1].send(net[3], "hi")
        message = await net[3].wait_for_message(body="hi")
        await net[3].kill()                  # SIGKILL: a crash
        await net[3].restart()

Every node is a ``p2pnode daemon`` subprocess with its own home under ``root``, listening on
loopback with ports picked by the system; the first node is the DHT bootstrap of the others.
Readiness is the daemon's own "ready" line, waited for with a deadline, never a fixed sleep.
Leaving the ``async with`` stops every process it started (SIGTERM, then SIGKILL after
:data:`STOP_TIMEOUT`).

Where the files go: with ``root=DIR`` the homes and each node's log (``DIR/node3.log``) stay
there afterwards. Without a root they go to a new temporary directory, removed when the block
exits normally and kept when it exits with an exception: then its path is logged (warning) and
added as a note to the exception, so the traceback says where the logs are.

Fault injection: with ``proxied=True`` every node sits behind its own
:class:`~p2pnode.faultproxy.FaultProxy`: the daemon advertises the proxy's address in its DHT
record (``--advertise``), so other nodes open links to it only through the proxy.
``net.proxy(i)`` gives node ``i``'s proxy (delay, drop, duplicate, cut), and
``net.partition(*indices)`` / ``net.heal()`` cut and restore the proxies of those nodes. What a
partition is here, precisely: every link *into* a partitioned node (dialled by another node) is
closed at once and no new one can be opened until healed. Links a partitioned node dials itself
go through the *other* node's proxy and are not affected, and the DHT's UDP traffic is not
proxied at all, so a partitioned node still finds records and is still found. A test that wants
a node unreachable must therefore not let it dial out (not send from it) while partitioned.

The daemons run in their own session (process group), so a Ctrl-C in the terminal reaches only
the program that runs the testnet, which then stops them in order.

The API calls (:meth:`TestNode.send` and friends) go through the node's control socket, as
the CLI's do; they run the blocking client in a worker thread.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from p2pnode.api.client import ApiClient, ApiClientError
from p2pnode.clock import wall_clock_ms
from p2pnode.dht.seeds import format_host_port
from p2pnode.faultproxy import FaultProxy
from p2pnode.home import NodeHome
from p2pnode.keystore import init_node
from p2pnode.nodeid import NodeId

log = logging.getLogger(__name__)

#: Seconds a daemon has to print its ready line.
START_TIMEOUT: Final = 30.0
#: Seconds a daemon has to exit after SIGTERM before it is killed.
STOP_TIMEOUT: Final = 10.0
#: Default seconds :meth:`TestNode.wait_for_message` and :meth:`TestNode.wait_delivered` wait.
WAIT_TIMEOUT: Final = 30.0
#: Seconds between polls of a node's inbox or outbox while waiting on a condition.
POLL_INTERVAL: Final = 0.05
#: Longest path of a Unix socket on Linux (``sun_path`` is 108 bytes with its final NUL). A
#: root so deep that ``<root>/nodeN/api.sock`` is longer cannot work; it is refused up front.
MAX_SOCKET_PATH: Final = 107
#: Prefix of the temporary directory made when no root is given.
TEMP_PREFIX: Final = "p2pnode-testnet-"


class TestnetError(Exception):
    """A node did not start, or a condition was not met in time."""

    __test__ = False  # not a pytest test class


@dataclass
class Received:
    """A message as a node's inbox shows it."""

    id: str
    sender: str
    body: bytes
    sent_at: int
    received_at: int


@dataclass
class TestNode:
    """One daemon of a :class:`Testnet`."""

    __test__ = False

    name: str
    home: Path
    id: str
    extra_args: Sequence[str] = ()
    process: trio.Process | None = None
    #: The daemon's own link address (``HOST:PORT``), as its ready line gave it.
    links: str | None = None
    #: Its DHT address (``HOST:PORT``): what other nodes bootstrap through.
    dht: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    #: Its fault proxy when the testnet is ``proxied`` (the address peers dial), else None.
    proxy: FaultProxy | None = field(default=None, repr=False)
    net: Testnet | None = field(default=None, repr=False, compare=False)

    @property
    def identity_key(self) -> bytes:
        """The node's identity key."""
        return NodeId.parse(self.id).key

    @property
    def api_socket(self) -> Path:
        """The node's control socket."""
        return NodeHome(self.home).api_socket

    @property
    def log_path(self) -> Path:
        """Where the daemon's stderr goes."""
        return self.home.parent / f"{self.name}.log"

    @property
    def running(self) -> bool:
        """True while the daemon process is alive."""
        return self.process is not None and self.process.returncode is None

    @property
    def advertised(self) -> str | None:
        """The link address other nodes dial: the proxy's when proxied, else :attr:`links`."""
        if self.proxy is not None and self.proxy.address is not None:
            return format_host_port(self.proxy.address)
        return self.links

    # --- lifecycle (see the Testnet methods of the same names) ----------------------------

    def _testnet(self) -> Testnet:
        if self.net is None:
            raise TestnetError(f"{self.name} does not belong to a running testnet")
        return self.net

    async def stop(self) -> int:
        """Stop this node cleanly (SIGTERM); returns its exit status."""
        return await self._testnet().stop(self)

    async def kill(self) -> None:
        """Kill this node at once (SIGKILL): a crash."""
        await self._testnet().kill(self)

    async def restart(self, *, bootstrap: Sequence[str] | None = None) -> TestNode:
        """Start this node again on its home (stopping it first if it runs)."""
        return await self._testnet().restart(self, bootstrap=bootstrap)

    # --- API ------------------------------------------------------------------------------

    async def api(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> Any:
        """Call the node's control API (see docs/API.md)."""
        client = ApiClient(self.api_socket, timeout=timeout)
        return await trio.to_thread.run_sync(lambda: client.request(method, path, body))

    async def status(self) -> dict[str, Any]:
        """The node's ``/v1/status``: links, outbox counts by state, unread count."""
        result: dict[str, Any] = await self.api("GET", "/v1/status")
        return result

    async def send(self, to: str | TestNode, body: str | bytes) -> str:
        """Queue a message to a node ID, a contact name or another node; returns its id once
        it is durably queued."""
        recipient = to.id if isinstance(to, TestNode) else to
        payload = body.encode() if isinstance(body, str) else body
        answer = await self.api(
            "POST",
            "/v1/messages",
            {"to": recipient, "body_b64": base64.b64encode(payload).decode()},
        )
        return str(answer["id"])

    async def message_state(self, message_id: str) -> dict[str, Any]:
        """The outbox entry of a message this node sent."""
        result: dict[str, Any] = await self.api("GET", f"/v1/messages/{message_id}")
        return result

    async def wait_delivered(self, message_id: str, *, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until a message this node sent is delivered.

        Raises:
            TestnetError: if it failed, or was not delivered within ``timeout``.
        """
        with trio.move_on_after(timeout):
            while True:
                state = await self.message_state(message_id)
                if state["state"] == "delivered":
                    return
                if state["state"] == "failed":
                    raise TestnetError(
                        f"{self.name}: message {message_id} failed: {state['last_error']}"
                    )
                await trio.sleep(POLL_INTERVAL)
        raise TestnetError(f"{self.name}: message {message_id} not delivered within {timeout} s")

    async def inbox(self) -> list[Received]:
        """Every message in the node's inbox, oldest first."""
        rows: list[Received] = []
        before: int | None = None
        while True:
            query = "/v1/inbox?limit=1000" + (f"&before={before}" if before else "")
            page = await self.api("GET", query)
            rows.extend(
                Received(
                    m["id"],
                    m["from"],
                    base64.b64decode(m["body_b64"]),
                    m["sent_at"],
                    m["received_at"],
                )
                for m in page
            )
            if len(page) < 1000:
                break
            before = page[-1]["seq"]
        rows.reverse()
        return rows

    async def wait_for_message(
        self,
        predicate: Callable[[Received], bool] | None = None,
        *,
        body: str | bytes | None = None,
        sender: TestNode | str | None = None,
        timeout: float = WAIT_TIMEOUT,
    ) -> Received:
        """Wait until the inbox holds a message matching ``predicate`` / ``body`` / ``sender``.

        Raises:
            TestnetError: if none arrives within ``timeout``.
        """
        want_body = body.encode() if isinstance(body, str) else body
        want_sender = sender.id if isinstance(sender, TestNode) else sender

        def matches(message: Received) -> bool:
            return (
                (want_body is None or message.body == want_body)
                and (want_sender is None or message.sender == want_sender)
                and (predicate is None or predicate(message))
            )

        with trio.move_on_after(timeout):
            while True:
                for message in await self.inbox():
                    if matches(message):
                        return message
                await trio.sleep(POLL_INTERVAL)
        raise TestnetError(f"{self.name}: no matching message within {timeout} s")


class Testnet:
    """N real daemons on loopback. See the module docstring.

    Args:
        n: nodes to start.
        root: directory for the homes and logs (created if missing, kept afterwards); None
            for a temporary directory, removed on a normal exit and kept after an exception.
        extra_args: more ``p2pnode daemon`` options for every node.
        env: extra environment variables for the daemons.
        proxied: put every node behind its own :class:`~p2pnode.faultproxy.FaultProxy`
            (see :meth:`proxy`, :meth:`partition`).

    Resource handling: entering starts the nodes (and proxies) and returns once every one is
    ready; leaving, or :meth:`aclose`, stops every daemon, waits for it to exit, and stops the
    proxies. If a node fails to start, those already started are stopped before the error
    propagates.
    """

    __test__ = False

    def __init__(
        self,
        n: int,
        root: Path | str | None = None,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        proxied: bool = False,
    ) -> None:
        if n < 1:
            raise ValueError("a testnet needs at least one node")
        self._root = Path(root) if root is not None else None
        self._temporary = root is None
        self.initial = n
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.proxied = proxied
        self.nodes: list[TestNode] = []
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None

    @property
    def root(self) -> Path:
        """The directory holding the homes and logs.

        Raises:
            TestnetError: before the testnet is entered when no root was given.
        """
        if self._root is None:
            raise TestnetError("the temporary root is made when the testnet starts")
        return self._root

    def __getitem__(self, index: int) -> TestNode:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[TestNode]:
        return iter(self.nodes)

    async def __aenter__(self) -> Testnet:
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        else:
            self._root.mkdir(parents=True, exist_ok=True)
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            first = await self.add_node()
            try:
                async with trio.open_nursery() as starting:
                    for _ in range(self.initial - 1):
                        starting.start_soon(self._add_quietly, [first.dht or ""])
            except BaseExceptionGroup as group:
                # Nodes that did not start: one error that names them all, not a group.
                failed, rest = group.split(TestnetError)
                if failed is None or rest is not None:
                    raise
                messages = [str(e) for e in _leaves(failed)]
                raise TestnetError("; ".join(messages)) from group
        except BaseException as exc:
            await self.aclose()
            self._keep_or_remove(exc)
            raise
        self.nodes.sort(key=lambda node: int(node.name.removeprefix("node")))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        await self.aclose()
        self._keep_or_remove(exc)

    def _keep_or_remove(self, exc: BaseException | None) -> None:
        """Remove a temporary root after a normal exit; keep it, and say where, after an
        exception."""
        if not self._temporary or self._root is None:
            return
        if exc is None:
            shutil.rmtree(self._root, ignore_errors=True)
            return
        message = f"the testnet's homes and logs are kept in {self._root}"
        log.warning("%s", message)
        exc.add_note(message)

    async def aclose(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and wait for them to exit; stop the
        proxies."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as stopping:
                for node in self.nodes:
                    if node.running:
                        stopping.start_soon(self._stop, node)
        if self._nursery_manager is not None:
            manager, self._nursery_manager = self._nursery_manager, None
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()  # the stdout drains and the proxies
            await manager.__aexit__(None, None, None)

    async def _add_quietly(self, bootstrap: list[str]) -> None:
        await self.add_node(bootstrap=bootstrap)

    def _node(self, which: int | TestNode) -> TestNode:
        return which if isinstance(which, TestNode) else self.nodes[which]

    async def add_node(self, *, bootstrap: Sequence[str] | None = None) -> TestNode:
        """Create and start one more node, joining through ``bootstrap`` (default: every
        running node's DHT address); returns it once ready.

        Raises:
            TestnetError: if it does not become ready within :data:`START_TIMEOUT`, or the
                root is too deep for its control socket.
        """
        if self._nursery is None:
            raise TestnetError("add nodes inside `async with Testnet(...)`")
        name = f"node{len(self.nodes)}"
        home = self.root / name
        socket_path = NodeHome(home).api_socket
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise TestnetError(
                f"{socket_path} is longer than a Unix socket path can be "
                f"({MAX_SOCKET_PATH} bytes); give the testnet a shorter root"
            )
        result = init_node(NodeHome(home), None, wall_clock_ms())
        node = TestNode(name, home, str(result.identity.node_id), self.extra_args, net=self)
        self.nodes.append(node)
        if bootstrap is None:
            bootstrap = [n.dht for n in self.nodes if n.running and n.dht]
        node.bootstrap = list(bootstrap)
        if self.proxied:
            node.proxy = FaultProxy()
            await self._nursery.start(node.proxy.run)
        await self._start(node)
        return node

    async def _start(self, node: TestNode) -> None:
        assert self._nursery is not None
        command = [
            sys.executable, "-m", "p2pnode", "daemon",
            "--home", str(node.home),
            "--listen", "127.0.0.1:0",
            "--dht-host", "127.0.0.1", "--dht-port", "0",
            "--log-format", "json",
            *[arg for address in node.bootstrap if address for arg in ("--bootstrap", address)],
            *node.extra_args,
        ]  # fmt: skip
        if not any(node.bootstrap):
            command += ["--seeds", os.devnull]  # the first node: no seeds at all
        if node.proxy is not None:
            assert node.proxy.address is not None
            # Connections reaching the proxy before the daemon is ready wait for it.
            node.proxy.target = None
            command += ["--advertise", format_host_port(node.proxy.address)]
        stderr = open(node.log_path, "ab")  # noqa: SIM115 (handed to the child process)
        try:
            process = await trio.lowlevel.open_process(
                command,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=self.env,
                start_new_session=True,  # a terminal's Ctrl-C is ours to handle, not theirs
            )
        finally:
            stderr.close()
        node.process = process
        assert process.stdout is not None
        line = b""
        with trio.move_on_after(START_TIMEOUT):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(1)
                if not chunk:
                    break
                line += chunk
        text = line.decode(errors="replace").split()
        if len(text) < 9 or text[0] != "ready":
            await self._stop(node)
            raise TestnetError(
                f"{node.name} did not become ready (got {line!r}); see {node.log_path}"
            )
        node.links, node.dht = text[4], text[6]
        if node.proxy is not None:
            host, _, port = node.links.rpartition(":")
            node.proxy.target = (host.strip("[]"), int(port))
        # Keep draining stdout so the daemon never blocks on a full pipe.
        self._nursery.start_soon(_drain, process.stdout)

    async def _stop(self, node: TestNode, *, sig: int = signal.SIGTERM) -> None:
        process = node.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(sig)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
            return
        log.warning("%s ignored SIGTERM for %s s; killing it", node.name, STOP_TIMEOUT)
        process.kill()
        await process.wait()

    async def stop(self, which: int | TestNode) -> int:
        """Stop a node (by index, or the node) cleanly (SIGTERM); returns its exit status."""
        node = self._node(which)
        await self._stop(node)
        assert node.process is not None
        return int(node.process.returncode or 0)

    async def kill(self, which: int | TestNode) -> None:
        """Kill a node (by index, or the node) at once (SIGKILL): a crash."""
        node = self._node(which)
        if node.running:
            assert node.process is not None
            node.process.kill()
            await node.process.wait()

    async def restart(
        self, which: int | TestNode, *, bootstrap: Sequence[str] | None = None
    ) -> TestNode:
        """Start a node (by index, or the node) again on its home, stopping it first if it
        runs; it joins through ``bootstrap`` (default: the other running nodes)."""
        node = self._node(which)
        if node.running:
            await self._stop(node)
        if bootstrap is None:
            others = [n.dht for n in self.nodes if n is not node and n.running and n.dht]
            bootstrap = others or node.bootstrap
        node.bootstrap = list(bootstrap)
        await self._start(node)
        return node

    # --- faults ------------------------------------------------------------------------------

    def proxy(self, index: int) -> FaultProxy:
        """The fault proxy in front of node ``index``'s link port.

        Raises:
            TestnetError: if the testnet was not started with ``proxied=True``.
        """
        proxy = self.nodes[index].proxy
        if proxy is None:
            raise TestnetError("start the testnet with proxied=True to get fault proxies")
        return proxy

    def partition(self, *indices: int) -> None:
        """Cut off the nodes ``indices``: close every link other nodes opened to them and
        refuse new ones until :meth:`heal` (see the module docstring for what is not cut)."""
        if not indices:
            raise ValueError("name the nodes to partition")
        for index in indices:
            self.proxy(index).cut()

    def heal(self) -> None:
        """Undo every :meth:`partition` (other proxy faults are left as they are)."""
        for node in self.nodes:
            if node.proxy is not None:
                node.proxy.heal()


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    what: str,
    *,
    timeout: float = WAIT_TIMEOUT,
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll ``condition`` every ``interval`` seconds until it holds.

    Raises:
        TestnetError: naming ``what`` if it does not hold within ``timeout`` seconds.
    """
    with trio.move_on_after(timeout):
        while not await condition():
            await trio.sleep(interval)
        return
    raise TestnetError(f"timed out after {timeout} s waiting for {what}")


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


__all__ = [
    "ApiClientError",
    "FaultProxy",
    "Received",
    "TestNode",
    "Testnet",
    "TestnetError",
    "wait_until",
]
