"""A SCAFFOLD round's download (protocol 1.13): the device fetches the round's control variate
beside its model, from its own topics, trains once both are here with the correction they give,
and never with a control variate that fails its checks.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest
from client_harness import (
    CLIENT,
    ROUND,
    TOPICS,
    VERSION,
    AddOneTrainer,
    chunk_of,
    encode_message,
    make_client,
    publish_run,
    update_chunks,
)
from memory_broker import MemoryBroker

from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.data import LocalData
from fedprune.protocol.chunks import Reassembler, split
from fedprune.protocol.codec import Model, decode_update, encode_model


@pytest.fixture
def control(model: Model) -> Model:
    """The round's c, as the coordinator sends it: zero where the model prunes."""
    rng = np.random.default_rng(3)
    weights = [
        (rng.integers(-8, 8, w.shape) * 0.25).astype(np.float32) * (1 if m is None else m)
        for w, m in zip(model.weights, model.masks, strict=True)
    ]
    return Model(weights=weights, masks=model.masks)


def _held_back(broker: MemoryBroker) -> dict[str, bytes]:
    """The control variate's retained chunks, taken off the broker (not published yet)."""
    prefix = TOPICS.control(VERSION) + "/"
    chunks = {t: p for t, p in broker.retained.items() if t.startswith(prefix)}
    for topic in chunks:
        del broker.retained[topic]
    return chunks


def _sent(broker: MemoryBroker, model: Model) -> list[np.ndarray] | None:
    """The control change of the update the device sent."""
    parts = Reassembler(max_size=1 << 22)
    payloads = [parts.add(chunk_of(p)) for _, p in update_chunks(broker)]
    assert payloads and payloads[-1] is not None
    return decode_update(payloads[-1], model).control


def _correction(client: EdgeClient) -> list[np.ndarray] | None:
    trainer = client.training._trainer
    assert isinstance(trainer, AddOneTrainer) and len(trainer.corrections) == 1
    return trainer.corrections[0]


def _assert_trained_with(client: EdgeClient, broker: MemoryBroker, control: Model) -> None:
    """The device trained its round once, corrected by ``control`` (c_i = 0 at first) and sent
    its new c_i (the fake's mean gradient, 0.5 where kept) as the change."""
    assert client.stats.rounds == [ROUND]
    correction = _correction(client)
    assert correction is not None
    for got, want in zip(correction, control.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    sent = _sent(broker, control)
    assert sent is not None
    for got, m in zip(sent, control.masks, strict=True):
        np.testing.assert_array_equal(got, np.float32(0.5) * (1 if m is None else m))


def test_a_round_is_trained_only_once_its_model_and_control_variate_are_both_here(
    model: Model, data: LocalData, control: Model
) -> None:
    # Prepare: the round and its model are out, its control variate's chunks not yet
    broker = MemoryBroker()
    publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60, control=control
    )
    later = _held_back(broker)
    client = make_client(broker, data)
    client.run(timeout=0.3)
    assert update_chunks(broker) == [] and client.stats.rounds == []
    assert (client.waiting_for() or "").startswith(f"round {ROUND}'s control variate (")

    # Execute: its chunks arrive
    for topic, payload in later.items():
        broker.route(topic, payload, True)
    client.run(timeout=0.3)

    # Assert
    assert len(later) > 1  # several chunks, subscribed to as <control prefix>/+
    assert f"{TOPICS.control(VERSION)}/+" in client.transport.patterns  # type: ignore[attr-defined]
    _assert_trained_with(client, broker, control)


@pytest.mark.parametrize("tampering", ["altered data", "another payload"])
def test_a_control_variate_that_fails_its_sha256_is_not_used(
    model: Model,
    data: LocalData,
    control: Model,
    tampering: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: the retained control chunks replaced by tampered ones: one chunk's data changed
    # (its payload no longer has the SHA-256 it claims), or the chunks of another c (a payload
    # that checks out, but not the one the round names)
    broker = MemoryBroker()
    publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60, control=control
    )
    genuine = _held_back(broker)
    if tampering == "altered data":
        tampered = dict(genuine)
        topic = next(iter(tampered))
        chunk = chunk_of(tampered[topic])
        flipped = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
        tampered[topic] = encode_message(dataclasses.replace(chunk, data=flipped))
    else:
        other = Model(weights=[w + np.float32(1) for w in control.weights], masks=control.masks)
        tampered = {
            f"{TOPICS.control(VERSION)}/{c.index}": encode_message(c)
            for c in split(encode_model(other), max_chunk=700)
        }
    for topic, payload in tampered.items():
        broker.route(topic, payload, True)
    client = make_client(broker, data)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedprune.client"):
        client.run(timeout=0.3)

    # Assert: not trained; then the genuine chunks arrive and it trains with them
    assert update_chunks(broker) == [] and client.stats.rounds == []
    assert (client.waiting_for() or "").startswith(f"round {ROUND}'s control variate (")
    if tampering == "altered data":
        assert any("SHA-256" in r.getMessage() for r in caplog.records)
    for topic, payload in genuine.items():
        broker.route(topic, payload, True)
    client.run(timeout=0.3)
    _assert_trained_with(client, broker, control)


def test_a_round_without_a_control_variate_subscribes_to_none(
    model: Model, data: LocalData
) -> None:
    broker = MemoryBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60)
    client = make_client(broker, data)

    client.run(timeout=0.3)

    assert client.stats.rounds == [ROUND] and _correction(client) is None
    patterns = client.transport.patterns  # type: ignore[attr-defined]
    assert not any("/control" in p for p in patterns)
