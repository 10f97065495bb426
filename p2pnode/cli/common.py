"""What every ``p2pnode`` command shares: the group, options, exit codes, output helpers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import click

from p2pnode import __version__
from p2pnode.api.client import ApiClient, ApiClientError, DaemonNotRunning
from p2pnode.clock import wall_clock_ms
from p2pnode.home import HOME_ENV, NodeHome, resolve_home
from p2pnode.keyfile import Passphrase

PASSPHRASE_ENV: Final = "P2PNODE_PASSPHRASE"  # noqa: S105 (a variable name, not a secret)
#: A passphrase file larger than this is surely the wrong file.
MAX_PASSPHRASE_FILE_SIZE: Final = 4096

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NO_DAEMON: Final = 3
EXIT_NOT_DELIVERED: Final = 4

F = TypeVar("F", bound=Callable[..., Any])


class NoDaemonError(click.ClickException):
    """No daemon runs for the home: exit code 3, with how to start one."""

    exit_code = EXIT_NO_DAEMON


class NotDeliveredError(click.ClickException):
    """Not delivered within ``--timeout``: exit code 4 (the message stays queued)."""

    exit_code = EXIT_NOT_DELIVERED


def now_ms() -> int:
    """Wall-clock milliseconds."""
    return wall_clock_ms()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2pnode")
def main() -> None:
    """p2pnode: a peer-to-peer, end-to-end encrypted messaging node.

    Create a node with `p2pnode init`, run it with `p2pnode daemon`, and talk to the running
    daemon with the other commands (they use its API socket in the node's home).

    \b
    Exit codes:
      0  success
      1  error (the message says what went wrong and how to fix it)
      2  usage error
      3  the daemon is not running (the message says how to start it)
      4  not delivered within --timeout (the message stays queued and will be delivered)

    \b
    Shell completion (bash, zsh, fish), e.g. for bash in ~/.bashrc:
      eval "$(_P2PNODE_COMPLETE=bash_source p2pnode)"
    """


def home_option(func: F) -> F:
    """The ``--home`` option shared by every command that works on a node."""
    return click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Node data directory. Default: ${HOME_ENV}, else the per-user data directory.",
    )(func)


def json_option(func: F) -> F:
    """The ``--json`` option of every command that prints data."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(func)


def passphrase_option(func: F) -> F:
    """The ``--passphrase-file`` option of commands that unlock keys."""
    return click.option(
        "--passphrase-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"The keys' passphrase is in this file (or set ${PASSPHRASE_ENV}).",
    )(func)


def node_home(home: Path | None) -> NodeHome:
    """The node home the options point at."""
    return NodeHome(resolve_home(home))


def read_passphrase(passphrase_file: Path | None) -> Passphrase | None:
    """The passphrase from ``--passphrase-file`` or the environment, if any."""
    if passphrase_file is not None:
        try:
            with open(passphrase_file, "rb") as handle:
                data = handle.read(MAX_PASSPHRASE_FILE_SIZE + 1)
        except OSError as exc:
            raise click.ClickException(
                f"cannot read passphrase file {passphrase_file}: {exc.strerror}"
            ) from exc
        if len(data) > MAX_PASSPHRASE_FILE_SIZE:
            raise click.ClickException(f"passphrase file {passphrase_file} is too large")
        # One trailing newline is an artefact of `echo pass > file`, not part of the passphrase.
        secret = data.removesuffix(b"\n")
        if not secret:
            raise click.ClickException(f"passphrase file {passphrase_file} is empty")
        return Passphrase(secret)
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return Passphrase(env.encode())
    return None


def emit(as_json: bool, data: Any, text: str) -> None:
    """Print ``data`` as JSON or ``text`` for people."""
    click.echo(json.dumps(data) if as_json else text)


def client_for(home: Path | None, *, timeout: float = 30.0) -> ApiClient:
    """An API client for the daemon of the home."""
    return ApiClient(node_home(home).api_socket, timeout=timeout)


def call(client: ApiClient, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
    """Call the daemon, turning failures into CLI errors with the right exit code."""
    try:
        return client.request(method, path, body, **kwargs)
    except DaemonNotRunning:
        no_daemon(client)
    except ApiClientError as exc:
        raise click.ClickException(exc.message) from None
    except TimeoutError:
        raise click.ClickException("the daemon did not answer in time") from None
    except OSError as exc:
        # Otherwise click swallows a broken pipe silently (exit 1, no message) and prints a
        # traceback for the rest; a refused connection means the socket is another user's.
        raise connection_error(client, exc) from None


def connection_error(client: ApiClient, exc: OSError) -> click.ClickException:
    """The error for a connection to the daemon that failed or was cut off."""
    return click.ClickException(
        f"cannot talk to the daemon on {client.socket_path}: {exc.strerror or exc}. "
        "The daemon answers only the user it runs as; if that is you, see its log."
    )


def no_daemon(client: ApiClient) -> NoReturn:
    """Exit 3 with how to start the daemon."""
    home = client.socket_path.parent
    raise NoDaemonError(
        f"no p2pnode daemon is running for {home} (nothing listens on {client.socket_path}). "
        f"Start it with: p2pnode daemon --home {home}"
    )
