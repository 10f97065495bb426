"""Commands that talk to the running daemon over its API socket."""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from p2pnode.api.client import ApiClient, ApiClientError, DaemonNotRunning, path_segment
from p2pnode.cli.common import (
    NotDeliveredError,
    call,
    client_for,
    connection_error,
    emit,
    home_option,
    json_option,
    main,
    no_daemon,
)
from p2pnode.envelope import MAX_BODY_SIZE


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


@main.command()
@home_option
@json_option
def status(home: Path | None, as_json: bool) -> None:
    """Show the daemon's state: uptime, addresses, links, outbox and unread counts."""
    data = call(client_for(home), "GET", "/v1/status")
    outbox = data["outbox"]
    dht = data["dht"] or {}
    text = "\n".join(
        [
            f"node      {data['id']}",
            f"version   {data['version']}   up {data['uptime_s']:.0f} s",
            f"links     listening on {data['listen']}, {data['links_open']} open",
            f"dht       {dht.get('address', '-')}, {dht.get('routing_table_size', 0)} contacts, "
            f"record on {dht.get('record_published_on', 0)} nodes",
            "outbox    " + ", ".join(f"{n} {state}" for state, n in outbox.items()),
            f"inbox     {data['unread']} unread",
        ]
    )
    emit(as_json, data, text)


@main.command()
@home_option
@json_option
def peers(home: Path | None, as_json: bool) -> None:
    """List open links and the DHT's routing-table contacts."""
    data = call(client_for(home), "GET", "/v1/peers")
    rows = [[link["name"] or "-", link["id"]] for link in data["links"]]
    text = (
        _table(rows, ["NAME", "LINKED PEER"]) if rows else "no open links"
    ) + f"\n{len(data['dht_contacts'])} DHT contacts"
    emit(as_json, data, text)


@main.group()
def contacts() -> None:
    """Manage contacts: petnames for node IDs, usable wherever a recipient is asked for."""


@contacts.command("add")
@click.argument("name")
@click.argument("node_id", metavar="ID")
@home_option
@json_option
def contacts_add(name: str, node_id: str, home: Path | None, as_json: bool) -> None:
    """Add NAME for the node ID ID."""
    data = call(client_for(home), "POST", "/v1/contacts", {"name": name, "id": node_id})
    emit(as_json, data, f"added {data['name']}  {data['id']}")


@contacts.command("list")
@home_option
@json_option
def contacts_list(home: Path | None, as_json: bool) -> None:
    """List contacts."""
    data = call(client_for(home), "GET", "/v1/contacts")
    rows = [[c["name"], c["id"]] for c in data]
    emit(as_json, data, _table(rows, ["NAME", "ID"]) if rows else "no contacts")


@contacts.command("rename")
@click.argument("old")
@click.argument("new")
@home_option
@json_option
def contacts_rename(old: str, new: str, home: Path | None, as_json: bool) -> None:
    """Rename contact OLD to NEW."""
    data = call(client_for(home), "PATCH", f"/v1/contacts/{path_segment(old)}", {"name": new})
    emit(as_json, data, f"renamed {old} to {data['name']}")


@contacts.command("rm")
@click.argument("name")
@home_option
def contacts_rm(name: str, home: Path | None) -> None:
    """Remove contact NAME."""
    call(client_for(home), "DELETE", f"/v1/contacts/{path_segment(name)}")
    click.echo(f"removed {name}")


