"""The control API answers malformed requests with a 4xx and a JSON error, never a 500.

One real daemon (``Testnet(n=1)``) serves every test of this module; the tests speak raw
HTTP/1.1 over its Unix socket so that they can send bytes no well-behaved client would. Every
error answer must be ``{"error": {"code": str, "message": str}}`` with a 4xx status.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pnode.api.app import MAX_REQUEST_BODY
from p2pnode.envelope import MAX_BODY_SIZE
from p2pnode.nodeid import NodeId, NodeIdError
from p2pnode.store import MAX_CONTACT_NAME_LENGTH
from p2pnode.testnet import Testnet, TestNode

#: Seconds the module's daemon has to come up (the harness has its own start deadline too).
START_DEADLINE = 60.0
#: Seconds one raw request may take.
REQUEST_TIMEOUT = 15.0


# --- one daemon for the module ------------------------------------------------------------


@dataclass
class Served:
    """The module's daemon, run by a Testnet in a trio loop on its own thread."""

    node: TestNode
    token: trio.lowlevel.TrioToken
    stop: trio.Event


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestNode]:
    root = tmp_path_factory.mktemp("api")
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        async with Testnet(n=1, root=root) as net:
            state["served"] = Served(net[0], trio.lowlevel.current_trio_token(), trio.Event())
            ready.set()
            await state["served"].stop.wait()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # noqa: BLE001 (re-raised by the fixture below)
            state["error"] = exc
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="api-testnet", daemon=True)
    thread.start()
    assert ready.wait(START_DEADLINE), "the daemon did not start in time"
    if "served" not in state:
        raise RuntimeError("the daemon did not start") from state.get("error")
    served: Served = state["served"]
    try:
        yield served.node
    finally:
        trio.from_thread.run_sync(served.stop.set, trio_token=served.token)
        thread.join(START_DEADLINE)
        assert not thread.is_alive(), "the testnet did not stop"
        assert "error" not in state, state.get("error")
        assert served.node.process is not None
        assert served.node.process.returncode == 0


# --- raw HTTP over the Unix socket ----------------------------------------------------------


@dataclass
class Answer:
    status: int
    content_type: str
    raw: bytes
    body: Any = field(default=None)


def exchange(
    node: TestNode,
    method: str,
    path: str,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> Answer:
    """Send one request as raw bytes and read the answer.

    The server may answer (e.g. 413) and close before it has read the whole body; the write
    then fails, but the answer is still in our receive buffer, so it is read anyway.
    """
    head = {"Host": "p2pnode", "Connection": "close", **(headers or {})}
    if body is not None and "Content-Length" not in head:
        if chunked:
            head["Transfer-Encoding"] = "chunked"
        else:
            head["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
    payload = "\r\n".join(lines).encode()
    if body is not None:
        payload += f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" if chunked else body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(REQUEST_TIMEOUT)
        sock.connect(str(node.api_socket))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)  # if this fails, the answer came early: it is read below
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
    decoded = json.loads(raw) if raw and content_type.startswith("application/json") else None
    return Answer(response.status, content_type, raw, decoded)


def send_json(node: TestNode, method: str, path: str, value: Any) -> Answer:
    return exchange(node, method, path, json.dumps(value).encode())


def assert_error(
    answer: Answer, status: int, code: str | None = None, *, mentions: str = ""
) -> str:
    """Check an error answer's status and JSON shape; returns its message."""
    assert answer.status == status, (answer.status, answer.raw[:300])
    assert answer.content_type.startswith("application/json"), answer
    error = answer.body["error"]
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert mentions.lower() in error["message"].lower(), error
    return str(error["message"])


def some_id() -> str:
    """A well-formed node ID nobody runs."""
    return str(NodeId.from_key(os.urandom(32)))


def swapped(node_id: str, index: int = 8) -> str:
    """``node_id`` with two different neighbours swapped (a different ID is chosen if they are
    equal): the check character catches it."""
    while node_id[index] == node_id[index + 1]:
        node_id = some_id()
    return node_id[:index] + node_id[index + 1] + node_id[index] + node_id[index + 2 :]


def mistyped(node_id: str, index: int = 3) -> str:
    """``node_id`` with one character changed: the check character catches it."""
    replacement = "B" if node_id[index] != "B" else "C"
    return node_id[:index] + replacement + node_id[index + 1 :]


# --- request bodies ------------------------------------------------------------------------


def test_valid_requests_are_served(daemon: TestNode) -> None:
    """The baseline the error tests are measured against: the same socket, well-formed."""
    identity = exchange(daemon, "GET", "/v1/identity")
    assert identity.status == 200
    assert identity.body["id"] == daemon.id

    sent = send_json(daemon, "POST", "/v1/messages", {"to": some_id(), "body": "hello"})
    assert sent.status == 202
    assert sent.body["state"] == "queued"
    assert len(bytes.fromhex(sent.body["id"])) == 16


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"{'to': 'x'}", id="single-quotes"),
        pytest.param(b'{"to": "x",}', id="trailing-comma"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"[" * 50_000 + b"]" * 50_000, id="deeply-nested"),
    ],
)
def test_invalid_json_is_400(daemon: TestNode, raw: bytes) -> None:
    for path in ("/v1/messages", "/v1/contacts", "/v1/inbox/read"):
        assert_error(exchange(daemon, "POST", path, raw), 400, "bad-json")


