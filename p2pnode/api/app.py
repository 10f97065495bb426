"""The control API's routes (Starlette): what a local user can ask of the running node.

Every answer is JSON. Errors are ``{"error": {"code": ..., "message": ...}}`` with a 4xx status
for anything the caller got wrong; the routes never answer 500 to a malformed request. See
``docs/API.md`` for the reference.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from p2pnode import __version__
from p2pnode.clock import wall_clock_ms
from p2pnode.dht.node import LookupTimeout, RecordNotFound
from p2pnode.dht.service import DhtService
from p2pnode.envelope import MAX_BODY_SIZE
from p2pnode.node import EventKind, NodeEvent, NodeService
from p2pnode.nodeid import NodeId, NodeIdError
from p2pnode.store import ContactError, DeliveryState, InboxMessage, OutboxEntry, Store

#: Largest request body: a maximal message body, base64-encoded, with its JSON around it.
MAX_REQUEST_BODY: Final = 128 * 1024
#: Longest a request may wait for a delivery outcome or a DHT lookup, in seconds.
MAX_WAIT: Final = 300.0
#: Seconds between comment lines on an idle event stream (keeps proxies and clients sure the
#: stream is alive).
SSE_HEARTBEAT: Final = 15.0
#: Most items a list endpoint returns at once.
MAX_LIST: Final = 1000
#: Largest inbox seq number a request may name (the store's are SQLite 64-bit integers).
MAX_SEQ: Final = 2**63 - 1


class DaemonView(Protocol):
    """What the API needs of the running daemon."""

    node: NodeService
    dht: DhtService | None
    home: str
    started_at: float


class ApiError(Exception):
    """An error answer: HTTP ``status``, a stable ``code`` and a human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The JSON error body every failure uses."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


# --- encoding of answers ----------------------------------------------------------------------


def node_id_text(key: bytes) -> str:
    """The human-readable ID of an identity key."""
    return str(NodeId.from_key(key))


def body_fields(body: bytes) -> dict[str, Any]:
    """A message body as text (when it is UTF-8) and always as base64."""
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"body": text, "body_b64": base64.b64encode(body).decode()}


def outbox_json(entry: OutboxEntry) -> dict[str, Any]:
    """An outgoing message's state."""
    return {
        "id": entry.message_id.hex(),
        "to": node_id_text(entry.recipient),
        "state": entry.state.value,
        "attempts": entry.attempts,
        "last_error": entry.last_error,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
        "expires_at": entry.expires_at,
    }


def inbox_json(message: InboxMessage, names: dict[bytes, str]) -> dict[str, Any]:
    """A received message."""
    return {
        "id": message.message_id.hex(),
        "seq": message.seq,
        "from": node_id_text(message.sender),
        "from_name": names.get(message.sender),
        **body_fields(message.body),
        "sent_at": message.sent_at,
        "received_at": message.received_at,
        "read": message.read,
    }


def event_json(event: NodeEvent, names: dict[bytes, str]) -> dict[str, Any]:
    """An event of the stream."""
    out: dict[str, Any] = {"type": event.kind.value, "id": event.message_id.hex()}
    if event.peer:
        out["peer"] = node_id_text(event.peer)
        out["peer_name"] = names.get(event.peer)
    if event.kind is EventKind.MESSAGE and event.body is not None:
        out |= body_fields(event.body) | {
            "from": out["peer"],
            "sent_at": event.sent_at,
            "received_at": event.received_at,
        }
    if event.state is not None:
        out["state"] = event.state.value
    if event.error is not None:
        out["error"] = event.error
    return out


# --- request parsing --------------------------------------------------------------------------


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body (size-limited)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BODY:
        raise ApiError(413, "too-large", f"request body over {MAX_REQUEST_BODY} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BODY:
            raise ApiError(413, "too-large", f"request body over {MAX_REQUEST_BODY} bytes")
        chunks.append(chunk)
    try:
        value = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):
        raise ApiError(400, "bad-json", "the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad-json", "the request body must be a JSON object")
    return value


