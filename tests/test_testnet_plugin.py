"""The testnet tooling users run: the harness's own behaviour, the pytest plugin and its
fixtures (in this run and in a user's project, with and without pytest-trio), and
``p2pnode testnet up``.

Everything runs real daemons on loopback; every wait has a deadline, and each test checks that
no daemon it started is left running.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from p2pnode.home import NodeHome
from p2pnode.testnet import Testnet, TestnetError

pytest_plugins = ["pytester"]

#: Seconds for the CLI's network to come up, or to stop.
CLI_DEADLINE = 60.0


def daemon_running(home: Path) -> bool:
    """True if a daemon holds the home's lock (the lock dies with the process)."""
    lock = home / "daemon.lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A new directory with a short path (pytester's own paths are deep, and a control
    socket's path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="p2pt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the harness ----------------------------------------------------------------------------


async def test_temporary_root_is_removed_after_a_clean_exit() -> None:
    async with Testnet(n=1) as net:
        root = net.root
        assert (root / "node0" / "identity.key").exists()
    assert not root.exists()


async def test_temporary_root_is_kept_and_named_after_an_exception() -> None:
    with pytest.raises(RuntimeError) as info:
        async with Testnet(n=1) as net:
            root = net.root
            raise RuntimeError("the test failed")
    try:
        assert (root / "node0.log").exists(), "the node's log is kept for inspection"
        assert not daemon_running(root / "node0")
        assert f"kept in {root}" in "\n".join(info.value.__notes__)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_node_stop_kill_restart_and_the_proxy_needs_proxied(tmp_path: Path) -> None:
    async with Testnet(n=2, root=tmp_path) as net:
        node = net[1]
        assert await node.stop() == 0
        assert not node.running and not daemon_running(node.home)
        await node.restart()
        assert node.running
        await node.kill()
        assert not node.running and not daemon_running(node.home)
        await node.restart()
        message = await net[0].send(node, "after a crash")
        await net[0].wait_delivered(message)
        with pytest.raises(TestnetError, match="proxied=True"):
            net.proxy(0)
    assert not any(daemon_running(n.home) for n in net)


async def test_a_root_too_deep_for_a_control_socket_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TestnetError, match="shorter root"):
        async with Testnet(n=1, root=tmp_path / ("d" * 100)):
            pass


# --- the plugin, in this run ----------------------------------------------------------------


def test_plugin_is_installed_as_a_pytest11_entry_point() -> None:
    points = importlib.metadata.entry_points(group="pytest11")
    ours = [p for p in points if p.name == "p2pnode"]
    assert [p.value for p in ours] == ["p2pnode.pytest_plugin"], (
        "the p2pnode pytest plugin is not installed; reinstall the package (make install)"
    )


def test_loading_the_plugin_does_not_import_trio() -> None:
    code = "import sys, p2pnode.pytest_plugin; print('trio' in sys.modules)"
    result = subprocess.run(  # noqa: PLW1510 (the exit status is checked below)
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.mark.testnet(n=2)
async def test_testnet_fixture(testnet: Testnet) -> None:
    assert len(testnet) == 2
    await testnet[0].send(testnet[1], "through the fixture")
    message = await testnet[1].wait_for_message(body="through the fixture")
    assert message.sender == testnet[0].id


async def test_testnet_factory_fixture_starts_independent_networks(
    testnet_factory: Callable[..., Awaitable[Testnet]],
) -> None:
    plain = await testnet_factory(n=1)
    proxied = await testnet_factory(n=1, proxied=True)
    assert plain.root != proxied.root
    assert proxied[0].advertised != proxied[0].links  # peers dial its proxy
    assert plain[0].running and proxied[0].running


# --- the plugin, in a user's project ---------------------------------------------------------

USER_TESTS = """
import pytest

@pytest.mark.testnet(n=2)
async def test_send(testnet):
    await testnet[0].send(testnet[1], "hi")
    message = await testnet[1].wait_for_message(body="hi", sender=testnet[0])
    assert message.body == b"hi"

async def test_default_size(testnet):
    assert len(testnet) == 3

async def test_factory(testnet_factory):
    net = await testnet_factory(n=1, proxied=True)
    assert net.proxy(0).address is not None

@pytest.mark.testnet(n=1)
async def test_that_fails(testnet):
    assert testnet[0].id == "not this"

def test_sync_test_cannot_use_it(testnet):
    pass
"""


def test_fixtures_in_a_user_project(
    pytester: pytest.Pytester, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user=USER_TESTS)
    monkeypatch.setenv("TMPDIR", str(short_tmp))  # where the fixtures' roots go
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=240)
    result.assert_outcomes(passed=3, failed=1, errors=1)
    output = result.stdout.str()
    assert "works only in trio tests" in output  # the sync test's error says why
    # The passing tests' directories are gone; the failing one's is kept and named.
    kept = list(short_tmp.glob("p2pnode-pytest-*"))
    assert len(kept) == 1, kept
    assert f"homes and logs kept in {kept[0]}" in output
    assert str(kept[0] / "node0.log") in output
    assert not daemon_running(kept[0] / "node0")


