"""A misbehaving device in a real run over mosquitto: its updates are rejected, counted by reason,
and the run goes on to the same good model."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest
from processes import demo

from fedprune.protocol.chunks import Reassembler, split
from fedprune.protocol.codec import Model, Update, decode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import Chunk, Hello, Offline, Round
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "rogue"
BAD_KINDS = ["nonfinite", "decode", "version", "round", "shape"]


class Rogue(threading.Thread):
    """Joins as a device, then answers round i with a bad update of kind BAD_KINDS[i - 1] (for
    the coordinator session that announced it, as devices do)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.topics = Topics(RUN)
        self.transport = MqttTransport(url, client_id="rogue")
        self.session = ""  # the coordinator session of the round it answers
        for pattern in (self.topics.round, self.topics.all_models):
            self.transport.subscribe(pattern)
        hello = Hello(client_id="rogue", profile="generic-x86-64", num_samples=50, backend="keras")
        self.transport.publish(self.topics.client_status("rogue"), self._encode(hello), retain=True)
        self.sent: list[str] = []
        self.stop = threading.Event()

    def _encode(self, message: object) -> bytes:
        return encode(message, run=RUN, sender="rogue", session=self.session)  # type: ignore[arg-type]

    def _send(self, round_: int, payload: bytes, *, version: str | None = None) -> None:
        for chunk in split(payload, max_chunk=100_000):
            body = self._encode(chunk)
            if version is not None:
                envelope = msgpack.unpackb(body)
                envelope["v"] = version
                body = msgpack.packb(envelope)
            self.transport.publish(f"{self.topics.update('rogue', round_)}/{chunk.index}", body)

    def answer(self, round_: int, model: Model) -> None:
        kind = BAD_KINDS[round_ - 1]
        zeros = [np.zeros_like(w) for w in model.weights]
        good = encode_update(Update(round=round_, num_samples=1, deltas=zeros), model.masks)
        if kind == "nonfinite":
            deltas = [np.full_like(w, np.nan) for w in model.weights]
            bad = encode_update(Update(round=round_, num_samples=50, deltas=deltas), model.masks)
            self._send(round_, bad)
        elif kind == "decode":
            self._send(round_, b"\xc1 definitely not msgpack")
        elif kind == "version":
            self._send(round_, good, version="2.0")
        elif kind == "round":
            self._send(round_ + 7, good)
            self._send(round_, good)  # then a harmless real answer, so the round need not wait
        else:
            self._send(round_, msgpack.packb({"round": round_, "num_samples": 5, "values": [b""]}))
        self.sent.append(kind)

    def run(self) -> None:
        assemblers: dict[str, Reassembler] = {}
        models: dict[str, bytes] = {}
        pending: Round | None = None
        while not self.stop.is_set() and len(self.sent) < len(BAD_KINDS):
            item = self.transport.get(timeout=0.2)
            if item is not None and item[1]:
                message = decode(item[1]).message
                if isinstance(message, Round):
                    pending, self.session = message, message.session
                elif isinstance(message, Chunk):
                    part = assemblers.setdefault(message.sha256, Reassembler(max_size=10**8))
                    if (payload := part.add(message)) is not None:
                        models[message.sha256] = payload
            if pending is not None and pending.model.sha256 in models:
                if pending.selects("rogue"):
                    self.answer(pending.round, decode_model(models[pending.model.sha256]))
                pending = None
        offline = self._encode(Offline(who="rogue"))
        self.transport.publish(self.topics.client_status("rogue"), offline, retain=True)
        self.transport.flush(5)
        self.transport.close()


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
