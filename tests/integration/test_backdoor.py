"""A backdoor in the last round over mosquitto (issue 22): one device whose valid account claims
10,000,000 samples sends, in the run's last round, an update that erases two classes. The overall
accuracy stays well above chance, so only the per-class gate can tell: the model must not be
deployed, and the run must say which classes fell."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from processes import demo

from fedprune.protocol.chunks import Reassembler, split
from fedprune.protocol.codec import Model, Update, decode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import Chunk, Hello, Message, Offline, Round
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "backdoor"
ROUNDS = 6
ERASED = (2, 3)


class Backdoor(threading.Thread):
    """A device that declares 10,000,000 samples, sends empty updates worth one sample until the
    last round, then claims them all for one that pushes the output layer's bias of the ERASED
    classes far down."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.topics = Topics(RUN)
        self.transport = MqttTransport(url, client_id="backdoor")
        self.session = ""
        for pattern in (self.topics.round, self.topics.all_models):
            self.transport.subscribe(pattern)
        hello = Hello(
            client_id="backdoor", profile="generic-x86-64", num_samples=10_000_000, backend="keras"
        )
        status = self.topics.client_status("backdoor")
        self.transport.publish(status, self._encode(hello), retain=True)
        self.answered: list[int] = []
        self.stop = threading.Event()

    def _encode(self, message: Message) -> bytes:
        return encode(message, run=RUN, sender="backdoor", session=self.session)

    def answer(self, round_: int, model: Model) -> None:
        deltas = [np.zeros_like(w) for w in model.weights]
        claim = 1  # until the last round: no weight, nothing to see
        if round_ == ROUNDS:
            for c in ERASED:
                deltas[-1][c] = -100.0  # the output layer's bias: never predicted again
            claim = 10_000_000  # what its hello declared: it outweighs everyone
        update = Update(round=round_, num_samples=claim, deltas=deltas)
        for chunk in split(encode_update(update, model.masks), max_chunk=100_000):
            topic = f"{self.topics.update('backdoor', round_)}/{chunk.index}"
            self.transport.publish(topic, self._encode(chunk))
        self.answered.append(round_)

    def run(self) -> None:
        parts: dict[str, Reassembler] = {}
        models: dict[str, bytes] = {}
        pending: Round | None = None
        while not self.stop.is_set() and len(self.answered) < ROUNDS:
            item = self.transport.get(timeout=0.2)
            if item is not None and item[1]:
                message = decode(item[1]).message
                if isinstance(message, Round):
                    pending, self.session = message, message.session
                elif isinstance(message, Chunk):
                    part = parts.setdefault(message.sha256, Reassembler(max_size=10**8))
                    if (payload := part.add(message)) is not None:
                        models[message.sha256] = payload
            if pending is not None and pending.model.sha256 in models:
                self.answer(pending.round, decode_model(models[pending.model.sha256]))
                pending = None
        offline = self._encode(Offline(who="backdoor"))
        self.transport.publish(self.topics.client_status("backdoor"), offline, retain=True)
        self.transport.flush(5)
        self.transport.close()


def test_a_last_round_backdoor_is_not_deployed_and_the_run_names_the_erased_classes(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: the backdoor joins before the coordinator starts, beside two honest devices
    backdoor = Backdoor(mosquitto)
    backdoor.start()
    command = demo(
        mosquitto, out=tmp_path, run=RUN, clients=2, rounds=ROUNDS, begin_round=1, end_round=4
    )

    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    backdoor.stop.set()
    backdoor.join(10)

    # Assert: the erased classes are gone from the final model while its accuracy stays far
    # above chance; the gate stops the deployment and names them; nothing is deployed
    assert backdoor.answered == list(range(1, ROUNDS + 1))
    rounds = [
        json.loads(line) for line in (tmp_path / RUN / "metrics.jsonl").read_text().splitlines()
    ]
    last = rounds[-1]
    assert [last["recall"][c] for c in ERASED] == [0.0, 0.0]
    assert last["accuracy"] > 0.5
    summary = json.loads((tmp_path / RUN / "summary.json").read_text())
    assert summary["deployed"] == []
    assert summary["unhealthy"].startswith("the final model misses classes its best round")
    assert all(f" {c} (" in summary["unhealthy"] for c in ERASED)
    assert done.returncode == 1, done.stderr[-3000:]
