"""A misbehaving device in a real run over mosquitto: its updates are rejected, counted by reason,
and the run goes on to the same good model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import msgpack
import numpy as np
import pytest
from processes import demo
from stolen_device import StolenDevice

from fedprune.protocol.codec import Model, Update, encode_update

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "rogue"
BAD_KINDS = ["nonfinite", "decode", "version", "round", "shape"]


class Rogue(StolenDevice):
    """Joins as a device, then answers round i with a bad update of kind BAD_KINDS[i - 1] (for
    the coordinator session that announced it, as devices do)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, run=RUN, client_id="rogue", rounds=len(BAD_KINDS), declared=50)
        self.sent: list[str] = []

    def answer(self, round_: int, model: Model) -> None:
        kind = BAD_KINDS[round_ - 1]
        zeros = [np.zeros_like(w) for w in model.weights]
        good = encode_update(Update(round=round_, num_samples=1, deltas=zeros), model.masks)
        if kind == "nonfinite":
            deltas = [np.full_like(w, np.nan) for w in model.weights]
            bad = encode_update(Update(round=round_, num_samples=50, deltas=deltas), model.masks)
            self.send(round_, bad)
        elif kind == "decode":
            self.send(round_, b"\xc1 definitely not msgpack")
        elif kind == "version":
            self.send(round_, good, version="2.0")
        elif kind == "round":
            self.send(round_ + 7, good)
            self.send(round_, good)  # then a harmless real answer, so the round need not wait
        else:
            self.send(round_, msgpack.packb({"round": round_, "num_samples": 5, "values": [b""]}))
        self.sent.append(kind)
        self.answered.append(round_)


def test_bad_updates_are_rejected_by_reason_and_the_run_goes_on(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: the rogue joins before the coordinator starts, so it is selected from round 1.
    rogue = Rogue(mosquitto)
    rogue.start()
    command = demo(
        mosquitto, out=tmp_path, run=RUN, clients=2, rounds=10, begin_round=2, end_round=7
    )

    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rogue.stop.set()
    rogue.join(10)

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    assert rogue.sent == BAD_KINDS
    rounds = [
        json.loads(line) for line in (tmp_path / RUN / "metrics.jsonl").read_text().splitlines()
    ]
    rejected: dict[str, int] = {}
    for r in rounds:
        for reason, count in r["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + count
    assert rejected == {kind: 1 for kind in BAD_KINDS}
    assert rounds[-1]["accuracy"] >= 0.9
    assert rounds[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert "rejected" in done.stdout