@pytest.mark.parametrize("value", [[], ["to"], "text", 1, 1.5, None, True])
def test_json_that_is_not_an_object_is_400(daemon: TestNode, value: Any) -> None:
    for path in ("/v1/messages", "/v1/contacts", "/v1/inbox/read"):
        assert_error(send_json(daemon, "POST", path, value), 400, "bad-json", mentions="object")


@pytest.mark.parametrize(
    ("body", "code", "mentions"),
    [
        ({}, "missing-field", "'to'"),
        ({"body": "hi"}, "missing-field", "'to'"),
        ({"to": None, "body": "hi"}, "missing-field", "'to'"),
        ({"to": 5, "body": "hi"}, "bad-field", "'to'"),
        ({"to": ["x"], "body": "hi"}, "bad-field", "'to'"),
        ({"to": "ID", "body": 5}, "bad-field", "'body'"),
        ({"to": "ID", "body": {"text": "hi"}}, "bad-field", "'body'"),
        ({"to": "ID", "body_b64": False}, "bad-field", "'body_b64'"),
        ({"to": "ID"}, "bad-field", "exactly one"),
        ({"to": "ID", "body": "hi", "body_b64": "aGk="}, "bad-field", "exactly one"),
        ({"to": "ID", "body_b64": "!!!!"}, "bad-field", "base64"),
        ({"to": "ID", "body_b64": "aGk"}, "bad-field", "base64"),  # padding missing
        ({"to": "ID", "body_b64": "aG k="}, "bad-field", "base64"),
        ({"to": "ID", "body_b64": "aGk=\u00e9"}, "bad-field", "base64"),
    ],
)
def test_malformed_send_is_400(
    daemon: TestNode, body: dict[str, Any], code: str, mentions: str
) -> None:
    if body.get("to") == "ID":
        body = {**body, "to": some_id()}
    assert_error(send_json(daemon, "POST", "/v1/messages", body), 400, code, mentions=mentions)


def test_body_with_a_lone_surrogate_is_400(daemon: TestNode) -> None:
    """``"\\ud800"`` is valid JSON but not text that can be encoded as UTF-8."""
    raw = b'{"to": "%s", "body": "\\ud800"}' % some_id().encode()
    assert_error(exchange(daemon, "POST", "/v1/messages", raw), 400, "bad-field")


def test_message_body_over_the_limit_is_413(daemon: TestNode) -> None:
    body = {"to": some_id(), "body": "x" * (MAX_BODY_SIZE + 1)}
    assert_error(send_json(daemon, "POST", "/v1/messages", body), 413, "too-large")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/contacts", "/v1/inbox/read"])
def test_request_body_over_128_kib_is_413(daemon: TestNode, path: str, chunked: bool) -> None:
    assert MAX_REQUEST_BODY == 128 * 1024
    raw = json.dumps({"to": some_id(), "body": "x" * MAX_REQUEST_BODY}).encode()
    answer = exchange(daemon, "POST", path, raw, chunked=chunked)
    assert_error(answer, 413, "too-large")


def test_unknown_recipient_name_is_404(daemon: TestNode) -> None:
    answer = send_json(daemon, "POST", "/v1/messages", {"to": "no-such-friend", "body": "hi"})
    assert_error(answer, 404, "unknown-recipient", mentions="no-such-friend")


def test_mistyped_recipient_id_is_refused_with_the_checkers_reason(daemon: TestNode) -> None:
    bad = mistyped(some_id())
    with pytest.raises(NodeIdError) as checker:
        NodeId.parse(bad)
    answer = send_json(daemon, "POST", "/v1/messages", {"to": bad, "body": "hi"})
    message = assert_error(answer, 404, "unknown-recipient")
    assert str(checker.value) in message


