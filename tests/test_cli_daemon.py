"""The ``p2pnode`` CLI as users run it: real subprocesses against real daemons.

Covers the send/receive flow by contact name and by ID, the ``--json`` shapes of the commands
that print data, ``inbox --follow``, and every exit code: 0 success, 1 error, 2 usage error,
3 daemon not running, 4 not delivered within ``--timeout``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from p2pnode.clock import wall_clock_ms
from p2pnode.home import NodeHome
from p2pnode.keystore import init_node
from p2pnode.nodeid import NodeId
from p2pnode.testnet import Testnet

#: Seconds one CLI command may take (start-up of the interpreter included).
COMMAND_DEADLINE = 30.0
#: Seconds to wait for a followed message to be printed.
FOLLOW_DEADLINE = 20.0

INBOX_FIELDS = {"id", "from", "body", "sent_at", "received_at"}


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def clean_env() -> dict[str, str]:
    """The environment without anything that would pick a home or passphrase for the CLI."""
    return {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_")}


async def p2pnode(*args: str | Path, home: Path | None = None, stdin: bytes = b"") -> Ran:
    """Run ``python -m p2pnode ARGS [--home HOME]`` and return what it did."""
    command = [sys.executable, "-m", "p2pnode", *map(str, args)]
    if home is not None:
        command += ["--home", str(home)]
    with trio.fail_after(COMMAND_DEADLINE):
        done = await trio.run_process(
            command,
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_env(),
        )
    return Ran(done.returncode, done.stdout.decode(), done.stderr.decode())


async def run_all(*commands: tuple[tuple[str | Path, ...], Path | None]) -> list[Ran]:
    """Run independent commands concurrently (each CLI start costs about half a second)."""
    results: list[Ran | None] = [None] * len(commands)

    async def one(index: int, args: tuple[str | Path, ...], home: Path | None) -> None:
        results[index] = await p2pnode(*args, home=home)

    async with trio.open_nursery() as nursery:
        for index, (args, home) in enumerate(commands):
            nursery.start_soon(one, index, args, home)
    return [r for r in results if r is not None]


def ok(ran: Ran) -> Ran:
    assert ran.code == 0, (ran.code, ran.out, ran.err)
    return ran


def mistyped(node_id: str) -> str:
    """``node_id`` with one character changed: the check character catches it."""
    replacement = "B" if node_id[3] != "B" else "C"
    return node_id[:3] + replacement + node_id[4:]


# --- the send/receive flow -------------------------------------------------------------------


async def test_contacts_send_and_inbox(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path) as net:
        alice, bob = net[0], net[1]

        # contacts add / list, with their JSON shapes.
        added = ok(await p2pnode("contacts", "add", "Bob", bob.id, "--json", home=alice.home))
        assert added.json() == {"name": "Bob", "id": bob.id}
        listed = ok(await p2pnode("contacts", "list", "--json", home=alice.home)).json()
        assert [(c["name"], c["id"]) for c in listed] == [("Bob", bob.id)]
        assert isinstance(listed[0]["added_at"], int)
        text = ok(await p2pnode("contacts", "list", home=alice.home)).out
        assert "Bob" in text
        assert bob.id in text

        # send by contact name (any case) and by ID: both wait for the receipt.
        by_name, by_id = await run_all(
            (("send", "bob", "hello by name", "--json"), alice.home),
            (("send", bob.id, "hello by id", "--json"), alice.home),
        )
        for ran in (by_name, by_id):
            data = ok(ran).json()
            assert data["state"] == "delivered"
            assert len(bytes.fromhex(data["id"])) == 16
            assert data["to"] == bob.id
            assert (await alice.message_state(data["id"]))["state"] == "delivered"
        piped = ok(await p2pnode("send", "Bob", "-", home=alice.home, stdin=b"from stdin\n"))
        assert piped.out.startswith("delivered ")

        # inbox --json on the receiving side: a list of objects, newest first.
        inbox = ok(await p2pnode("inbox", "--json", home=bob.home)).json()
        assert isinstance(inbox, list)
        for message in inbox:
            assert message.keys() >= INBOX_FIELDS
            assert message["from"] == alice.id
            assert isinstance(message["sent_at"], int)
            assert isinstance(message["received_at"], int)
            assert message["received_at"] >= message["sent_at"] - 60_000
        bodies = [m["body"] for m in inbox]
        assert sorted(bodies) == sorted(["hello by name", "hello by id", "from stdin\n"])
        assert bodies[0] == "from stdin\n"  # the last one sent
        ids = {m["id"] for m in inbox}
        assert {by_name.json()["id"], by_id.json()["id"]} <= ids

        # --unread, and the text form naming the sender by petname once bob knows alice.
        ok(await p2pnode("contacts", "add", "alice", alice.id, home=bob.home))
        unread = ok(await p2pnode("inbox", "--unread", "--mark-read", home=bob.home)).out
        assert "alice: hello by name" in unread
        assert ok(await p2pnode("inbox", "--unread", "--json", home=bob.home)).json() == []

        # rename and rm, with the name usable (and then unusable) as a recipient.
        renamed = ok(
            await p2pnode("contacts", "rename", "Bob", "Robert", "--json", home=alice.home)
        )
        assert renamed.json() == {"name": "Robert", "id": bob.id}
        ok(await p2pnode("send", "Robert", "after rename", home=alice.home))
        await bob.wait_for_message(body="after rename", sender=alice)
        removed = ok(await p2pnode("contacts", "rm", "Robert", home=alice.home))
        assert "Robert" in removed.out
        assert ok(await p2pnode("contacts", "list", "--json", home=alice.home)).json() == []
        gone = await p2pnode("send", "Robert", "nobody", home=alice.home)
        assert gone.code == 1
        assert "Robert" in gone.err


async def test_inbox_follow_prints_messages_as_they_arrive(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path) as net:
        sender, receiver = net[0], net[1]
        # One message already there: its line shows that the follower has listed the inbox
        # and is about to subscribe to the event stream.
        await sender.wait_delivered(await sender.send(receiver, "earlier"))

        command = [sys.executable, "-m", "p2pnode", "inbox", "--follow", "--json"]
        command += ["--home", str(receiver.home)]
        follower = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()
        )
        try:
            assert follower.stdout is not None
            lines = LineReader(follower.stdout)
            first = json.loads(await lines.next())
            assert first["body"] == "earlier"
            assert first.keys() >= INBOX_FIELDS

            # The event stream opens just after the listing: keep sending until one arrives
            # through it (normally the first), with an overall deadline.
            with trio.fail_after(FOLLOW_DEADLINE):
                attempt = 0
                while True:
                    attempt += 1
                    body = f"live {attempt}"
                    message_id = await sender.send(receiver, body)
                    with trio.move_on_after(FOLLOW_DEADLINE / 4):
                        event = json.loads(await lines.next())
                        break
                await sender.wait_delivered(message_id)

            assert event["type"] == "message"  # from the event stream, not the listing
            assert event["body"] == body
            assert event["id"] == message_id
            assert event["from"] == sender.id
            assert event.keys() >= INBOX_FIELDS
            assert isinstance(event["sent_at"], int)
            assert isinstance(event["received_at"], int)
        finally:
            with trio.CancelScope(shield=True):
                if follower.returncode is None:
                    follower.terminate()
                    with trio.move_on_after(COMMAND_DEADLINE):
                        await follower.wait()
                    if follower.returncode is None:
                        follower.kill()
                        await follower.wait()
                for stream in (follower.stdout, follower.stderr):
                    if stream is not None:
                        await stream.aclose()


class LineReader:
    """Lines of a process's output, each awaited with the caller's deadline."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        with trio.fail_after(FOLLOW_DEADLINE):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(4096)
                if not chunk:
                    raise AssertionError(f"output ended; partial line {self.buffer!r}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


# --- data commands' JSON ---------------------------------------------------------------------


async def test_id_status_peers_and_dht_find_json(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path) as net:
        a, b = net[0], net[1]
        # A delivered message opens a link between the two.
        await a.wait_delivered(await a.send(b, "link up"))

        ident, status, peers, found, missing = await run_all(
            (("id", "--json"), a.home),
            (("status", "--json"), a.home),
            (("peers", "--json"), b.home),
            (("dht", "find", b.id, "--json"), a.home),
            (("dht", "find", str(NodeId.from_key(os.urandom(32))), "--timeout", "2"), a.home),
        )

        data = ok(ident).json()
        assert data["id"] == a.id
        assert data["home"] == str(a.home)

        data = ok(status).json()
        assert data["id"] == a.id
        assert isinstance(data["version"], str)
        assert data["uptime_s"] >= 0
        assert data["listen"] == a.links
        assert data["dht"]["address"] == a.dht
        assert data["dht"]["routing_table_size"] >= 1
        assert data["outbox"]["delivered"] == 1
        assert set(data["outbox"]) == {"queued", "sent", "delivered", "failed"}
        assert data["unread"] == 0
        assert isinstance(data["links_open"], int)

        data = ok(peers).json()
        assert set(data) == {"links", "dht_contacts"}
        assert all(set(link) >= {"id", "name"} for link in data["links"])
        assert a.id in [link["id"] for link in data["links"]]
        assert a.dht in [c["address"] for c in data["dht_contacts"]]

        data = ok(found).json()
        assert data["id"] == b.id
        assert data["addresses"] == [b.links]
        assert data["seq"] >= 1
        assert data["expires"] > wall_clock_ms()

        assert missing.code == 1
        assert missing.err.startswith("Error: ")

        # The text forms show the same facts.
        text = ok(await p2pnode("status", home=a.home)).out
        assert a.id in text
        assert "1 delivered" in text


# --- exit codes ------------------------------------------------------------------------------


async def test_no_daemon_is_exit_3_and_says_how_to_start_it(tmp_path: Path) -> None:
    home = tmp_path / "idle"
    init_node(NodeHome(home), None, wall_clock_ms())
    never = tmp_path / "never-created"
    someone = str(NodeId.from_key(os.urandom(32)))
    commands: list[tuple[str, ...]] = [
        ("status",),
        ("status", "--json"),
        ("peers",),
        ("contacts", "list"),
        ("contacts", "add", "x", someone),
        ("contacts", "rm", "x"),
        ("send", someone, "hi"),
        ("inbox",),
        ("inbox", "--follow", "--json"),
        ("dht", "find", someone),
    ]
    results = await run_all(
        *[(args, home) for args in commands], *[(args, never) for args in commands[:2]]
    )
    for args, ran in zip([*commands, *commands[:2]], results, strict=True):
        assert ran.code == 3, (args, ran)
        assert "p2pnode daemon" in ran.err, (args, ran.err)
        assert "--home" in ran.err
        assert "Traceback" not in ran.err

    # `id` reads the home, not the daemon: it works without one.
    assert ok(await p2pnode("id", "--json", home=home)).json()["home"] == str(home)


async def test_undelivered_within_timeout_is_exit_4_and_stays_queued(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path) as net:
        sender, receiver = net[0], net[1]
        assert await net.stop(1) == 0

        ran = await p2pnode("send", receiver.id, "while you were out", "--timeout", "1", "--json",
                            home=sender.home)  # fmt: skip

        assert ran.code == 4, ran
        assert "stays queued" in ran.err
        data = ran.json()  # --json still reports the id and state
        assert data["state"] in ("queued", "sent")
        state = await sender.message_state(data["id"])
        assert state["state"] in ("queued", "sent")

        await net.restart(1)
        await sender.wait_delivered(data["id"])
        received = await receiver.wait_for_message(body="while you were out")
        assert received.id == data["id"]


async def test_no_wait_returns_once_queued(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path) as net:
        ran = ok(await p2pnode("send", net[1].id, "fire and forget", "--no-wait", "--json",
                               home=net[0].home))  # fmt: skip
        data = ran.json()
        assert data["state"] == "queued"
        await net[0].wait_delivered(data["id"])


async def test_usage_errors_are_exit_2(tmp_path: Path) -> None:
    home = tmp_path / "node"
    init_node(NodeHome(home), None, wall_clock_ms())
    someone = str(NodeId.from_key(os.urandom(32)))
    commands: list[tuple[str, ...]] = [
        ("send", "--bogus", someone, "hi"),
        ("send",),
        ("send", someone, "hi", "--timeout", "-1"),
        ("contacts", "add", "only-a-name"),
        ("contacts", "rename", "old"),
        ("contacts", "rm"),
        ("inbox", "--limit", "0"),
        ("dht", "find"),
        ("status", "--verbose"),
        ("no-such-command",),
    ]
    results = await run_all(*[(args, home) for args in commands])
    for args, ran in zip(commands, results, strict=True):
        assert ran.code == 2, (args, ran)
        assert "Usage:" in ran.err, (args, ran.err)
        assert ran.out == ""


async def test_errors_are_exit_1_and_say_what_is_wrong(tmp_path: Path) -> None:
    async with Testnet(n=1, root=tmp_path) as net:
        node = net[0]
        someone = str(NodeId.from_key(os.urandom(32)))
        bad = mistyped(someone)
        ok(await p2pnode("contacts", "add", "Zed", someone, home=node.home))

        unknown, typo_send, typo_add, typo_find, dup, no_contact = await run_all(
            (("send", "Nemo", "hi"), node.home),
            (("send", bad, "hi"), node.home),
            (("contacts", "add", "typo", bad), node.home),
            (("dht", "find", bad), node.home),
            (("contacts", "add", "zed", str(NodeId.from_key(os.urandom(32)))), node.home),
            (("contacts", "rename", "Nemo", "Captain"), node.home),
        )
        for ran in (unknown, typo_send, typo_add, typo_find, dup, no_contact):
            assert ran.code == 1, ran
            assert ran.err.startswith("Error: ")
            assert "Traceback" not in ran.err
        assert "'Nemo'" in unknown.err
        assert "contact name" in unknown.err
        for ran in (typo_send, typo_add, typo_find):
            assert "check failed in characters" in ran.err, ran.err
        assert "already exists" in dup.err
        assert "no contact named 'Nemo'" in no_contact.err
        # Nothing was queued by the failed sends.
        status = ok(await p2pnode("status", "--json", home=node.home)).json()
        assert sum(status["outbox"].values()) == 0


@pytest.fixture
def closing_socket_home(tmp_path: Path) -> Iterator[Path]:
    """A home whose api.sock accepts connections and closes them at once, as the daemon does
    for another user's process."""
    home = tmp_path / "node"
    init_node(NodeHome(home), None, wall_clock_ms())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(NodeHome(home).api_socket))
    listener.listen()
    listener.settimeout(0.1)  # so that the thread sees `stop` soon
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield home
    finally:
        stop.set()
        thread.join(COMMAND_DEADLINE)
        listener.close()


async def test_a_connection_cut_off_is_exit_1_with_a_message(closing_socket_home: Path) -> None:
    for args in (("status",), ("inbox", "--follow")):
        ran = await p2pnode(*args, home=closing_socket_home)
        assert ran.code == 1, ran
        assert "cannot talk to the daemon" in ran.err
        assert "Traceback" not in ran.err
