"""fedprune-aggregator's share of a round, driven message by message over an in-memory broker."""

from __future__ import annotations

import numpy as np
import pytest
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.coordinator.aggregator import ShareAggregator, main
from fedprune.coordinator.config import RunConfig
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.codec import Model, Update, encode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import COORDINATOR, Hello, Manifest, Notice, Round, Tally
from fedprune.protocol.topics import Topics

RUN = "share"
TOPICS = Topics(RUN)


def _aggregator(broker: MemoryBroker, devices: list[str]) -> tuple[ShareAggregator, Model]:
    """An aggregator collecting round 1 of a two-tensor model that selects every device."""
    aggregator = ShareAggregator(
        MemoryTransport(broker), RunConfig(run=RUN), name="agg-1", group="fedprune"
    )
    model = Model(
        weights=[np.zeros((4, 3), np.float32), np.zeros(3, np.float32)], masks=[None, None]
    )
    payload = encode_model(model)
    manifest = Manifest(topic=TOPICS.model(1), size=len(payload), chunks=1, sha256=sha256(payload))
    for device in devices:
        hello = Hello(client_id=device, profile="generic-x86-64", num_samples=10, backend="keras")
        aggregator.handle(TOPICS.client_status(device), encode(hello, run=RUN, sender=device))
    announced = Round(
        round=1, model_version=1, deadline=0.0, model=manifest, local_epochs=1, selected=devices
    )
    aggregator._begin(announced, payload)
    return aggregator, model


def _send(aggregator: ShareAggregator, device: str, model: Model, value: float) -> None:
    deltas = [np.full(w.shape, value, np.float32) for w in model.weights]
    payload = encode_update(Update(round=1, num_samples=10, deltas=deltas), model.masks)
    for chunk in split(payload, max_chunk=1 << 20):
        topic = f"{TOPICS.update(device, 1)}/{chunk.index}"
        aggregator.handle(topic, encode(chunk, run=RUN, sender=device))


def test_an_update_another_aggregator_took_is_answered_not_summed_again() -> None:
    # Prepare: agg-2 has told everyone it took "a"'s update; the broker then hands "a"'s resend
    # to agg-1, with "b"'s update
    broker = MemoryBroker()
    inbox = MemoryTransport(broker)
    inbox.subscribe(TOPICS.inbox("a"))
    aggregator, model = _aggregator(broker, ["a", "b"])
    tally = Tally(round=1, reported=["a"], responded=["a"], rejected={}, bytes_up=100)

    # Execute
    aggregator.handle(TOPICS.tally("agg-2"), encode(tally, run=RUN, sender=COORDINATOR))
    _send(aggregator, "a", model, 0.5)
    _send(aggregator, "b", model, 0.25)

    # Assert: only "b" is in this aggregator's sum; "a" has its answer again
    state = aggregator.intake.current
    assert state is not None
    assert state.aggregator.count == 1 and state.reported == {"b"}
    notices = [decode(item[1]).message for item in iter(lambda: inbox.get(0), None)]
    assert notices == [Notice(round=1, accepted=True, reason="")]
    assert state.bytes_up > 0


def test_an_unsigned_aggregator_needs_insecure_for_a_broker_elsewhere(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["--broker", "mqtt://192.0.2.7:1883", "--run", "garden"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("fedprune-aggregator: error: the run is unsigned")
    assert "--insecure" in err[0]