# --- node IDs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_bad",
    [
        pytest.param(lambda good: mistyped(good, 3), id="mistyped"),
        pytest.param(swapped, id="swapped"),
        pytest.param(lambda good: good[:5] + "0" + good[6:], id="lookalike-digit"),
        pytest.param(lambda good: good[:-1], id="too-short"),
    ],
)
def test_malformed_node_id_is_400_with_the_checkers_message(
    daemon: TestNode, make_bad: Callable[[str], str]
) -> None:
    good = some_id()
    bad = make_bad(good)
    with pytest.raises(NodeIdError) as checker:
        NodeId.parse(bad)
    for answer in (
        send_json(daemon, "POST", "/v1/contacts", {"name": "typo", "id": bad}),
        exchange(daemon, "GET", f"/v1/dht/{quote(bad, safe='')}"),
    ):
        message = assert_error(answer, 400, "bad-node-id")
        assert message == str(checker.value)
        if checker.value.position is not None:
            assert "character" in message
            assert "group" in message


# --- message ids and query parameters ------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["zz", "0" * 31, "0" * 30, "0" * 34, "g" * 32, "%20" * 16, "0x" + "0" * 30]
)
def test_bad_message_id_is_400(daemon: TestNode, text: str) -> None:
    answer = exchange(daemon, "GET", f"/v1/messages/{text}")
    assert_error(answer, 400, "bad-message-id", mentions="32 hex digits")


def test_unknown_message_id_is_404(daemon: TestNode) -> None:
    answer = exchange(daemon, "GET", f"/v1/messages/{os.urandom(16).hex()}")
    assert_error(answer, 404, "unknown-message")


@pytest.mark.parametrize("wait", ["-1", "abc", "nan", "inf", "301", ""])
def test_bad_wait_parameter_is_400(daemon: TestNode, wait: str) -> None:
    sent = send_json(daemon, "POST", "/v1/messages", {"to": some_id(), "body": "wait"})
    assert sent.status == 202
    answer = exchange(daemon, "GET", f"/v1/messages/{sent.body['id']}?wait={wait}")
    assert_error(answer, 400, "bad-parameter", mentions="wait")


@pytest.mark.parametrize(
    "query",
    [
        "limit=abc",
        "limit=0",
        "limit=-5",
        "limit=1001",
        "limit=1.5",
        "before=0",
        "before=x",
        "before=99999999999999999999999999",
    ],
)
def test_bad_inbox_parameters_are_400(daemon: TestNode, query: str) -> None:
    name = query.split("=", maxsplit=1)[0]
    answer = exchange(daemon, "GET", f"/v1/inbox?{query}")
    assert_error(answer, 400, "bad-parameter", mentions=name)


@pytest.mark.parametrize("timeout", ["-1", "abc", "1e9"])
def test_bad_dht_timeout_is_400(daemon: TestNode, timeout: str) -> None:
    answer = exchange(daemon, "GET", f"/v1/dht/{quote(daemon.id)}?timeout={timeout}")
    assert_error(answer, 400, "bad-parameter", mentions="timeout")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"seqs": []},
        {"seqs": "1"},
        {"seqs": [0]},
        {"seqs": [-1]},
        {"seqs": [1.0]},
        {"seqs": [True]},
        {"seqs": [2**64]},  # beyond SQLite's integers
        {"seqs": list(range(1, 1002))},
        {"all": "yes"},
    ],
)
def test_bad_mark_read_is_400(daemon: TestNode, body: dict[str, Any]) -> None:
    assert_error(send_json(daemon, "POST", "/v1/inbox/read", body), 400, "bad-field")


# --- routes and methods --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/nope", "/v2/status", "/v1/status/extra"])
def test_unknown_route_is_404(daemon: TestNode, path: str) -> None:
    assert_error(exchange(daemon, "GET", path), 404, "not-found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/messages"),
        ("GET", "/v1/messages"),
        ("DELETE", "/v1/status"),
        ("POST", "/v1/identity"),
        ("GET", "/v1/inbox/read"),
        ("POST", "/v1/contacts/someone"),
        ("DELETE", "/v1/messages/" + "0" * 32),
    ],
)
def test_wrong_method_is_405(daemon: TestNode, method: str, path: str) -> None:
    answer = exchange(daemon, method, path, b"{}")
    assert_error(answer, 405, "method-not-allowed")


# --- contacts ------------------------------------------------------------------------------


