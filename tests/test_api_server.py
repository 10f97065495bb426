"""The API socket server: connections end when their clients close them."""

from __future__ import annotations

from pathlib import Path

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from p2pnode.api import server
from p2pnode.api.client import ApiClient


async def hello(_request: Request) -> JSONResponse:
    return JSONResponse({"hello": "world"})


async def test_closed_connections_do_not_linger_until_the_keep_alive_timeout(
    tmp_path: Path,
) -> None:
    app = Starlette(routes=[Route("/hello", hello)])
    path = tmp_path / "api.sock"
    open_before = server.stats["open"]

    def many_requests() -> None:
        client = ApiClient(path)
        for _ in range(50):  # each on its own connection, closed by the client
            assert client.request("GET", "/hello") == {"hello": "world"}

    with trio.fail_after(20):  # the keep-alive timeout is 60 s
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_api, app, path)
            await trio.to_thread.run_sync(many_requests)
            while server.stats["open"] > open_before:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
