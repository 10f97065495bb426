"""Serving the control API on ``<home>/api.sock`` to this user only.

The socket is created under ``umask(0o177)`` so it is born mode 0600, in a 0700 home. Each
accepted connection's peer credentials (``SO_PEERCRED``) are checked: a process of another
user id is refused before a byte of HTTP is read. Accepted streams are handed to hypercorn's
trio ``TCPServer`` (an internal class of hypercorn 0.18, hence the pinned minor version and the
tests that cover it), which speaks HTTP/1.1 to the Starlette app.

Resource handling: :func:`serve_api` owns the listening socket and removes the socket file when
it stops. Error handling: a refused or broken connection is logged and counted; it never stops
the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Final

import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.utils import wrap_app
from starlette.applications import Starlette

log = logging.getLogger(__name__)

#: Pending connections the kernel queues for us.
BACKLOG: Final = 64
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid

#: Refused and accepted connection counts, and ``open`` connections now (process-wide, for
#: status and tests).
stats: Counter[str] = Counter()


class _ApiConnection(TCPServer):
    """hypercorn's HTTP/1.1 connection, ended as soon as the client has closed it.

    hypercorn 0.18 keeps a connection's task, and the memory it holds, until its keep-alive
    timer runs out even after the client has gone: a burst of short requests left thousands
    of closed connections alive for 60 s (about 5 KiB each, measured by the resources
    benchmark). Stopping the keep-alive timer once the read side has ended lets the task end
    with the requests still in progress.
    """

    async def _read_data(self) -> None:
        await super()._read_data()
        await self.idle_task.stop()


class ApiSocketError(OSError):
    """The API socket cannot be created (another daemon has it, or the path is unusable)."""


def peer_uid(sock: trio.socket.SocketType) -> int:
    """The user id of the process at the other end of a Unix socket."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(data)
    return int(uid)


async def bind_api_socket(path: Path) -> trio.socket.SocketType:
    """Bind a listening Unix socket at ``path``, mode 0600.

    A stale socket file (no daemon behind it) is replaced; a live one is an error.

    Raises:
        ApiSocketError: if another process is serving on ``path`` or it cannot be bound.
    """
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that died
        else:
            raise ApiSocketError(f"another daemon is serving on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ApiSocketError(f"cannot create the API socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    sock.listen(BACKLOG)
    return sock


async def serve_api(
    app: Starlette, path: Path, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``app`` on the Unix socket ``path`` until cancelled; reports readiness with
    ``task_status.started(path)``.

    Raises:
        ApiSocketError: if the socket cannot be created.
    """
    sock = await bind_api_socket(path)
    config = Config()
    config.keep_alive_timeout = 60
    config.graceful_timeout = 2
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    context = WorkerContext(None)
    own_uid = os.geteuid()
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            uid = peer_uid(stream.socket)
        except OSError as exc:
            log.warning("API connection without credentials refused: %s", exc)
            stats["refused"] += 1
            await trio.aclose_forcefully(stream)
            return
        if uid != own_uid:
            log.warning(
                "API connection from user id %d refused (only %d may connect)", uid, own_uid
            )
            stats["refused"] += 1
            await trio.aclose_forcefully(stream)
            return
        stats["accepted"] += 1
        stats["open"] += 1
        try:
            await _ApiConnection(wrapped, config, context, {}, stream)  # type: ignore[arg-type]
        finally:
            stats["open"] -= 1

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, [listener])
            task_status.started(path)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
