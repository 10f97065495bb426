"""Tests for the ``p2pnode`` command line: ``init``, ``id``, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from nacl.pwhash import argon2id

from p2pnode import cli
from p2pnode.cli import common as cli_common
from p2pnode.home import NodeHome
from p2pnode.keyfile import Passphrase, PassphraseError
from p2pnode.keystore import load_identity
from p2pnode.nodeid import NodeId

NOW = 1_700_000_000_000


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests choose the home and passphrase themselves; the caller's environment must not."""
    monkeypatch.delenv("P2PNODE_HOME", raising=False)
    monkeypatch.delenv("P2PNODE_PASSPHRASE", raising=False)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, list(args), env=env)


def printed_id(output: str) -> NodeId:
    """The node ID from an ``init`` text output's ``ID:`` line."""
    lines = [line for line in output.splitlines() if line.startswith("ID:")]
    assert len(lines) == 1, output
    return NodeId.parse(lines[0].removeprefix("ID:").strip())


def fast_passphrase(secret: bytes) -> Passphrase:
    return Passphrase(secret, opslimit=argon2id.OPSLIMIT_MIN, memlimit=argon2id.MEMLIMIT_MIN)


@pytest.fixture
def fast_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make passphrases the CLI creates use Argon2id's minimum cost (the secret still comes
    from the CLI's file or environment variable; only the cost is lowered)."""
    monkeypatch.setattr(cli_common, "Passphrase", fast_passphrase)


# --- init ------------------------------------------------------------------------------------


def test_init_creates_a_node_and_prints_its_id(tmp_path: Path) -> None:
    home = tmp_path / "node"

    result = run("init", "--home", str(home))

    assert result.exit_code == 0, result.output
    assert "Created" in result.output
    node_id = printed_id(result.output)
    assert node_id == load_identity(NodeHome(home), None, NOW).node_id
    assert str(home) in result.output


def test_init_twice_keeps_the_node_and_prints_the_same_id(tmp_path: Path) -> None:
    home = tmp_path / "node"
    first = run("init", "--home", str(home))
    files = {p.name: p.read_bytes() for p in home.iterdir()}

    second = run("init", "--home", str(home))

    assert second.exit_code == 0, second.output
    assert "already exists" in second.output
    assert "Created" not in second.output
    assert printed_id(second.output) == printed_id(first.output)
    assert {p.name: p.read_bytes() for p in home.iterdir()} == files


def test_init_json_reports_whether_it_created(tmp_path: Path) -> None:
    home = tmp_path / "node"

    first = json.loads(run("init", "--home", str(home), "--json").output)
    second = json.loads(run("init", "--home", str(home), "--json").output)

    assert first["created"] is True
    assert second["created"] is False
    assert first["id"] == second["id"]
    assert NodeId.parse(first["id"]) == load_identity(NodeHome(home), None, NOW).node_id
    assert first["home"] == str(home)


# --- id --------------------------------------------------------------------------------------


def test_id_prints_the_node_id(tmp_path: Path) -> None:
    home = tmp_path / "node"
    run("init", "--home", str(home))

    result = run("id", "--home", str(home))

    assert result.exit_code == 0, result.output
    assert NodeId.parse(result.output.strip()) == load_identity(NodeHome(home), None, NOW).node_id
    assert result.output.strip() == str(NodeId.parse(result.output.strip()))  # canonical form


def test_id_json_gives_id_and_absolute_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run("init", "--home", "node")

    result = run("id", "--home", "node", "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    identity = load_identity(NodeHome(tmp_path / "node"), None, NOW)
    assert NodeId.parse(data["id"]) == identity.node_id
    assert data["home"] == str(tmp_path / "node")
    assert data["identity_key"] == identity.public_key.hex()


def test_home_comes_from_p2pnode_home_when_no_option(tmp_path: Path) -> None:
    home = tmp_path / "from-env"
    env = {"P2PNODE_HOME": str(home)}

    created = run("init", env=env)
    shown = run("id", env=env)

    assert created.exit_code == 0, created.output
    assert (home / "identity.key").exists()
    assert NodeId.parse(shown.output.strip()) == printed_id(created.output)


def test_home_option_wins_over_p2pnode_home(tmp_path: Path) -> None:
    env_home, option_home = tmp_path / "env", tmp_path / "option"

    result = run("init", "--home", str(option_home), env={"P2PNODE_HOME": str(env_home)})

    assert result.exit_code == 0, result.output
    assert (option_home / "identity.key").exists()
    assert not env_home.exists()


def test_default_home_is_the_per_user_data_directory(tmp_path: Path) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}

    result = run("init", env=env)

    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "p2pnode" / "identity.key").exists()
    assert NodeId.parse(run("id", env=env).output.strip()) == printed_id(result.output)


def test_id_without_a_node_says_to_run_init(tmp_path: Path) -> None:
    missing = run("id", "--home", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir(mode=0o700)
    empty = run("id", "--home", str(tmp_path / "empty"))

    for result in (missing, empty):
        assert result.exit_code == 1
        assert "p2pnode init" in result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("command", ["id", "init"])
def test_insecure_key_file_is_refused_with_the_chmod(tmp_path: Path, command: str) -> None:
    home = tmp_path / "node"
    run("init", "--home", str(home))
    os.chmod(home / "identity.key", 0o644)

    result = run(command, "--home", str(home))

    assert result.exit_code == 1
    assert f"chmod 600 {home / 'identity.key'}" in result.output


def test_insecure_home_is_refused_with_the_chmod(tmp_path: Path) -> None:
    home = tmp_path / "node"
    run("init", "--home", str(home))
    os.chmod(home, 0o755)

    result = run("id", "--home", str(home))

    assert result.exit_code == 1
    assert f"chmod 700 {home}" in result.output


def test_corrupt_identity_key_is_an_error_not_a_crash(tmp_path: Path) -> None:
    home = tmp_path / "node"
    run("init", "--home", str(home))
    (home / "identity.key").write_bytes(b"garbage")

    for command in ("id", "init"):
        result = run(command, "--home", str(home))
        assert result.exit_code == 1
        assert "corrupt" in result.output
        assert str(home / "identity.key") in result.output
    assert (home / "identity.key").read_bytes() == b"garbage"


# --- usage errors and help -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["id", "--bogus"],
        ["init", "--home"],
        ["frobnicate"],
    ],
    ids=["unknown-option", "missing-value", "unknown-command"],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert "Error:" in result.output
    assert "Traceback" not in result.output


