"""The DHT simulation command's library: a small lossy, churning network finds every record,
with plausible hop and datagram counts, reproducibly, and the outputs are well formed.

The full scenario (a routing-table refresh between churn and republish) is what
``python -m p2pnode.sim`` runs; here the settle time is one expiry sweep, which skips the
refresh, so the test stays fast. The lookups then meet more departed contacts, not fewer.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from p2pnode import sim
from p2pnode.dht.node import EXPIRY_SWEEP_INTERVAL
from p2pnode.dht.wire import Contact

LOSS = 0.05
CHURN = 0.2
LATENCY = (0.005, 0.05)
#: Virtual seconds between churn and republish here (see the module docstring).
QUICK_SETTLE = EXPIRY_SWEEP_INTERVAL
#: Most datagrams one asked contact can account for: the request sent up to three times (two
#: retransmissions) and a reply to each, plus a verification ping and its reply each way.
DATAGRAMS_PER_CONTACT = 10


def sweep(sizes: list[int], *, seed: int, lookups: int) -> dict[str, Any]:
    return sim.run_sweep(
        sizes,
        loss=LOSS,
        churn=CHURN,
        latency=LATENCY,
        lookups=lookups,
        seed=seed,
        settle_seconds=QUICK_SETTLE,
    )


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return sweep([50, 100], seed=1, lookups=40)


def test_every_lookup_finds_the_latest_record_in_few_hops(report: dict[str, Any]) -> None:
    for entry in report["results"]:
        nodes = entry["nodes"]
        assert entry["live"] == nodes - round(CHURN * nodes)
        assert entry["join_failures"] == 0
        assert entry["unreached_publishes"] == 0
        assert entry["noisy_lookups"] == 0
        # The network really was lossy, and churn left departed nodes to run into.
        network = entry["network"]
        assert 0.03 < network["lost"] / network["sent"] < 0.07
        assert network["unreachable"] > 0

        assert entry["lookups"] == 40
        assert entry["success_rate"] == 1.0, entry["outcomes"]
        assert 1.0 <= entry["hops"]["mean"] <= math.log2(nodes) + 3
        for sample in entry["samples"]:
            assert sample["outcome"] == "ok"
            assert sample["seeker"] != sample["target"]
            assert 1 <= sample["hops"] <= sample["contacts_asked"]
            assert sample["value_hops"] is not None and sample["value_hops"] <= sample["hops"]
            asked = sample["contacts_asked"]
            assert asked <= sample["datagrams"] <= DATAGRAMS_PER_CONTACT * asked
            assert sample["datagrams_with_aftermath"] >= sample["datagrams"]
            assert sample["latency_ms"] > 0


def test_outputs_are_written_and_the_plot_is_a_png(report: dict[str, Any], tmp_path: Path) -> None:
    paths = sim.write_outputs(report, tmp_path / "out")

    assert json.loads(paths["json"].read_text()) == report
    table = paths["markdown"].read_text()
    assert "| 50 | 40 | 100.0% (40/40) |" in table
    assert "| 100 | 80 | 100.0% (40/40) |" in table
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", png[8:16])
    width, height = struct.unpack(">II", png[16:24])
    assert (length, kind) == (13, b"IHDR")
    assert (width, height) == (sim.PLOT_WIDTH, sim.plot_height(3))
    assert png.endswith(b"IEND\xaeB`\x82")


def test_same_seed_same_report_different_seed_different_report(report: dict[str, Any]) -> None:
    again = sweep([50], seed=1, lookups=40)
    other = sweep([50], seed=2, lookups=40)

    # The same seed gives the very same result, byte for byte in JSON (the module's report ran
    # N = 50 in another trio run, before N = 100: a size's result depends on nothing else).
    assert json.dumps(again["results"][0]) == json.dumps(report["results"][0])
    assert again["parameters"] == {**report["parameters"], "sizes": [50]}
    # Another seed gives another network and other lookups.
    assert json.dumps(other["results"][0]) != json.dumps(again["results"][0])
    assert other["results"][0]["samples"] != again["results"][0]["samples"]


def contact(n: int) -> Contact:
    return Contact(bytes([n]) * 20, f"127.0.{n}.1", 4000)


def test_hops_count_rounds_of_first_naming() -> None:
    trace = sim.LookupTrace(b"\xff" * 20, [contact(1), contact(2), contact(3)], own_id=b"\0" * 20)
    trace.asked(contact(1).node_id)
    trace.asked(contact(2).node_id)
    # 1 names 4 (round 2) and a seed (which stays round 1) and the seeker (never asked).
    trace.answered(contact(1).node_id, [contact(4), contact(3), Contact(b"\0" * 20, "h", 1)])
    trace.asked(contact(4).node_id)
    trace.asked(contact(3).node_id)
    # 4 names 5 (round 3); 2, answering later, also names 5: the first naming counts.
    trace.answered(contact(4).node_id, [contact(5)])
    trace.answered(contact(2).node_id, [contact(5), contact(6)])
    trace.asked(contact(5).node_id)
    trace.asked(contact(6).node_id)
    trace.answered(contact(6).node_id, b"a record")
    trace.answered(contact(5).node_id, b"another")

    assert trace.rounds == {
        contact(1).node_id: 1,
        contact(2).node_id: 1,
        contact(4).node_id: 2,
        contact(3).node_id: 1,
        contact(5).node_id: 3,
        contact(6).node_id: 2,
    }
    assert trace.hops == 3
    assert trace.value_round == 2  # 6 answered with a value first
