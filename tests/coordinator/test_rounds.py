"""The coordinator's round loop over an in-memory broker, against scripted clients (rounds.py):
how a round closes, what it results in, how a run ends.

The broker delivers synchronously into queues. A scripted client answers the round announcement the
moment it is published, so its update chunks wait in the coordinator's queue, in publish order,
before the coordinator starts collecting: no threads, and the round closes once its quorum is met.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from round_harness import (
    MLP_PARAMS,
    ROUND,
    RUN,
    TOPICS,
    Harness,
    assert_weights,
    random_delta,
    update_payload,
)

from fedprune.coordinator.aggregation import l2_norm
from fedprune.protocol.codec import Model
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import Failed, Hello, Offline, Phase, Round, Status


def test_harness_model_is_half_pruned_before_the_round(harness: Callable[..., Harness]) -> None:
    h = harness()

    model = h.coordinator.pruner.model()

    masks = [m for m in model.masks if m is not None]
    assert len(masks) == 3
    assert all(abs(m.mean() - 0.5) <= 1 / m.size for m in masks)


def test_result_counts_bytes_sparsity_and_dense_equivalents(
    harness: Callable[..., Harness],
) -> None:
    h = harness()

    redelivered = []

    def answer(announcement: Round, model: Model) -> None:
        first, *rest = h.clients["a"].chunks(
            update_payload(model, random_delta(model, 1)), max_chunk=6000
        )
        h.clients["a"].publish(announcement.round, [first, first, *rest])
        redelivered.append(len(first))
        h.clients["b"].send(
            announcement.round, update_payload(model, random_delta(model, 2)), max_chunk=7000
        )

    h.on_round(answer)

    _, result, _ = h.run_round()

    # a message the broker delivers twice (QoS 1) is counted once: the device sent it once
    assert result.reported == 2 and result.rejected == {}
    assert result.bytes_up == h.broker.update_bytes() - redelivered[0] > 0
    assert result.sparsity == pytest.approx(h.coordinator.pruner.sparsity())
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    assert result.dense_bytes_up == 2 * MLP_PARAMS * 4
    assert result.dense_bytes_down == 2 * MLP_PARAMS * 4
    assert 0 < result.bytes_up < result.dense_bytes_up
    assert 0 < result.bytes_down < result.dense_bytes_down
    assert result.round == ROUND and result.seconds > 0
    assert result.accuracy is None and result.client_accuracy is None


def test_round_closes_at_the_timeout_when_a_client_is_missing(
    harness: Callable[..., Harness],
) -> None:
    timeout = 1.0
    h = harness(round_timeout=timeout)
    sent: list[np.ndarray] = []

    def answer(announcement: Round, model: Model) -> None:
        sent.extend(random_delta(model, 1))
        h.clients["a"].send(announcement.round, update_payload(model, sent))

    h.on_round(answer)
    started = time.monotonic()

    before, result, after = h.run_round()

    elapsed = time.monotonic() - started
    assert timeout <= elapsed < timeout + 0.5
    assert (result.selected, result.reported) == (2, 1)
    assert_weights(after, [w + d for w, d in zip(before.weights, sent, strict=True)])


def test_run_serves_every_round_then_clears_the_retained_round(
    harness: Callable[..., Harness],
) -> None:
    h = harness()

    def answer(announcement: Round, model: Model) -> None:
        for seed, client in enumerate(h.clients.values()):
            client.send(
                announcement.round,
                update_payload(model, random_delta(model, seed), round_=announcement.round),
            )

    h.on_round(answer)

    results = h.coordinator.run()

    assert [(r.round, r.reported, r.rejected) for r in results] == [(1, 2, {}), (2, 2, {})]
    assert TOPICS.round not in h.broker.retained
    assert not any(t.startswith(f"{TOPICS.root}/model/") for t in h.broker.retained)
    metrics = decode(h.broker.retained[TOPICS.metrics]).message
    assert metrics.values["round"] == 2  # type: ignore[attr-defined]


def test_abort_tells_the_clients_and_clears_the_round(harness: Callable[..., Harness]) -> None:
    h = harness()
    h.run_round()

    h.coordinator.abort()

    status = decode(h.broker.retained[TOPICS.status]).message
    assert isinstance(status, Status) and status.phase is Phase.ABORTED
    assert TOPICS.round not in h.broker.retained
    assert not any(topic.startswith(f"{TOPICS.root}/model/") for topic in h.broker.retained)


def test_no_client_able_to_train_stops_the_run(harness: Callable[..., Harness]) -> None:
    # The artifact litert clients need could not be built: they are not selected, and with
    # nobody left the round refuses to start instead of waiting out its deadline.
    h = harness(("a",))
    h.coordinator.fleet.devices["a"] = Hello(
        client_id="a", profile="p", num_samples=5, backend="litert"
    )
    h.coordinator.fleet.artifact_error = "layer 'lstm' (LSTM) is not supported"

    with pytest.raises(ConfigError, match="none of the 1 online clients can train"):
        h.coordinator.run_round(ROUND)


def test_devices_that_joined_unable_to_train_and_left_are_named_with_why(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: the artifact could not be built; litert device "a" joins, is told, and stops
    h = harness(("a",), join_timeout=0.5)
    h.coordinator.fleet.devices.clear()
    h.coordinator.fleet.artifact_error = "layer 'lstm' (LSTM) is not supported"
    litert = Hello(client_id="a", profile="p", num_samples=5, backend="litert")
    h.coordinator.fleet.hello(litert)
    h.coordinator.fleet.offline("a")

    # Execute / Assert: not "0 of 1 online" alone, but who came and why they could not train
    with pytest.raises(ConfigError) as caught:
        h.coordinator.wait_for_clients(1)
    assert str(caught.value) == (
        "only 0 of 1 clients online after waiting 0 s; 1 device(s) joined that cannot train it"
        " (a): its trainer (litert) needs a TFLite training artifact, and this model has none:"
        " layer 'lstm' (LSTM) is not supported"
    )


def test_a_fleet_that_leaves_at_a_round_boundary_ends_the_run_with_one_line(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: round 1 with a and b; then both go (their last wills, or forged ones)
    h = harness(join_timeout=0.5)

    def answer(announcement: Round, model: Model) -> None:
        for name, seed in (("a", 1), ("b", 2)):
            h.clients[name].send(
                announcement.round, update_payload(model, random_delta(model, seed))
            )

    h.on_round(answer)
    h.run_round()
    for name in ("a", "b"):
        will = encode(Offline(who=name), run=RUN, sender=name)
        h.clients[name].transport.publish(TOPICS.client_status(name), will, retain=True)

    # Execute / Assert: the next round waits for someone to come back, then ends the run with
    # one line (fedprune-coordinator prints it and exits 1), not an exception of ours
    started = time.monotonic()
    with pytest.raises(ConfigError, match="only 0 of 1 clients online after waiting"):
        h.coordinator.run_round(ROUND + 1)
    assert time.monotonic() - started < 5


def test_only_devices_that_install_deployments_are_waited_for(
    harness: Callable[..., Harness],
) -> None:
    h = harness()  # the fake clients' hellos do not say they install deployments
    started = time.monotonic()

    missing = h.coordinator.deployments.await_installs({"generic-x86-64": "ab" * 32}, timeout=5.0)

    assert missing == [] and time.monotonic() - started < 1.0


def test_a_selected_device_whose_connection_drops_is_not_waited_for(
    harness: Callable[..., Harness],
) -> None:
    h = harness(round_timeout=30.0)

    def answer(announcement: Round, model: Model) -> None:
        h.clients["a"].send(announcement.round, update_payload(model, random_delta(model, 1)))
        will = encode(Offline(who="b"), run=RUN, sender="b")  # b's last will
        h.clients["b"].transport.publish(TOPICS.client_status("b"), will, retain=True)

    h.on_round(answer)
    started = time.monotonic()

    _, result, _ = h.run_round()

    assert time.monotonic() - started < 5.0  # not the 30 s deadline
    assert (result.selected, result.reported) == (2, 1)
    assert [r.late for r in h.coordinator.telemetry.ledger.rows()] == [0, 1]


def test_a_device_whose_training_failed_is_not_waited_for_and_is_counted(
    harness: Callable[..., Harness],
) -> None:
    h = harness(round_timeout=30.0)

    def answer(announcement: Round, model: Model) -> None:
        h.clients["a"].send(announcement.round, update_payload(model, random_delta(model, 1)))
        failed = encode(
            Failed(round=announcement.round, reason="MemoryError: "),
            run=RUN,
            sender="b",
            session=announcement.session,
        )
        for _ in range(2):  # QoS 1 may deliver it twice: counted once
            h.clients["b"].transport.publish(
                f"{TOPICS.update('b', announcement.round)}/failed", failed
            )

    h.on_round(answer)
    started = time.monotonic()

    _, result, _ = h.run_round()

    assert time.monotonic() - started < 5.0
    assert (result.reported, result.rejected) == (1, {"failed": 1})
    row = next(r for r in h.coordinator.telemetry.ledger.rows() if r.id == "b")
    assert row.last_reason == "failed: its training failed: MemoryError: "


def test_updates_are_clipped_to_a_bound_the_previous_round_set_and_announced(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: a and b send small updates; c (a stolen bundle) one of norm 9,900 (just inside
    # the fixed limit of 1e4), every round
    h = harness(("a", "b", "c"), rounds=3)
    announced: list[float] = []
    sent: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        announced.append(announcement.norm_bound)
        for name, seed in (("a", 1), ("b", 2), ("c", 3)):
            sent[name] = random_delta(model, seed + 10 * announcement.round)
            if name == "c":
                sent[name] = [d * (9_900 / l2_norm(sent[name])) for d in sent[name]]
            h.clients[name].send(
                announcement.round, update_payload(model, sent[name], round_=announcement.round)
            )

    h.on_round(answer)

    # Execute: round 2, then round 3
    before, first, _ = h.run_round()
    second = h.coordinator.run_round(ROUND + 1)

    # Assert: round 2 (no round before it) clips to the model's own norm; round 3 to 3x the
    # median norm of round 2's updates (an honest one): c is clipped both times, and said so
    own = l2_norm(before.weights)
    assert first.norm_bound == pytest.approx(own, rel=1e-5)
    assert first.norm_median is not None and first.norm_median < 1.0
    assert second.norm_bound == pytest.approx(3 * first.norm_median)
    assert (first.clipped, second.clipped) == (1, 1)
    assert announced == pytest.approx([first.norm_bound, second.norm_bound])
    after = h.coordinator.pruner.model()
    moved = l2_norm([a - b for a, b in zip(after.weights, before.weights, strict=True)])
    assert moved < own  # not 9,900 / 3
