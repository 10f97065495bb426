"""A network of real p2pnode daemons on one machine, for integration tests.

::

    async with Testnet(n=5, root=tmp_path) as net:
        await net[1].send(net[3].id, "hi")
        message = await net[3].wait_for_message(body="hi")
        await net.kill(3)          # SIGKILL
        await net.restart(3)

Every node is a ``p2pnode daemon`` subprocess with its own home under ``root``, listening on
loopback with ports picked by the system; the first node is the DHT bootstrap of the others.
Readiness is the daemon's own "ready" line, waited for with a deadline, never a fixed sleep.
Leaving the ``async with`` stops every process it started (SIGTERM, then SIGKILL after
:data:`STOP_TIMEOUT`); the homes and each node's ``daemon.log`` stay under ``root`` for
inspection.

The API calls (:meth:`TestNode.send` and friends) go through the node's control socket, as
the CLI's do; they run the blocking client in a worker thread.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import trio

from p2pnode.api.client import ApiClient, ApiClientError
from p2pnode.home import NodeHome
from p2pnode.keystore import init_node
from p2pnode.node import wall_clock_ms
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
    links: str | None = None
    dht: str | None = None
    bootstrap: list[str] = field(default_factory=list)

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

    # --- API ------------------------------------------------------------------------------

    async def api(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> Any:
        """Call the node's control API (see docs/API.md)."""
        client = ApiClient(self.api_socket, timeout=timeout)
        return await trio.to_thread.run_sync(lambda: client.request(method, path, body))

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
        root: directory for the homes and logs (kept afterwards).
        extra_args: more ``p2pnode daemon`` options for every node.
        env: extra environment variables for the daemons.
    """

    __test__ = False

    def __init__(
        self,
        n: int,
        root: Path,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a testnet needs at least one node")
        self.root = Path(root)
        self.initial = n
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.nodes: list[TestNode] = []
        self._nursery: trio.Nursery | None = None
        self._nursery_manager: Any = None

    def __getitem__(self, index: int) -> TestNode:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Any:
        return iter(self.nodes)

    async def __aenter__(self) -> Testnet:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        try:
            first = await self.add_node()
            async with trio.open_nursery() as starting:
                for _ in range(self.initial - 1):
                    starting.start_soon(self._add_quietly, [first.dht or ""])
        except BaseException:
            await self.aclose()
            raise
        self.nodes.sort(key=lambda node: int(node.name.removeprefix("node")))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and wait for them to exit."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as stopping:
                for node in self.nodes:
                    if node.running:
                        stopping.start_soon(self._stop, node)
        if self._nursery_manager is not None:
            manager, self._nursery_manager = self._nursery_manager, None
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()  # the stdout drains
            await manager.__aexit__(None, None, None)

    async def _add_quietly(self, bootstrap: list[str]) -> None:
        await self.add_node(bootstrap=bootstrap)

    async def add_node(self, *, bootstrap: Sequence[str] | None = None) -> TestNode:
        """Create and start one more node, joining through ``bootstrap`` (default: every
        running node's DHT address); returns it once ready."""
        name = f"node{len(self.nodes)}"
        home = self.root / name
        result = init_node(NodeHome(home), None, wall_clock_ms())
        node = TestNode(name, home, str(result.identity.node_id), self.extra_args)
        self.nodes.append(node)
        if bootstrap is None:
            bootstrap = [n.dht for n in self.nodes if n.running and n.dht]
        node.bootstrap = list(bootstrap)
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
        stderr = open(node.log_path, "ab")  # noqa: SIM115 (handed to the child process)
        try:
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=stderr, env=self.env
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

    async def stop(self, index: int) -> int:
        """Stop node ``index`` cleanly (SIGTERM); returns its exit status."""
        node = self.nodes[index]
        await self._stop(node)
        assert node.process is not None
        return int(node.process.returncode or 0)

    async def kill(self, index: int) -> None:
        """Kill node ``index`` at once (SIGKILL): a crash."""
        node = self.nodes[index]
        if node.running:
            assert node.process is not None
            node.process.kill()
            await node.process.wait()

    async def restart(self, index: int, *, bootstrap: Sequence[str] | None = None) -> TestNode:
        """Start node ``index`` again on its home (stopping it first if it runs)."""
        node = self.nodes[index]
        if node.running:
            await self._stop(node)
        if bootstrap is None:
            others = [n.dht for n in self.nodes if n is not node and n.running and n.dht]
            bootstrap = others or node.bootstrap
        node.bootstrap = list(bootstrap)
        await self._start(node)
        return node


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


__all__ = ["ApiClientError", "Received", "TestNode", "Testnet", "TestnetError"]
