"""The daemon as a process: private socket and home, one daemon per home, readiness (stdout and
systemd), clean shutdown on SIGTERM, and refusal of API connections from other users.

Every daemon here is a real ``p2pnode daemon`` subprocess on loopback; every wait is a
condition with a deadline, and every process started is stopped whatever the outcome.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from p2pnode.clock import wall_clock_ms
from p2pnode.home import NodeHome
from p2pnode.keystore import init_node
from p2pnode.nodeid import NodeId
from p2pnode.testnet import Testnet

#: Seconds a daemon has to print its ready line, or to exit after SIGTERM.
DEADLINE = 20.0
#: A clean shutdown on SIGTERM must be this quick (links closed, store closed, socket removed).
SHUTDOWN_LIMIT = 5.0
#: The user another process runs as (``nobody``).
OTHER_UID = 65534

READY_LINE = re.compile(
    r"ready id (?P<id>[A-Z2-7]{7}(?:-[A-Z2-7]{7}){7})"
    r" links (?P<links>127\.0\.0\.1:\d+)"
    r" dht (?P<dht>127\.0\.0\.1:\d+)"
    r" api (?P<api>\S+)\n"
)


def daemon_command(home: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "p2pnode", "daemon",
        "--home", str(home),
        "--listen", "127.0.0.1:0",
        "--dht-host", "127.0.0.1", "--dht-port", "0",
        "--seeds", os.devnull,
        *extra,
    ]  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_")}
    env.pop("NOTIFY_SOCKET", None)
    return env | extra


def new_home(path: Path) -> str:
    """Create a node in ``path``; returns its ID."""
    return str(init_node(NodeHome(path), None, wall_clock_ms()).identity.node_id)


async def read_line(stream: trio.abc.ReceiveStream, deadline: float = DEADLINE) -> bytes:
    """One line from ``stream`` (b"" if it ends first)."""
    line = b""
    with trio.fail_after(deadline):
        while not line.endswith(b"\n"):
            chunk = await stream.receive_some(1)
            if not chunk:
                break
            line += chunk
    return line


async def stop_process(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL if it lingers; always reaps it."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(DEADLINE):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def own_daemon(
    home: Path, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[trio.Process, str]]:
    """Run a daemon on ``home`` until the block ends; yields it and its ready line."""
    log = open(home.parent / f"{home.name}.log", "ab")  # noqa: SIM115 (handed to the child)
    try:
        process = await trio.lowlevel.open_process(
            daemon_command(home),
            stdout=subprocess.PIPE,
            stderr=log,
            env=env or clean_env(),
        )
    finally:
        log.close()
    try:
        assert process.stdout is not None
        line = await read_line(process.stdout)
        yield process, line.decode(errors="replace")
    finally:
        await stop_process(process)
        if process.stdout is not None:
            await process.stdout.aclose()


def lock_is_free(home: Path) -> bool:
    """True if nothing holds the home's daemon lock."""
    fd = os.open(home / "daemon.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


# --- permissions ---------------------------------------------------------------------------


async def test_api_socket_is_0600_in_a_0700_home(tmp_path: Path) -> None:
    async with Testnet(n=1, root=tmp_path) as net:
        node = net[0]
        home_info = os.stat(node.home)
        sock_info = os.lstat(node.api_socket)

        assert stat.S_ISDIR(home_info.st_mode)
        assert stat.S_IMODE(home_info.st_mode) == 0o700
        assert home_info.st_uid == os.geteuid()
        assert stat.S_ISSOCK(sock_info.st_mode)
        assert stat.S_IMODE(sock_info.st_mode) == 0o600
        assert sock_info.st_uid == os.geteuid()


# --- one daemon per home -------------------------------------------------------------------


async def test_second_daemon_on_the_same_home_is_refused(tmp_path: Path) -> None:
    async with Testnet(n=1, root=tmp_path) as net:
        first = net[0]
        assert first.process is not None

        with trio.fail_after(DEADLINE):
            second = await trio.run_process(
                daemon_command(first.home),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=clean_env(),
            )

        message = second.stderr.decode()
        assert second.returncode == 1, message
        assert "another p2pnode daemon" in message
        assert f"pid {first.process.pid}" in message
        assert str(first.home) in message
        assert "Traceback" not in message
        assert b"ready" not in second.stdout
        # The first one is untouched: running, its socket in place and answering.
        assert first.running
        assert stat.S_ISSOCK(os.lstat(first.api_socket).st_mode)
        assert (await first.api("GET", "/v1/identity"))["id"] == first.id


# --- readiness -----------------------------------------------------------------------------


async def test_ready_line_and_systemd_notification(tmp_path: Path) -> None:
    home = tmp_path / "node"
    node_id = new_home(home)
    notify_path = tmp_path / "notify.sock"
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with notify:
        await notify.bind(str(notify_path))
        env = clean_env(NOTIFY_SOCKET=str(notify_path))
        async with own_daemon(home, env) as (process, line):
            match = READY_LINE.fullmatch(line)
            assert match, line
            assert match["id"] == node_id
            assert NodeId.parse(match["id"]) == NodeId.parse(node_id)
            assert match["api"] == str(NodeHome(home).api_socket)
            # The line is printed once the API serves: it answers at once.
            assert stat.S_ISSOCK(os.lstat(match["api"]).st_mode)

            with trio.fail_after(DEADLINE):
                message = await notify.recv(4096)
            assert message == b"READY=1"

            process.send_signal(signal.SIGTERM)
            with trio.fail_after(DEADLINE):
                stopping = await notify.recv(4096)
                status = await process.wait()
            assert stopping == b"STOPPING=1"
            assert status == 0


# --- shutdown ------------------------------------------------------------------------------


async def test_sigterm_stops_cleanly_and_releases_the_home(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path) as net:
        node = net[1]
        message_id = await net[0].send(node, "before the stop")
        await net[0].wait_delivered(message_id)
        assert not lock_is_free(node.home)

        started = time.monotonic()
        status = await net.stop(1)
        took = time.monotonic() - started

        assert status == 0
        assert took < SHUTDOWN_LIMIT, f"SIGTERM took {took:.1f} s"
        assert not node.api_socket.exists()
        assert lock_is_free(node.home)
        log = node.log_path.read_text(errors="replace")
        assert "Traceback" not in log
        assert "SIGTERM" in log

        # The home is free: a new daemon starts on it and still has the message.
        await net.restart(1)
        inbox = await node.inbox()
        assert [m.body for m in inbox] == [b"before the stop"]


async def test_killed_daemon_leaves_a_stale_socket_that_is_handled(tmp_path: Path) -> None:
    async with Testnet(n=1, root=tmp_path) as net:
        node = net[0]
        await net.kill(0)
        assert node.api_socket.exists()  # SIGKILL gives no chance to clean up

        with trio.fail_after(DEADLINE):
            client = await trio.run_process(
                [sys.executable, "-m", "p2pnode", "status", "--home", str(node.home)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=clean_env(),
            )
        assert client.returncode == 3, client.stderr
        assert b"p2pnode daemon" in client.stderr

        await net.restart(0)  # the stale socket is replaced; the lock died with the process
        assert (await node.api("GET", "/v1/identity"))["id"] == node.id


# --- other users ---------------------------------------------------------------------------

# Run as another user: connect to the socket, send a request, report what happened.
_PROBE = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    print("permission-denied"); sys.exit()
try:
    sock.sendall(b"GET /v1/identity HTTP/1.1\r\nHost: p2pnode\r\nConnection: close\r\n\r\n")
    data = sock.recv(4096)
except (BrokenPipeError, ConnectionResetError):
    data = b""
print("answered " + data.split(b"\r\n")[0].decode() if data else "closed")
"""


@pytest.fixture
def world_traversable_dir() -> Iterator[Path]:
    """A directory under the system temp dir that every user may traverse (pytest's own temp
    directories are 0700, so another user could not reach anything inside them)."""
    path = Path(tempfile.mkdtemp(prefix="p2pnode-uid-"))
    try:
        path.chmod(0o711)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def python_for(uid: int) -> str:
    """A Python interpreter ``uid`` can run (the test's own may live in root's home)."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not candidate:
            continue
        try:
            result = subprocess.run(
                [candidate, "-I", "-c", "pass"],
                user=uid,
                group=uid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                timeout=DEADLINE,
                check=False,
            )
        except (PermissionError, FileNotFoundError):
            continue
        if result.returncode == 0:
            return candidate
    pytest.skip(f"no Python interpreter that user id {uid} may run")


def probe_as(uid: int, python: str, path: Path) -> str:
    result = subprocess.run(
        [python, "-I", "-c", _PROBE, str(path)],
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the test runs a client as another user id (nobody, 65534)",
)
async def test_other_users_are_refused(world_traversable_dir: Path) -> None:
    python = python_for(OTHER_UID)
    async with Testnet(n=1, root=world_traversable_dir) as net:
        node = net[0]
        sock = node.api_socket
        probe = trio.to_thread.run_sync

        # 1. The file permissions alone keep another user out: home 0700, socket 0600.
        assert await probe(probe_as, OTHER_UID, python, sock) == "permission-denied"
        node.home.chmod(0o711)  # now the home can be traversed, but the socket is 0600
        assert await probe(probe_as, OTHER_UID, python, sock) == "permission-denied"

        # 2. With the socket opened to everyone, the server still refuses by SO_PEERCRED:
        # the connection is closed without a byte of HTTP.
        sock.chmod(0o666)
        assert await probe(probe_as, OTHER_UID, python, sock) == "closed"
        with trio.fail_after(DEADLINE):
            while f"user id {OTHER_UID} refused" not in node.log_path.read_text(errors="replace"):
                await trio.sleep(0.05)

        # 3. The owner is still served, on the same socket.
        owner = await probe(probe_as, os.geteuid(), sys.executable, sock)
        assert owner.startswith("answered HTTP/1.1 200"), owner
        assert (await node.api("GET", "/v1/identity"))["id"] == node.id
