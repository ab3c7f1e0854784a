"""The rules a run trains by, in the round loop (rounds.py, fleet.py, spec.py): the server
optimizer's step on the round's aggregate, the devices' learning rate each round, FedProx's mu in
the Spec, and devices too old to follow them left out and told why."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from round_harness import (
    ROUND,
    TOPICS,
    FakeClient,
    Harness,
    assert_weights,
    random_delta,
    update_payload,
)

from fedprune.protocol.codec import Codec, Model, Update, decode_update, encode_update
from fedprune.protocol.envelope import decode
from fedprune.protocol.messages import Round, Spec


def _answer_with(h: Harness, seen: list[Round]) -> dict[str, list[np.ndarray]]:
    """Both clients answer each round with a random delta; the deltas sent, by client."""
    sent: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        seen.append(announcement)
        for seed, name in enumerate(("a", "b")):
            sent[name] = random_delta(model, seed, scale=0.05)
            h.clients[name].send(announcement.round, update_payload(model, sent[name]))

    h.on_round(answer)
    return sent


def test_the_round_writes_the_server_optimizers_step_and_keeps_its_momentum(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: FedAvgM, lr 0.5; two devices of 100 samples each
    h = harness(server_optimizer="momentum", server_lr=0.5, server_momentum=0.9)
    sent = _answer_with(h, [])

    # Execute
    before, result, after = h.run_round()

    # Assert: x + 0.5 * mean (the momentum starts at the aggregate), pruned weights still zero
    mean = [(a.astype(np.float64) + b) / 2 for a, b in zip(sent["a"], sent["b"], strict=True)]
    assert result.reported == 2
    assert_weights(after, [w + 0.5 * d for w, d in zip(before.weights, mean, strict=True)])
    np.testing.assert_allclose(h.coordinator.server.state()["m000"], mean[0], rtol=1e-6)


def test_each_round_announces_the_devices_learning_rate_of_the_schedule(
    harness: Callable[..., Harness],
) -> None:
    h = harness(learning_rate=0.1, lr_schedule="exponential", lr_decay=0.5)
    seen: list[Round] = []
    _answer_with(h, seen)

    h.run_round()

    (announcement,) = seen
    assert announcement.round == ROUND
    assert announcement.learning_rate == 0.05  # 0.1 * 0.5 ** (2 - 1)


def test_the_spec_carries_fedprox_mu_and_an_older_device_is_left_out_and_told_why(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: a FedProx run; "old" follows no training rule (a device before protocol 1.13)
    h = harness(("a", "b"), prox_mu=0.01)
    old = FakeClient(h.broker, "old", training=())
    h.coordinator.pump(0.1)
    _answer_with(h, [])

    # Execute
    _, result, _ = h.run_round()

    # Assert
    spec = decode(h.broker.retained[TOPICS.spec]).message
    assert isinstance(spec, Spec) and spec.prox_mu == 0.01
    assert (result.selected, result.reported) == (2, 2)
    (notice,) = old.notices()
    assert not notice.accepted
    assert notice.reason == (
        "this run trains with prox, which this device (protocol older than 1.13) does not"
        " follow: it is not selected"
    )


def test_a_plain_run_selects_a_device_that_follows_no_training_rule(
    harness: Callable[..., Harness],
) -> None:
    h = harness(("a", "b"))
    old = FakeClient(h.broker, "old", training=())
    h.coordinator.pump(0.1)
    _answer_with(h, [])

    _, result, _ = h.run_round()

    assert result.selected == 3
    assert old.notices() == []


@pytest.mark.parametrize("codec", ["int8", "int8+top0.1"])
def test_the_server_optimizer_steps_on_what_a_lossy_codec_delivered(
    harness: Callable[..., Harness], codec: str
) -> None:
    # Prepare: server Adam in a run forcing a lossy codec; both devices send in it
    h = harness(server_optimizer="adam", server_lr=0.05, codec=codec)
    for name in ("a", "b"):
        h.clients[name] = FakeClient(h.broker, name, codecs=("f32", "f16", "int8", "topk"))
    h.coordinator.pump(0.1)
    h.coordinator.pump(0.1)
    sent: list[Update] = []

    def answer(announcement: Round, model: Model) -> None:
        for seed, name in enumerate(("a", "b")):
            update = Update(round=ROUND, num_samples=100, deltas=random_delta(model, seed))
            payload = encode_update(update, model.masks, Codec.parse(codec))
            sent.append(decode_update(payload, model))  # what the coordinator receives
            h.clients[name].send(ROUND, payload)

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the first Adam step of the mean of the decoded updates; pruned weights still zero
    assert (result.reported, result.codecs) == (2, {codec: 2})
    mean = [
        (x.astype(np.float64) + y) / 2 for x, y in zip(sent[0].deltas, sent[1].deltas, strict=True)
    ]
    tau = 1e-3
    want = [
        w + 0.05 * (0.1 * d) / (np.sqrt(0.99 * tau**2 + 0.01 * d**2) + tau)
        for w, d in zip(before.weights, mean, strict=True)
    ]
    assert_weights(after, want)