@main.command()
@click.argument("recipient")
@click.argument("text", required=False)
@click.option("--no-wait", is_flag=True, help="Return once the message is queued.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, 300),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the recipient's receipt.",
)
@home_option
@json_option
def send(
    recipient: str,
    text: str | None,
    no_wait: bool,
    timeout: float,
    home: Path | None,
    as_json: bool,
) -> None:
    """Send TEXT (or standard input, with "-" or no TEXT) to RECIPIENT.

    RECIPIENT is a node ID or a contact name. The message is queued durably first; by default
    the command then waits for the recipient's signed receipt. Exit code 4 means it was not
    delivered within --timeout: it stays queued and will still be delivered.
    """
    if text is None or text == "-":
        body = sys.stdin.buffer.read(MAX_BODY_SIZE + 1)
    else:
        body = text.encode("utf-8")
    if len(body) > MAX_BODY_SIZE:
        raise click.ClickException(f"the message is over {MAX_BODY_SIZE} bytes")
    client = client_for(home, timeout=timeout + 30)
    data = call(
        client,
        "POST",
        "/v1/messages",
        {"to": recipient, "body_b64": base64.b64encode(body).decode()},
    )
    message_id = data["id"]
    if not no_wait:
        data = call(client, "GET", f"/v1/messages/{message_id}?wait={timeout}")
    state = data["state"]
    emit(as_json, {"id": message_id, "to": data["to"], "state": state}, f"{state} {message_id}")
    if state == "failed":
        raise click.ClickException(f"not delivered: {data.get('last_error')}")
    if not no_wait and state != "delivered":
        raise NotDeliveredError(
            f"not delivered within {timeout:g} s; the message stays queued and will still be "
            f"delivered (check with: p2pnode status)"
        )


def _inbox_line(message: dict[str, Any]) -> str:
    sender = message.get("from_name") or message["from"]
    body = (
        message["body"]
        if message["body"] is not None
        else f"<{len(base64.b64decode(message['body_b64']))} bytes of binary>"
    )
    return f"{_when(message['received_at'])}  {sender}: {body}"


@main.command()
@click.option("--unread", is_flag=True, help="Only unread messages.")
@click.option("--follow", "-f", is_flag=True, help="Then keep printing messages as they arrive.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--mark-read", is_flag=True, help="Mark the listed messages as read.")
@home_option
@json_option
def inbox(
    unread: bool, follow: bool, limit: int, mark_read: bool, home: Path | None, as_json: bool
) -> None:
    """List received messages, newest first; --follow keeps printing new ones (one JSON
    object per line with --json)."""
    client = client_for(home)
    query = f"/v1/inbox?limit={limit}" + ("&unread=1" if unread else "")
    messages = call(client, "GET", query)
    if as_json and not follow:
        click.echo(json.dumps(messages))
    else:
        for message in reversed(messages):
            click.echo(json.dumps(message) if as_json else _inbox_line(message))
    if mark_read and messages:
        call(client, "POST", "/v1/inbox/read", {"seqs": [m["seq"] for m in messages]})
    if follow:
        _follow(client, as_json)


def _follow(client: ApiClient, as_json: bool) -> None:
    """Print incoming messages as they arrive, until interrupted."""
    try:
        for kind, event in client.events():
            if kind != "message":
                continue
            if as_json:
                click.echo(json.dumps(event))
            else:
                click.echo(_inbox_line(event))
    except DaemonNotRunning:
        no_daemon(client)
    except ApiClientError as exc:
        raise click.ClickException(exc.message) from None
    except OSError as exc:
        raise connection_error(client, exc) from None
    except KeyboardInterrupt:
        return


@main.group()
def dht() -> None:
    """Ask the DHT."""


@dht.command("find")
@click.argument("node_id", metavar="ID")
@click.option("--timeout", type=click.FloatRange(0, 300), default=10.0, show_default=True)
@home_option
@json_option
def dht_find(node_id: str, timeout: float, home: Path | None, as_json: bool) -> None:
    """Look up the peer record of node ID in the DHT."""
    client = client_for(home, timeout=timeout + 30)
    data = call(client, "GET", f"/v1/dht/{path_segment(node_id)}?timeout={timeout}")
    text = "\n".join(
        [
            f"node        {data['id']}",
            f"addresses   {', '.join(data['addresses'])}",
            f"sequence    {data['seq']}",
            f"expires     {_when(data['expires'])}",
        ]
    )
    emit(as_json, data, text)
