"""Known DHT peers, persisted so that a restarted node rejoins even with every seed down.

The file is JSON (the kademlia package's own ``save_state`` format is not safe to load)::

    {"v": 1, "peers": [{"id": "<40 hex>", "host": "<IP>", "port": <int>}, ...]}

It is written atomically with mode 0600. A damaged file is reported and ignored (the node then
joins through its seeds), never trusted and never fatal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from p2pnode.dht.wire import NODE_ID_SIZE, Contact, WireError, parse_contact
from p2pnode.home import write_private_file

log = logging.getLogger(__name__)

#: Peers remembered; the closest k and a spread over buckets fit easily.
MAX_SAVED_PEERS: Final = 200
#: Largest peers file read (200 entries take about 20 KB).
MAX_PEERS_FILE_SIZE: Final = 256 * 1024
FORMAT_VERSION: Final = 1


def save_peers(path: Path, contacts: Iterable[Contact]) -> int:
    """Write up to :data:`MAX_SAVED_PEERS` contacts to ``path`` atomically; returns how many."""
    peers = [{"id": c.node_id.hex(), "host": c.host, "port": c.port} for c in contacts][
        :MAX_SAVED_PEERS
    ]
    document = {"v": FORMAT_VERSION, "peers": peers}
    write_private_file(path, json.dumps(document, indent=1).encode())
    return len(peers)


def load_peers(path: Path) -> list[Contact]:
    """Read the contacts saved at ``path``; an absent or damaged file gives an empty list (a
    damaged one is logged)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PEERS_FILE_SIZE + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read known peers from %s: %s", path, exc.strerror)
        return []
    try:
        return _parse(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        log.warning("ignoring damaged known-peers file %s: %s", path, exc)
        return []


def _parse(data: bytes) -> list[Contact]:
    if len(data) > MAX_PEERS_FILE_SIZE:
        raise ValueError("file too large")
    document: Any = json.loads(data)
    if not isinstance(document, dict) or document.get("v") != FORMAT_VERSION:
        raise ValueError("not a version 1 peers file")
    peers = document.get("peers")
    if not isinstance(peers, list):
        raise ValueError("'peers' is not a list")
    entries: list[Contact] = []
    for peer in peers[:MAX_SAVED_PEERS]:
        if not isinstance(peer, dict) or not isinstance(peer.get("id"), str):
            raise ValueError("peer entry is not an object with an 'id'")
        try:
            node_id = bytes.fromhex(peer["id"])
        except ValueError:
            raise ValueError("peer id is not hex") from None
        if len(node_id) != NODE_ID_SIZE:
            raise ValueError("peer id is not 20 bytes")
        try:
            entries.append(parse_contact([node_id, peer.get("host"), peer.get("port")]))
        except WireError as exc:
            raise ValueError(str(exc)) from None
    return entries
