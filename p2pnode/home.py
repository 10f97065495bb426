"""The node home: where a node's keys and database live, and how private files are written.

A home is a directory of mode 0700 owned by the user running the node. Secret files in it are
mode 0600 and written atomically (temporary file, fsync, rename, fsync of the directory), so a
crash leaves either the old file or the new one, never a torn one. A home or key file that other
users can read is refused, with the ``chmod`` that fixes it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import platformdirs

#: Environment variable naming the home when ``--home`` is not given.
HOME_ENV: Final = "P2PNODE_HOME"

HOME_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600


class HomeError(Exception):
    """A problem with the node home that the user has to fix; the message says how."""


class InsecurePermissionsError(HomeError):
    """A home directory or secret file is accessible to other users."""


def resolve_home(option: str | os.PathLike[str] | None) -> Path:
    """Pick the home directory: the ``--home`` option, else ``$P2PNODE_HOME``, else the
    platform's per-user data directory (``~/.local/share/p2pnode`` on Linux).

    The path is returned absolute and is not created.
    """
    if option is not None and str(option) != "":
        return Path(option).expanduser().absolute()
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return platformdirs.user_data_path("p2pnode", appauthor=False).absolute()


@dataclass(frozen=True)
class NodeHome:
    """Paths of the files inside a node home. Creating or checking the directory is explicit
    (:meth:`create`, :meth:`check`); constructing a ``NodeHome`` touches nothing."""

    path: Path

    @property
    def identity_key(self) -> Path:
        """The Ed25519 identity key file."""
        return self.path / "identity.key"

    @property
    def encryption_key(self) -> Path:
        """The X25519 encryption key file (current and recent keys with their certificates)."""
        return self.path / "encryption.key"

    @property
    def database(self) -> Path:
        """The SQLite store (inbox, outbox, contacts, peer cache)."""
        return self.path / "node.db"

    @property
    def dht_peers(self) -> Path:
        """DHT peers remembered across restarts (JSON)."""
        return self.path / "dht-peers.json"

    @property
    def api_socket(self) -> Path:
        """The control API's Unix socket."""
        return self.path / "api.sock"

    def create(self) -> bool:
        """Create the home with mode 0700 if it does not exist, then :meth:`check` it.

        Returns:
            True if the directory was created by this call.

        Raises:
            HomeError: if the path exists and is not a directory, or cannot be created.
            InsecurePermissionsError: if an existing home is accessible to others.
        """
        created = False
        if not self.path.exists():
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.mkdir(mode=HOME_MODE)
            except FileExistsError:
                pass  # created concurrently; check() below decides whether it is acceptable
            except OSError as exc:
                raise HomeError(f"cannot create node home {self.path}: {exc.strerror}") from exc
            else:
                created = True
                # mkdir's mode is filtered by the umask; set it exactly.
                os.chmod(self.path, HOME_MODE)
        self.check()
        return created

    def check(self) -> None:
        """Verify the home is a directory owned by this user that no one else can access.

        Raises:
            HomeError: if it is missing, not a directory or owned by another user.
            InsecurePermissionsError: if group or others have any access to it.
        """
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            raise HomeError(
                f"no node at {self.path}; create one with: p2pnode init --home {self.path}"
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise HomeError(f"node home {self.path} is not a directory")
        _check_owner_and_mode(self.path, info, HOME_MODE, "700")


def check_private_file(path: Path) -> None:
    """Refuse a secret file that is not a regular file owned by us with mode 0600 or stricter.

    Raises:
        InsecurePermissionsError: naming the file and the ``chmod`` that fixes it.
        HomeError: if it is not a regular file or belongs to another user.
        FileNotFoundError: if it does not exist.
    """
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise HomeError(f"{path} is not a regular file")
    _check_owner_and_mode(path, info, PRIVATE_FILE_MODE, "600")


def _check_owner_and_mode(path: Path, info: os.stat_result, allowed: int, fix: str) -> None:
    if info.st_uid != os.geteuid():
        raise HomeError(f"{path} belongs to user id {info.st_uid}, not to you ({os.geteuid()})")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise InsecurePermissionsError(
            f"{path} is accessible to other users (mode {mode:04o}); "
            f"p2pnode refuses to use it. Fix it with: chmod {fix} {path}"
        )


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, mode 0600.

    The data is written to a new temporary file in the same directory, flushed to disk, and
    renamed over ``path``; then the directory is flushed so the rename itself is durable. On any
    failure the temporary file is removed and ``path`` is left as it was.
    """
    # A random name: a crash can leave a temp file behind, and a later process (perhaps with
    # the same pid, as PID 1 in a container) must not trip over it.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