def test_home_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    result = run("id", "--home", str(not_a_dir))
    assert result.exit_code == 2
    assert not_a_dir.read_text() == "x"


def test_help_lists_the_exit_codes() -> None:
    result = run("--help")

    assert result.exit_code == 0
    assert "Exit codes" in result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert any(line.startswith("0") and "success" in line for line in lines)
    assert any(line.startswith("1") and "error" in line for line in lines)
    assert any(line.startswith("2") and "usage error" in line for line in lines)
    assert "init" in result.output
    assert "id" in result.output


# --- passphrase ------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n"], ids=["empty", "newline-only"])
def test_empty_passphrase_file_is_refused(tmp_path: Path, content: bytes) -> None:
    pass_file = tmp_path / "pass"
    pass_file.write_bytes(content)
    home = tmp_path / "node"

    result = run("init", "--home", str(home), "--passphrase-file", str(pass_file))

    assert result.exit_code == 1
    assert f"passphrase file {pass_file} is empty" in result.output
    assert not home.exists()


def test_missing_passphrase_file_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "node"
    result = run("init", "--home", str(home), "--passphrase-file", str(tmp_path / "nope"))
    assert result.exit_code == 1
    assert "cannot read passphrase file" in result.output
    assert not home.exists()


def test_passphrase_file_protects_the_node_and_id_needs_no_passphrase(tmp_path: Path) -> None:
    """Uses the real (default, moderate) Argon2id cost: the one slow test of this module."""
    pass_file = tmp_path / "pass"
    pass_file.write_bytes(b"correct horse battery staple\n")
    home = tmp_path / "node"

    created = run("init", "--home", str(home), "--passphrase-file", str(pass_file))
    shown = run("id", "--home", str(home))
    again = run("init", "--home", str(home))

    assert created.exit_code == 0, created.output
    assert shown.exit_code == 0, shown.output
    assert NodeId.parse(shown.output.strip()) == printed_id(created.output)
    # The keys really are locked: loading without the passphrase fails, and so does init.
    with pytest.raises(PassphraseError):
        load_identity(NodeHome(home), None, NOW)
    assert again.exit_code == 1
    assert "--passphrase-file" in again.output


def test_passphrase_file_trailing_newline_is_not_part_of_the_passphrase(
    tmp_path: Path, fast_kdf: None
) -> None:
    pass_file = tmp_path / "pass"
    pass_file.write_bytes(b"s3cret\n")
    home = tmp_path / "node"

    result = run("init", "--home", str(home), "--passphrase-file", str(pass_file))

    assert result.exit_code == 0, result.output
    loaded = load_identity(NodeHome(home), fast_passphrase(b"s3cret"), NOW)
    assert loaded.node_id == printed_id(result.output)


def test_passphrase_from_environment_variable(tmp_path: Path, fast_kdf: None) -> None:
    home = tmp_path / "node"
    env = {"P2PNODE_PASSPHRASE": "from the environment"}

    created = run("init", "--home", str(home), env=env)
    reopened = run("init", "--home", str(home), env=env)
    wrong = run("init", "--home", str(home), env={"P2PNODE_PASSPHRASE": "something else"})

    assert created.exit_code == 0, created.output
    node = NodeHome(home)
    assert load_identity(node, fast_passphrase(b"from the environment"), NOW).node_id == (
        printed_id(created.output)
    )
    with pytest.raises(PassphraseError):
        load_identity(node, None, NOW)
    assert reopened.exit_code == 0, reopened.output
    assert "already exists" in reopened.output
    assert wrong.exit_code == 1
    assert "wrong passphrase" in wrong.output


# --- the installed entry point ---------------------------------------------------------------


def test_console_script_and_module_entry_points(tmp_path: Path) -> None:
    home = tmp_path / "node"
    script = Path(sys.executable).parent / "p2pnode"
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNODE_")}

    init = subprocess.run(
        [str(script), "init", "--home", str(home), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    shown = subprocess.run(
        [sys.executable, "-m", "p2pnode", "id", "--home", str(home)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    usage = subprocess.run(
        [str(script), "frobnicate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )

    assert init.returncode == 0, init.stderr
    data = json.loads(init.stdout)
    assert data["created"] is True
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == data["id"]
    assert NodeId.parse(data["id"]) == load_identity(NodeHome(home), None, NOW).node_id
    assert usage.returncode == 2


def test_shell_completion_completes_commands() -> None:
    env = {**os.environ, "_P2PNODE_COMPLETE": "bash_source"}
    script = subprocess.run(
        [sys.executable, "-m", "p2pnode"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "complete" in script.stdout and "_p2pnode_completion" in script.stdout
    env = {
        **os.environ,
        "_P2PNODE_COMPLETE": "bash_complete",
        "COMP_WORDS": "p2pnode con",
        "COMP_CWORD": "1",
    }
    completed = subprocess.run(
        [sys.executable, "-m", "p2pnode"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "plain,contacts" in completed.stdout.splitlines()