def string_field(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    """A string field of a JSON body."""
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, "missing-field", f"field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise ApiError(400, "bad-field", f"field {name!r} must be a string")
    return value


def parse_id(text: str) -> bytes:
    """A node ID (human-readable form) as an identity key."""
    try:
        return NodeId.parse(text).key
    except NodeIdError as exc:
        raise ApiError(400, "bad-node-id", str(exc)) from None


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within bounds."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad-parameter", f"{name} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(400, "bad-parameter", f"{name} must be between {low} and {high}")
    return value


def query_float(request: Request, name: str, default: float, high: float) -> float:
    """A non-negative number query parameter."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, "bad-parameter", f"{name} must be a number") from None
    if not 0 <= value <= high:
        raise ApiError(400, "bad-parameter", f"{name} must be between 0 and {high}")
    return value


def query_flag(request: Request, name: str) -> bool:
    """A boolean query parameter (1/true/yes)."""
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


@dataclass
class Api:
    """The route handlers, bound to one running daemon."""

    daemon: DaemonView

    @property
    def node(self) -> NodeService:
        return self.daemon.node

    async def _names(self) -> dict[bytes, str]:
        contacts = await self.node.worker.read(lambda s: s.contact_list())
        return {c.node_key: c.name for c in contacts}

    async def _recipient(self, text: str) -> bytes:
        """A node ID, or the name of a contact."""
        try:
            return NodeId.parse(text).key
        except NodeIdError as id_error:

            def lookup(store: Store) -> bytes | None:
                try:
                    return store.contact_get(text).node_key
                except ContactError:
                    return None

            key = await self.node.worker.read(lookup)
            if key is None:
                raise ApiError(
                    404,
                    "unknown-recipient",
                    f"{text!r} is neither a contact name nor a valid node ID ({id_error})",
                ) from None
            return key

    # --- identity and status -------------------------------------------------------------------

    async def identity(self, request: Request) -> Response:
        node = self.node
        return JSONResponse(
            {
                "id": node_id_text(node.public_key),
                "identity_key": node.public_key.hex(),
                "encryption_key": bytes(node.identity.encryption_key.private_key.public_key).hex(),
                "home": self.daemon.home,
            }
        )

    async def status(self, request: Request) -> Response:
        node = self.node
        counts = await node.worker.read(lambda s: s.outbox_counts())
        unread = await node.worker.read(lambda s: s.unread_count())
        dht = self.daemon.dht
        dht_node = dht.node if dht is not None else None
        listen = node.links.listen_address
        return JSONResponse(
            {
                "version": __version__,
                "id": node_id_text(node.public_key),
                "uptime_s": round(time.monotonic() - self.daemon.started_at, 3),
                "listen": f"{listen[0]}:{listen[1]}" if listen else None,
                "dht": None
                if dht_node is None
                else {
                    "address": f"{dht_node.address[0]}:{dht_node.address[1]}",
                    "routing_table_size": len(dht_node.protocol.table),
                    "record_published_on": dht.publisher.accepted
                    if dht is not None and dht.publisher is not None
                    else 0,
                },
                "links_open": node.links.open_links,
                "outbox": {state.value: counts.get(state, 0) for state in DeliveryState},
                "unread": unread,
            }
        )

    async def peers(self, request: Request) -> Response:
        node = self.node
        names = await self._names()
        links = [
            {"id": node_id_text(peer), "name": names.get(peer)}
            for peer in sorted(node.links.peers())
        ]
        dht = self.daemon.dht
        contacts = (
            [
                {"node_id": c.node_id.hex(), "address": f"{c.host}:{c.port}"}
                for c in dht.node.protocol.table
            ]
            if dht is not None and dht.node is not None
            else []
        )
        return JSONResponse({"links": links, "dht_contacts": contacts})

    # --- contacts --------------------------------------------------------------------------------

    async def contacts_list(self, request: Request) -> Response:
        contacts = await self.node.worker.read(lambda s: s.contact_list())
        return JSONResponse(
            [
                {"name": c.name, "id": node_id_text(c.node_key), "added_at": c.added_at}
                for c in contacts
            ]
        )

    async def contacts_add(self, request: Request) -> Response:
        body = await json_body(request)
        name = string_field(body, "name")
        key = parse_id(string_field(body, "id") or "")
        now = wall_clock_ms()
        contact = await self._contact_op(lambda s: s.contact_add(name or "", key, now))
        return JSONResponse(
            {"name": contact.name, "id": node_id_text(contact.node_key)}, status_code=201
        )

    async def contacts_rename(self, request: Request) -> Response:
        old = request.path_params["name"]
        new = string_field(await json_body(request), "name") or ""
        contact = await self._contact_op(lambda s: s.contact_rename(old, new))
        return JSONResponse({"name": contact.name, "id": node_id_text(contact.node_key)})

    async def contacts_remove(self, request: Request) -> Response:
        name = request.path_params["name"]
        await self._contact_op(lambda s: s.contact_remove(name))
        return Response(status_code=204)

    async def _contact_op(self, op: Callable[[Store], Any]) -> Any:
        try:
            return await self.node.worker.write(op)
        except ContactError as exc:
            status = (
                404
                if "no contact" in str(exc).lower()
                else 409
                if "already" in str(exc).lower()
                else 400
            )
            raise ApiError(status, "contact", str(exc)) from None

    # --- messages --------------------------------------------------------------------------------

    async def send(self, request: Request) -> Response:
        body = await json_body(request)
        recipient = await self._recipient(string_field(body, "to") or "")
        text = string_field(body, "body", required=False)
        encoded = string_field(body, "body_b64", required=False)
        if (text is None) == (encoded is None):
            raise ApiError(400, "bad-field", "give exactly one of 'body' (text) or 'body_b64'")
        if text is not None:
            try:
                payload = text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON, not text
                raise ApiError(400, "bad-field", "'body' is not valid Unicode text") from None
        else:
            try:
                payload = base64.b64decode(encoded or "", validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad-field", "'body_b64' is not valid base64") from None
        if len(payload) > MAX_BODY_SIZE:
            raise ApiError(413, "too-large", f"message body over {MAX_BODY_SIZE} bytes")
        message_id = await self.node.send(recipient, payload)
        return JSONResponse(
            {"id": message_id.hex(), "to": node_id_text(recipient), "state": "queued"},
            status_code=202,
        )

    def _message_id(self, request: Request) -> bytes:
        text = request.path_params["id"]
        try:
            message_id = bytes.fromhex(text)
        except ValueError:
            raise ApiError(400, "bad-message-id", "a message id is 32 hex digits") from None
        if len(message_id) != 16:
            raise ApiError(400, "bad-message-id", "a message id is 32 hex digits")
        return message_id

    async def message(self, request: Request) -> Response:
        message_id = self._message_id(request)
        wait = query_float(request, "wait", 0.0, MAX_WAIT)
        entry = await self.node.message_state(message_id)
        if entry is None:
            raise ApiError(404, "unknown-message", "no message with that id was sent from here")
        if wait > 0 and entry.state in (DeliveryState.QUEUED, DeliveryState.SENT):
            with trio.move_on_after(wait):
                entry = await self.node.wait_for_outcome(message_id)
        return JSONResponse(outbox_json(entry))

    # --- inbox -----------------------------------------------------------------------------------

    async def inbox(self, request: Request) -> Response:
        unread = query_flag(request, "unread")
        limit = query_int(request, "limit", 100, 1, MAX_LIST)
        before = request.query_params.get("before")
        before_seq = query_int(request, "before", 0, 1, 2**62) if before is not None else None
        messages = await self.node.worker.read(lambda s: s.inbox_list(unread, limit, before_seq))
        names = await self._names()
        return JSONResponse([inbox_json(m, names) for m in messages])

    async def mark_read(self, request: Request) -> Response:
        body = await json_body(request)
        seqs = body.get("seqs")
        if body.get("all") is True and seqs is None:

            def all_read(store: Store) -> int:
                unread = store.inbox_list(True, MAX_LIST)
                return store.mark_read([m.seq for m in unread]) if unread else 0

            changed = await self.node.worker.write(all_read)
        else:
            if (
                not isinstance(seqs, list)
                or not 0 < len(seqs) <= MAX_LIST
                or not all(type(n) is int and 0 < n <= MAX_SEQ for n in seqs)
            ):
                raise ApiError(
                    400, "bad-field", "give 'seqs' (a list of message seq numbers) or 'all': true"
                )
            changed = await self.node.worker.write(lambda s: s.mark_read(seqs))
        return JSONResponse({"marked": changed})

    async def events(self, request: Request) -> Response:
        channel = self.node.subscribe()
        names = await self._names()

        async def stream() -> AsyncIterator[bytes]:
            with channel:
                yield b": p2pnode event stream\n\n"
                while True:
                    with trio.move_on_after(SSE_HEARTBEAT) as idle:
                        event = await channel.receive()
                    if idle.cancelled_caught:
                        yield b": keepalive\n\n"
                        continue
                    if event.peer and event.peer not in names:
                        names.update(await self._names())
                    data = json.dumps(event_json(event, names))
                    yield f"event: {event.kind.value}\ndata: {data}\n\n".encode()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    # --- DHT -------------------------------------------------------------------------------------

    async def dht_find(self, request: Request) -> Response:
        key = parse_id(request.path_params["id"])
        dht = self.daemon.dht
        if dht is None or dht.node is None:
            raise ApiError(409, "no-dht", "this daemon runs without a DHT")
        timeout = query_float(request, "timeout", 10.0, MAX_WAIT)
        try:
            signed = await dht.find_record(key, timeout=timeout)
        except RecordNotFound as exc:
            raise ApiError(404, "not-found", str(exc)) from None
        except LookupTimeout as exc:
            raise ApiError(504, "timeout", str(exc)) from None
        record = signed.record
        return JSONResponse(
            {
                "id": node_id_text(record.identity_key),
                "addresses": [
                    f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in record.addresses
                ],
                "encryption_key": record.encryption_key.hex(),
                "encryption_key_expires": record.encryption_key_expires,
                "seq": record.seq,
                "expires": record.expires,
            }
        )


def _wrap(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(
        exc.status_code, "http"
    )
    return error_response(exc.status_code, code, str(exc.detail))


def create_app(daemon: DaemonView) -> Starlette:
    """The ASGI application for ``daemon``."""
    api = Api(daemon)
    routes = [
        Route("/v1/identity", _wrap(api.identity), methods=["GET"]),
        Route("/v1/status", _wrap(api.status), methods=["GET"]),
        Route("/v1/peers", _wrap(api.peers), methods=["GET"]),
        Route("/v1/contacts", _wrap(api.contacts_list), methods=["GET"]),
        Route("/v1/contacts", _wrap(api.contacts_add), methods=["POST"]),
        Route("/v1/contacts/{name}", _wrap(api.contacts_rename), methods=["PATCH"]),
        Route("/v1/contacts/{name}", _wrap(api.contacts_remove), methods=["DELETE"]),
        Route("/v1/messages", _wrap(api.send), methods=["POST"]),
        Route("/v1/messages/{id}", _wrap(api.message), methods=["GET"]),
        Route("/v1/inbox", _wrap(api.inbox), methods=["GET"]),
        Route("/v1/inbox/read", _wrap(api.mark_read), methods=["POST"]),
        Route("/v1/events", _wrap(api.events), methods=["GET"]),
        Route("/v1/dht/{id}", _wrap(api.dht_find), methods=["GET"]),
    ]
    # No ``max_body_size`` here: Starlette's limit answers 413 in plain text, not our JSON
    # error; :func:`json_body` (the only reader of bodies) enforces the same limit.
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