def test_contact_errors(daemon: TestNode) -> None:
    first, second = some_id(), some_id()
    added = send_json(daemon, "POST", "/v1/contacts", {"name": "Carol", "id": first})
    assert added.status == 201
    assert added.body == {"name": "Carol", "id": first}

    # Names are unique ignoring case, and a node has one name.
    for name in ("Carol", "carol", "CAROL"):
        answer = send_json(daemon, "POST", "/v1/contacts", {"name": name, "id": second})
        assert_error(answer, 409, mentions="already")
    answer = send_json(daemon, "POST", "/v1/contacts", {"name": "Carla", "id": first})
    assert_error(answer, 409, mentions="already")

    # Renaming or removing someone unknown.
    answer = send_json(daemon, "PATCH", "/v1/contacts/nobody-known", {"name": "x"})
    assert_error(answer, 404, mentions="no contact")
    assert_error(exchange(daemon, "DELETE", "/v1/contacts/nobody-known"), 404)

    # Renaming onto a taken name.
    assert send_json(daemon, "POST", "/v1/contacts", {"name": "Dave", "id": second}).status == 201
    answer = send_json(daemon, "PATCH", "/v1/contacts/Dave", {"name": "carol"})
    assert_error(answer, 409, mentions="already")

    # Malformed rename bodies.
    assert_error(send_json(daemon, "PATCH", "/v1/contacts/Dave", {}), 400, "missing-field")
    assert_error(send_json(daemon, "PATCH", "/v1/contacts/Dave", {"name": 3}), 400, "bad-field")
    assert_error(exchange(daemon, "PATCH", "/v1/contacts/Dave", b"nope"), 400, "bad-json")

    listed = exchange(daemon, "GET", "/v1/contacts")
    names = {c["name"]: c["id"] for c in listed.body}
    assert names["Carol"] == first
    assert names["Dave"] == second


@pytest.mark.parametrize(
    ("name", "mentions"),
    [
        ("", "empty"),
        (" lead", "whitespace"),
        ("trail ", "whitespace"),
        ("bell\x07", "control"),
        ("zero\u200bwidth", "invisible"),
        ("x" * (MAX_CONTACT_NAME_LENGTH + 1), "limit"),
    ],
)
def test_invalid_contact_name_is_400(daemon: TestNode, name: str, mentions: str) -> None:
    answer = send_json(daemon, "POST", "/v1/contacts", {"name": name, "id": some_id()})
    assert_error(answer, 400, mentions=mentions)
    added = send_json(
        daemon, "POST", "/v1/contacts", {"name": f"ok-{os.urandom(4).hex()}", "id": some_id()}
    )
    assert added.status == 201
    renamed = send_json(daemon, "PATCH", f"/v1/contacts/{added.body['name']}", {"name": name})
    assert_error(renamed, 400, mentions=mentions)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "Erin"},
        {"id": "ID"},
        {"name": 1, "id": "ID"},
        {"name": "Erin", "id": 1},
        {"name": None, "id": "ID"},
        {"name": ["Erin"], "id": "ID"},
    ],
)
def test_malformed_contact_add_is_400(daemon: TestNode, body: dict[str, Any]) -> None:
    body = {k: some_id() if v == "ID" else v for k, v in body.items()}
    answer = send_json(daemon, "POST", "/v1/contacts", body)
    assert_error(answer, 400)
    assert answer.body["error"]["code"] in ("missing-field", "bad-field", "bad-node-id")


# --- fuzzing -------------------------------------------------------------------------------

_FIELD_NAMES = ["to", "body", "body_b64", "name", "id", "seqs", "all"]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    # Every code point, lone surrogates included (json.dumps writes them as \\udXXX).
    st.text(st.characters(exclude_categories=()), max_size=20),
    st.sampled_from(["", "Carol", "aGk=", "!!", "\u200b", "x" * 70]),
    st.builds(some_id),
    st.builds(lambda: mistyped(some_id())),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
_objects = st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=6), _values, max_size=5)
_bodies = st.one_of(
    _objects.map(lambda v: json.dumps(v).encode()),
    _values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.sampled_from(
        [
            ("POST", "/v1/messages"),
            ("POST", "/v1/contacts"),
            ("POST", "/v1/inbox/read"),
            ("PATCH", "/v1/contacts/Carol"),
        ]
    ),
    body=_bodies,
)
def test_random_bodies_never_get_a_server_error(
    daemon: TestNode, target: tuple[str, str], body: bytes
) -> None:
    method, path = target
    answer = exchange(daemon, method, path, body)
    assert answer.status < 500, (answer.status, body, answer.raw[:300])
    if answer.status >= 400:
        assert_error(answer, answer.status)
    # The daemon is still serving.
    assert exchange(daemon, "GET", "/v1/status").status == 200


def test_daemon_log_shows_no_unhandled_error(daemon: TestNode) -> None:
    """Run last in this module: none of the requests above made the app raise."""
    log = Path(daemon.log_path).read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