def test_without_pytest_trio_the_fixture_says_what_is_missing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user="""
        def test_plain():
            pass

        async def test_uses_it(testnet):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:trio", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*testnet* fixture of p2pnode*needs pytest-trio*"])


# --- p2pnode testnet up ------------------------------------------------------------------------


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes, deadline: float) -> str:
    """Everything the stream says up to and including the line holding ``marker``."""
    data = b""
    with trio.fail_after(deadline):
        while marker not in data or not data.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            assert chunk, f"the output ended before {marker!r}: {data.decode(errors='replace')}"
            data += chunk
    return data.decode()


async def run_cli(*args: str, home: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "P2PNODE_HOME": home}
    with trio.fail_after(CLI_DEADLINE):
        return await trio.run_process(
            [sys.executable, "-m", "p2pnode", *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_cli_testnet_up_runs_until_a_signal(tmp_path: Path, stop_signal: int) -> None:
    root = tmp_path / "net"
    log = open(tmp_path / "cli.log", "wb")  # noqa: SIM115 (handed to the child process)
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "p2pnode", "testnet", "up", "-n", "3", "--root", str(root)],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    finally:
        log.close()
    try:
        assert process.stdout is not None
        output = await read_until(process.stdout, b"testnet up: 3 nodes", CLI_DEADLINE)
        lines = output.splitlines()
        # The table: one row per node, with its ID, home and control socket.
        rows = {
            parts[0]: parts[1:]
            for line in lines
            if (parts := line.split()) and parts[0].startswith("node")
        }
        assert sorted(rows) == ["node0", "node1", "node2"]
        for name, (node_id, home, socket) in rows.items():
            assert home == str(root / name)
            assert socket == str(NodeHome(Path(home)).api_socket)
            assert len(node_id.split("-")) == 8
        usage = [shlex.split(line) for line in lines if "P2PNODE_HOME=" in line]
        assert len(usage) == 3

        # A node answers, through the home the output gave.
        assignment, command, verb, recipient, body = usage[0]
        home = assignment.removeprefix("P2PNODE_HOME=")
        status = await run_cli("status", "--json", home=home)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["id"] == rows[Path(home).name][0]
        # The printed send command works as printed (it waits for the receipt).
        assert (command, verb) == ("p2pnode", "send")
        sent = await run_cli(verb, recipient, body, "--timeout", "30", home=home)
        assert sent.returncode == 0, sent.stderr

        process.send_signal(stop_signal)
        with trio.fail_after(CLI_DEADLINE):
            await process.wait()
        assert process.returncode == 0, (tmp_path / "cli.log").read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "testnet stopped" in (tmp_path / "cli.log").read_text()
    for name in rows:
        home_path = root / name
        assert not (home_path / "api.sock").exists(), f"{name}'s daemon did not stop cleanly"
        assert not daemon_running(home_path), f"{name}'s daemon is still running"
