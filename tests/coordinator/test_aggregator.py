"""fedprune-aggregator's share of a round, driven message by message over an in-memory broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.coordinator.aggregator import ShareAggregator, main
from fedprune.coordinator.config import RunConfig
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.codec import Model, Update, encode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import COORDINATOR, Hello, Manifest, Notice, Round, Tally
from fedprune.protocol.signing import load_signing_key, new_keypair
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


def test_an_aggregator_drops_a_device_revoked_while_it_runs(tmp_path: Path) -> None:
    # Prepare: a signed run; a and b enrolled; the aggregator collects round 1
    keys = tmp_path / "device-keys"
    new_keypair(tmp_path / "coordinator.key", tmp_path / "coordinator.pub")
    for device in ("a", "b"):
        new_keypair(tmp_path / f"{device}.key", keys / f"{device}.pub")
    signers = {d: load_signing_key(tmp_path / f"{d}.key") for d in ("a", "b")}
    config = RunConfig(
        run=RUN, signing_key=str(tmp_path / "coordinator.key"), device_keys=str(keys)
    )
    aggregator = ShareAggregator(
        MemoryTransport(MemoryBroker()), config, name="agg-1", group="fedprune"
    )
    model = Model(weights=[np.zeros(3, np.float32)], masks=[None])
    payload = encode_model(model)
    for device, signer in signers.items():
        hello = Hello(client_id=device, profile="generic-x86-64", num_samples=10, backend="x")
        signed = encode(hello, run=RUN, sender=device, signer=signer)
        aggregator.handle(TOPICS.client_status(device), signed)
    manifest = Manifest(topic=TOPICS.model(1), size=len(payload), chunks=1, sha256=sha256(payload))
    announced = Round(
        round=1, model_version=1, deadline=0.0, model=manifest, local_epochs=1, selected=["a", "b"]
    )
    aggregator._begin(announced, payload)

    # Execute: b's key is deleted (fedprune-provision revoke); then both send their update
    (keys / "b.pub").unlink()
    assert aggregator.keys is not None
    aggregator.keys.request()
    aggregator.intake.reload_keys(aggregator.keys)
    for device, signer in signers.items():
        update = Update(round=1, num_samples=10, deltas=[np.ones(3, np.float32)])
        for chunk in split(encode_update(update, model.masks), max_chunk=1 << 20):
            signed = encode(chunk, run=RUN, sender=device, signer=signer)
            aggregator.handle(f"{TOPICS.update(device, 1)}/{chunk.index}", signed)

    # Assert: only a's update is summed; b's is dropped as unsigned by a trusted key
    state = aggregator.intake.current
    assert state is not None
    assert state.reported == {"a"} and state.rejected == {"signature": 1}
    assert "b" not in aggregator.fleet
