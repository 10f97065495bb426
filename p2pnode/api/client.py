"""A small synchronous client of the control API, for the CLI (stdlib only).

It speaks HTTP/1.1 over ``<home>/api.sock`` with :mod:`http.client`; a missing socket or a
refused connection means the daemon is not running (:class:`DaemonNotRunning`), which the CLI
reports with exit code 3.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

#: Seconds to wait for an answer unless a call says otherwise.
DEFAULT_TIMEOUT: Final = 30.0
#: Largest answer read (a full inbox page of maximal messages is about 90 MB; we page by 100).
MAX_RESPONSE: Final = 64 * 1024 * 1024


class DaemonNotRunning(Exception):
    """No daemon answers on the API socket."""


class ApiClientError(Exception):
    """The daemon answered with an error: HTTP ``status``, ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """Calls to the daemon serving on ``socket_path``."""

    def __init__(self, socket_path: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _connect(self, timeout: float | None) -> _UnixConnection:
        return _UnixConnection(self.socket_path, self.timeout if timeout is None else timeout)

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        """Send one request and return the decoded JSON answer (None for 204).

        Raises:
            DaemonNotRunning: if nothing serves on the socket.
            ApiClientError: for an error answer.
            TimeoutError: if the daemon does not answer in time.
        """
        connection = self._connect(timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                connection.request(method, path, body=payload, headers=headers)
                response = connection.getresponse()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonNotRunning(str(exc)) from None
            except TimeoutError:
                raise
            data = response.read(MAX_RESPONSE)
        finally:
            connection.close()
        if response.status == 204:
            return None
        try:
            decoded = json.loads(data) if data else None
        except ValueError:
            raise ApiClientError(
                response.status, "bad-answer", "the daemon's answer is not JSON"
            ) from None
        if response.status >= 400:
            error = decoded.get("error", {}) if isinstance(decoded, dict) else {}
            raise ApiClientError(
                response.status,
                str(error.get("code", "error")),
                str(error.get("message", data[:200])),
            )
        return decoded

    def events(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Follow the server-sent event stream: yields ``(event type, data)`` forever.

        Raises:
            DaemonNotRunning: if nothing serves on the socket (or the daemon stops).
        """
        connection = self._connect(None)
        connection.timeout = None
        try:
            try:
                connection.request("GET", "/v1/events")
                response = connection.getresponse()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonNotRunning(str(exc)) from None
            if response.status != 200:
                raise ApiClientError(response.status, "events", "cannot follow the event stream")
            kind, data = "message", ""
            while True:
                line = response.readline()
                if not line:
                    raise DaemonNotRunning("the daemon closed the event stream")
                text = line.decode("utf-8").rstrip("\r\n")
                if text.startswith("event:"):
                    kind = text[6:].strip()
                elif text.startswith("data:"):
                    data += text[5:].strip()
                elif not text and data:
                    yield kind, json.loads(data)
                    kind, data = "message", ""
        finally:
            connection.close()


def path_segment(text: str) -> str:
    """Quote a value for use as one URL path segment."""
    return quote(text, safe="")
