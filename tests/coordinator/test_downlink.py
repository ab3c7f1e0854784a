"""What the coordinator publishes to its devices (downlink.py, spec.py) through the round loop: the
training artifact, models in the chunks devices take, and models sent as changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from global_model import MaskedModel
from memory_broker import MemoryTransport
from round_harness import (
    ROUND,
    RUN,
    SCHEDULE,
    TOPICS,
    FakeClient,
    Harness,
    ScriptedBroker,
    random_delta,
    update_payload,
)

from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.parts import Parts
from fedprune.coordinator.rounds import Coordinator
from fedprune.protocol.chunks import Reassembler, sha256
from fedprune.protocol.codec import Codec, Model, Update, apply_delta, encode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.errors import ExportError
from fedprune.protocol.messages import Hello, Round, Spec


def _with_artifact(broker: ScriptedBroker, build: Callable[[], bytes]) -> Coordinator:
    """A coordinator of a one-round mlp run whose training artifact ``build`` makes."""
    config = RunConfig(run=RUN, model="mlp", rounds=1, schedule=SCHEDULE)
    model = MaskedModel()
    parts = Parts.build(MemoryTransport(broker), config, model, build_artifact=build)
    return Coordinator(parts, model, evaluate=lambda: None)


@pytest.mark.parametrize("fails", [False, True])
def test_the_training_artifact_is_built_at_start_and_a_failure_is_in_the_spec(
    fails: bool,
) -> None:
    # Prepare: a builder that works or refuses the model, as converters.trainable does
    def build() -> bytes:
        if fails:
            raise ExportError("layer 'bn' (BatchNormalization) is not supported")
        return b"tflite artifact bytes"

    broker = ScriptedBroker()
    coordinator = _with_artifact(broker, build)

    # Execute: nothing has joined yet
    coordinator.start()

    # Assert: the retained Spec says at once whether litert devices can train
    spec = decode(broker.retained[TOPICS.spec]).message
    assert isinstance(spec, Spec)
    litert = Hello(client_id="pi", profile="raspberry-pi-4", num_samples=5, backend="litert")
    if fails:
        assert spec.artifact is None
        assert spec.artifact_error == "layer 'bn' (BatchNormalization) is not supported"
        assert not coordinator.fleet.can_train(litert)
    else:
        assert spec.artifact_error is None and spec.artifact is not None
        assert spec.artifact.sha256 == sha256(b"tflite artifact bytes")
        assert f"{TOPICS.artifact}/0" in broker.retained
        assert coordinator.fleet.can_train(litert)


def test_a_rebuilt_models_artifact_goes_in_the_chunks_the_devices_online_take() -> None:
    # Prepare: a litert device that takes 16 KiB messages joined, so the artifact went again in
    # chunks it takes
    broker = ScriptedBroker()
    coordinator = _with_artifact(broker, lambda: bytes(100_000))
    coordinator.start()
    device = MemoryTransport(broker)
    hello = Hello(
        client_id="pi",
        profile="raspberry-pi-zero-2w",
        num_samples=5,
        backend="litert",
        max_payload=16 * 1024,
    )
    device.publish(TOPICS.client_status("pi"), encode(hello, run=RUN, sender="pi"), retain=True)
    while coordinator.pump(0.0):
        pass

    # Execute: the model is rebuilt (unit pruning) and its artifact published again
    coordinator._rebuilt(2)

    # Assert: the new Spec names chunks the device takes
    spec = decode(broker.retained[TOPICS.spec]).message
    assert isinstance(spec, Spec) and spec.artifact is not None
    chunks = [broker.retained[f"{TOPICS.artifact}/{i}"] for i in range(spec.artifact.chunks)]
    assert spec.artifact.chunks > 100_000 // (16 * 1024)
    assert max(len(c) for c in chunks) <= 16 * 1024


def test_a_device_with_a_small_message_limit_gets_the_model_in_chunks_it_takes(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: "zero" announces a 16 KiB limit (a Pi Zero's profile would say 128 KiB)
    h = harness(("a", "b"), max_payload=64 * 1024)
    zero = FakeClient(h.broker, "zero")
    small = Hello(
        client_id="zero",
        profile="raspberry-pi-zero-2w",
        num_samples=100,
        backend="scripted",
        max_payload=16 * 1024,
    )
    zero.transport.publish(
        TOPICS.client_status("zero"), encode(small, run=RUN, sender="zero"), retain=True
    )
    h.coordinator.pump(0.1)
    h.coordinator.pump(0.1)

    # Execute: a round that selects everyone
    h.on_round(lambda announcement, model: None)
    h.coordinator.config = dataclasses.replace(h.coordinator.config, round_timeout=0.2)
    h.run_round()

    # Assert: every model chunk fits the smallest limit; nothing else was cut smaller
    sizes = [len(p) for t, p in h.broker.log if t.startswith(f"{TOPICS.model(ROUND)}/") and p]
    assert len(sizes) > 1
    assert max(sizes) <= 16 * 1024


def test_the_next_rounds_model_goes_as_a_change_to_the_devices_that_hold_the_last_one(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: both devices answer round 2; in round 3 the model is also sent as a change
    h = harness(("a", "b"))
    seen: list[tuple[Round, Model]] = []

    def answer(announcement: Round, model: Model) -> None:
        seen.append((announcement, model))
        for i, client in enumerate(h.clients.values()):
            client.send(
                announcement.round,
                update_payload(model, random_delta(model, i), round_=announcement.round),
            )

    h.on_round(answer)
    h.run_round()
    before = h.coordinator.bytes_down

    # Execute
    h.coordinator.run_round(ROUND + 1)

    # Assert: the change rebuilds the announced model exactly from the one the devices hold,
    # is several times smaller, and is what the devices were counted as receiving
    (first, held), (second, whole) = seen
    assert first.delta is None and second.delta is not None
    assert second.base == first.model.sha256
    chunks = [
        h.broker.retained[f"{TOPICS.delta(ROUND + 1)}/{i}"] for i in range(second.delta.chunks)
    ]
    parts = Reassembler(max_size=second.delta.size)
    delta = [parts.add(decode(c).message) for c in chunks][-1]  # type: ignore[arg-type]
    assert delta is not None
    rebuilt = apply_delta(held, delta)
    assert sha256(encode_model(rebuilt)) == second.model.sha256
    for got, want in zip(rebuilt.weights, whole.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert second.delta.size * 3 < second.model.size
    delivered = sum(len(c) for c in chunks) * 2
    assert h.coordinator.bytes_down - before < delivered + second.model.size  # none whole


def test_downlink_codec_sends_the_change_in_the_runs_codec(harness: Callable[..., Harness]) -> None:
    # Prepare: a run whose updates and model changes are int8 top-10% with zstd
    h = harness(("a", "b"), downlink="codec", codec="int8+top0.1+zstd")
    for name in ("a", "b"):
        h.clients[name] = FakeClient(h.broker, name, codecs=("f32", "int8", "topk", "zstd"))
    h.coordinator.pump(0.1)
    h.coordinator.pump(0.1)
    seen: list[tuple[Round, Model]] = []

    def answer(announcement: Round, model: Model) -> None:
        seen.append((announcement, model))
        for i, client in enumerate(h.clients.values()):
            update = Update(
                round=announcement.round, num_samples=100, deltas=random_delta(model, i)
            )
            payload = encode_update(update, model.masks, Codec.parse("int8+top0.1+zstd"))
            client.send(announcement.round, payload)

    h.on_round(answer)
    h.run_round()

    # Execute
    h.coordinator.run_round(ROUND + 1)

    # Assert: the change is compressed, rebuilds the announced model, and is far smaller
    (_, held), (second, _) = seen
    assert second.delta is not None
    chunks = [
        h.broker.retained[f"{TOPICS.delta(ROUND + 1)}/{i}"] for i in range(second.delta.chunks)
    ]
    parts = Reassembler(max_size=second.delta.size)
    delta = [parts.add(decode(c).message) for c in chunks][-1]  # type: ignore[arg-type]
    assert delta is not None and delta[:4] == b"\x28\xb5\x2f\xfd"
    assert sha256(encode_model(apply_delta(held, delta))) == second.model.sha256
    assert second.delta.size * 10 < second.model.size


def test_downlink_full_sends_the_whole_model_every_round(harness: Callable[..., Harness]) -> None:
    h = harness(("a", "b"), downlink="full")
    seen: list[Round] = []

    def answer(announcement: Round, model: Model) -> None:
        seen.append(announcement)
        for i, client in enumerate(h.clients.values()):
            client.send(
                announcement.round,
                update_payload(model, random_delta(model, i), round_=announcement.round),
            )

    h.on_round(answer)
    h.run_round()
    before = h.coordinator.bytes_down
    h.coordinator.run_round(ROUND + 1)

    # Assert: no change sent, and both devices counted as fetching the whole model
    assert [a.delta for a in seen] == [None, None]
    chunks = [
        h.broker.retained[f"{TOPICS.model(ROUND + 1)}/{i}"] for i in range(seen[1].model.chunks)
    ]
    assert h.coordinator.bytes_down - before > 2 * sum(len(c) for c in chunks)
