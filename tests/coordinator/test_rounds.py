"""The coordinator's round loop over an in-memory broker, against scripted clients (rounds.py).

The broker delivers synchronously into queues. A scripted client answers the round announcement the
moment it is published, so its update chunks wait in the coordinator's queue, in publish order,
before the coordinator starts collecting: no threads, and the round closes once its quorum is met.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
from global_model import MaskedModel
from memory_broker import MemoryTransport
from round_harness import (
    MLP_PARAMS,
    ROUND,
    RUN,
    SCHEDULE,
    TOPICS,
    FakeClient,
    Harness,
    ScriptedBroker,
    assert_weights,
    make_harness,
    random_delta,
    update_payload,
)

from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.observer import Observer
from fedprune.coordinator.rounds import Coordinator
from fedprune.coordinator.validation import Limits
from fedprune.protocol.chunks import Reassembler, sha256, split
from fedprune.protocol.codec import (
    Codec,
    Model,
    Update,
    apply_delta,
    encode_model,
    encode_update,
)
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.errors import ConfigError, ExportError
from fedprune.protocol.messages import (
    Failed,
    Hello,
    Manifest,
    Offline,
    Phase,
    Round,
    Snapshot,
    Spec,
    Status,
    Unanswered,
)
from fedprune.protocol.signing import SigningKey, Trust


@pytest.fixture
def harness() -> Callable[..., Harness]:
    return make_harness()


def test_harness_model_is_half_pruned_before_the_round(harness: Callable[..., Harness]) -> None:
    h = harness()

    model = h.coordinator.pruner.model()

    masks = [m for m in model.masks if m is not None]
    assert len(masks) == 3
    assert all(abs(m.mean() - 0.5) <= 1 / m.size for m in masks)


def test_only_the_good_update_counts_and_rejections_are_counted_by_reason(
    harness: Callable[..., Harness],
) -> None:
    h = harness(("bad", "late", "good"), quorum=0.3)  # one report closes the round
    good: list[np.ndarray] = []

    def answer(announcement: Round, model: Model) -> None:
        nan = random_delta(model, 1)
        nan[0].flat[np.flatnonzero(model.masks[0])[0]] = np.nan
        h.clients["bad"].send(announcement.round, update_payload(model, nan))
        other = announcement.round + 1
        h.clients["late"].send(other, update_payload(model, random_delta(model, 2), round_=other))
        good.extend(random_delta(model, 3))
        h.clients["good"].send(announcement.round, update_payload(model, good))

    h.on_round(answer)

    before, result, after = h.run_round()

    assert result.rejected == {"nonfinite": 1, "round": 1}
    assert (result.selected, result.reported) == (3, 1)
    assert_weights(after, [w + d for w, d in zip(before.weights, good, strict=True)])
    for old, new in zip(before.masks, after.masks, strict=True):
        assert (old is None and new is None) or np.array_equal(old, new)
    assert [n.accepted for n in h.clients["good"].notices()] == [True]
    (notice,) = h.clients["bad"].notices()
    assert not notice.accepted and notice.reason.startswith("nonfinite")
    (notice,) = h.clients["late"].notices()
    assert not notice.accepted and notice.reason.startswith("round")


def test_update_in_protocol_version_2_is_rejected_once_as_version(
    harness: Callable[..., Harness],
) -> None:
    h = harness(quorum=0.5)

    def answer(announcement: Round, model: Model) -> None:
        messages = []
        for message in h.clients["a"].chunks(
            update_payload(model, random_delta(model, 1)), max_chunk=5000
        ):
            envelope = msgpack.unpackb(message)
            envelope["v"] = "2.0"
            messages.append(msgpack.packb(envelope))
        h.clients["a"].publish(announcement.round, messages)
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"version": 1}
    assert result.reported == 1


def test_oversize_update_is_rejected_once_however_many_chunks(
    harness: Callable[..., Harness],
) -> None:
    # A client that ignores the mask sends every value: twice the size of a sparse update.
    model = MaskedModel().model()
    sparse = len(update_payload(model, random_delta(model, 0)))
    h = harness(quorum=0.5, limits=Limits(max_update_bytes=sparse + 1024))

    def answer(announcement: Round, model: Model) -> None:
        dense = update_payload(model, random_delta(model, 1), masks=[None] * len(model.weights))
        assert len(dense) > sparse + 1024
        h.clients["a"].send(announcement.round, dense, max_chunk=8000)
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"oversize": 1}
    assert result.reported == 1


def test_update_for_another_round_is_rejected_once_however_many_chunks(
    harness: Callable[..., Harness],
) -> None:
    h = harness(quorum=0.5)

    def answer(announcement: Round, model: Model) -> None:
        stale = announcement.round - 1
        h.clients["a"].send(
            stale, update_payload(model, random_delta(model, 1), round_=stale), max_chunk=5000
        )
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"round": 1}
    assert result.reported == 1


def test_unselected_client_is_rejected(harness: Callable[..., Harness]) -> None:
    h = harness(clients_per_round=1)

    def answer(announcement: Round, model: Model) -> None:
        (chosen,) = [c for c in h.clients if announcement.selects(c)]
        other = next(c for c in h.clients if c != chosen)
        h.clients[other].send(announcement.round, update_payload(model, random_delta(model, 1)))
        h.clients[chosen].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"unselected": 1}
    assert (result.selected, result.reported) == (1, 1)


def test_redelivered_chunks_are_ignored_and_not_counted(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    deltas: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        deltas["a"], deltas["b"] = random_delta(model, 1), random_delta(model, 2)
        first, second = h.clients["a"].chunks(
            update_payload(model, deltas["a"], num_samples=30), max_chunk=12_000
        )
        # QoS 1: a chunk redelivered while assembling, and again after the update was accepted.
        h.clients["a"].publish(announcement.round, [first, first, second, second, first])
        h.clients["b"].send(announcement.round, update_payload(model, deltas["b"], num_samples=10))

    h.on_round(answer)

    before, result, after = h.run_round()

    assert result.rejected == {}
    assert result.reported == 2
    want = [
        w + (30 * a + 10 * b) / 40
        for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)
    assert [n.accepted for n in h.clients["a"].notices()] == [True]


def test_second_different_update_from_a_client_is_rejected_as_duplicate(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    deltas: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        deltas["a"], deltas["b"] = random_delta(model, 1), random_delta(model, 2)
        h.clients["a"].send(announcement.round, update_payload(model, deltas["a"]))
        h.clients["a"].send(
            announcement.round, update_payload(model, random_delta(model, 9, scale=1.0))
        )
        h.clients["b"].send(announcement.round, update_payload(model, deltas["b"]))

    h.on_round(answer)

    before, result, after = h.run_round()

    assert result.rejected == {"duplicate": 1}
    assert result.reported == 2
    want = [
        w + (a + b) / 2 for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)


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


def _with_artifact(broker: ScriptedBroker, build: Callable[[], bytes]) -> Coordinator:
    """A coordinator of a one-round mlp run whose training artifact ``build`` makes."""
    return Coordinator(
        MemoryTransport(broker),
        RunConfig(run=RUN, model="mlp", rounds=1, schedule=SCHEDULE),
        MaskedModel(),
        evaluate=lambda: None,
        build_artifact=build,
    )


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


def test_a_forged_payload_on_a_device_topic_does_not_cost_the_device_its_update(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: someone else publishes, as "a" and on a's topic, a garbage payload and the first
    # chunk of a made-up one before a's genuine update arrives (an open broker, no ACL)
    h = harness()
    deltas: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        forged = FakeClient.chunks(h.clients["a"], b"\xc1 garbage that is not an update")
        squatted = FakeClient.chunks(h.clients["a"], b"x" * 50_000, max_chunk=10_000)[:1]
        h.clients["a"].publish(announcement.round, forged + squatted)
        deltas["a"], deltas["b"] = random_delta(model, 1), random_delta(model, 2)
        h.clients["a"].send(
            announcement.round, update_payload(model, deltas["a"]), max_chunk=12_000
        )
        h.clients["b"].send(announcement.round, update_payload(model, deltas["b"]))

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the garbage is rejected once; a's own update counts
    assert result.rejected == {"decode": 1}
    assert result.reported == 2
    want = [
        w + (a + b) / 2 for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)


def test_a_device_cannot_claim_more_samples_than_its_hello_declared(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: both said hello with 100 samples; "a" then claims 10,000,000 to dominate FedAvg
    h = harness()

    def answer(announcement: Round, model: Model) -> None:
        h.clients["a"].send(
            announcement.round, update_payload(model, random_delta(model, 1), num_samples=10**7)
        )
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert
    assert result.rejected == {"samples": 1}
    assert result.reported == 1
    (notice,) = h.clients["a"].notices()
    assert notice.reason == "samples: num_samples 10000000 not in 1..100"


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (Limits(max_update_bytes=60_000, max_payloads_per_device=2), "a has 2 updates in assembly"),
        (
            Limits(max_update_bytes=60_000, max_pending_bytes=60_000, max_payloads_per_device=9),
            "updates in assembly hold 90,000 bytes > 60,000",
        ),
    ],
    ids=["per-device", "in-total"],
)
def test_payloads_in_assembly_are_bounded_per_device_and_in_total(
    harness: Callable[..., Harness], limits: Limits, reason: str
) -> None:
    # Prepare: after b's update, "a" starts three 50 kB payloads and never finishes them
    h = harness(limits=limits, round_timeout=0.5)

    def answer(announcement: Round, model: Model) -> None:
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))
        for filler in (b"x", b"y", b"z"):
            first = FakeClient.chunks(h.clients["a"], filler * 50_000, max_chunk=30_000)[:1]
            h.clients["a"].publish(announcement.round, first)

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert: the third start is refused; b's update counted
    assert result.rejected == {"oversize": 1}
    assert result.reported == 1
    (notice,) = h.clients["a"].notices()
    assert notice.reason.startswith(f"oversize: {reason}")


@pytest.mark.parametrize(
    ("announced", "exported"),
    [
        ("raspberry-pi-4", "raspberry-pi-4"),
        ("my-own-board", "generic-x86-64"),
        ("../../etc/passwd.toml", None),
        ("deploy/+/#", None),
    ],
)
def test_a_profile_in_a_hello_is_only_a_catalogue_name(
    harness: Callable[..., Harness], announced: str, exported: str | None
) -> None:
    # Prepare
    h = harness()
    hello = Hello(client_id="c", profile=announced, num_samples=5, backend="keras")

    # Execute
    h.clients["a"].transport.publish(TOPICS.client_status("c"), encode(hello, run=RUN, sender="c"))
    h.coordinator.pump(0)

    # Assert: never a path, never a topic; unknown names get the default profile's export
    assert h.coordinator.profiles.get(announced) == exported


def test_with_device_keys_an_unsigned_update_in_a_devices_name_is_dropped_and_its_own_counts(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: the coordinator knows a's and b's verify keys; someone without a key sends an
    # update on a's topic, as a, before a's own signed one
    h = harness()
    keys = {name: SigningKey.generate() for name in ("a", "b")}
    h.coordinator.intake.trust = Trust.of({name: key.verify_key for name, key in keys.items()})
    deltas: dict[str, list[np.ndarray]] = {}

    def signed(name: str, payload: bytes) -> list[bytes]:
        chunks = split(payload, max_chunk=1 << 20)
        return [encode(c, run=RUN, sender=name, signer=keys[name]) for c in chunks]

    def answer(announcement: Round, model: Model) -> None:
        forged = update_payload(model, random_delta(model, 9, scale=1.0), num_samples=100)
        h.clients["a"].send(announcement.round, forged)
        for name, seed in (("a", 1), ("b", 2)):
            deltas[name] = random_delta(model, seed)
            h.clients[name].publish(
                announcement.round, signed(name, update_payload(model, deltas[name]))
            )

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the forgery is counted, never reaches a's state; a's and b's updates count
    assert result.rejected == {"signature": 1}
    assert result.reported == 2
    want = [
        w + (a + b) / 2 for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)
    assert h.coordinator.intake.dropped == 1


def test_telemetry_on_the_broker_tells_who_reported_who_was_rejected_and_who_was_late(
    harness: Callable[..., Harness],
) -> None:
    h = harness(("a", "b", "c"), round_timeout=0.5)

    def answer(announcement: Round, model: Model) -> None:
        h.clients["a"].send(announcement.round, update_payload(model, random_delta(model, 1)))
        bad = random_delta(model, 2)
        bad[0][bad[0] != 0] = np.inf
        h.clients["b"].send(announcement.round, update_payload(model, bad))
        # c says nothing: late

    h.on_round(answer)

    h.run_round()

    snapshot = decode(h.broker.retained[TOPICS.telemetry]).message
    assert isinstance(snapshot, Snapshot)
    rows = {d.id: d for d in snapshot.devices}
    assert (rows["a"].selected, rows["a"].reported, rows["a"].rejected, rows["a"].late) == (
        1,
        1,
        0,
        0,
    )
    assert (rows["b"].reported, rows["b"].rejected) == (0, 1)
    assert rows["b"].last_reason.startswith("nonfinite")
    assert (rows["c"].reported, rows["c"].late) == (0, 1)
    assert rows["a"].bytes_up == h.broker.update_bytes() - rows["b"].bytes_up
    assert snapshot.rounds[-1]["round"] == ROUND and snapshot.progress is None
    assert snapshot.run.phase == "training" and snapshot.run.devices_total == 3


def test_telemetry_lists_fewer_devices_rather_than_exceed_the_payload_limit(
    harness: Callable[..., Harness],
) -> None:
    h = harness(tuple(f"device-{i:04d}" for i in range(60)), max_payload=4096)

    h.coordinator.telemetry.send()

    snapshot = decode(h.broker.retained[TOPICS.telemetry]).message
    assert isinstance(snapshot, Snapshot)
    assert len(h.broker.retained[TOPICS.telemetry]) <= 4096
    assert 0 < len(snapshot.devices) < 60 and snapshot.run.devices_total == 60
    assert snapshot.devices == sorted(snapshot.devices, key=lambda d: d.id)


def test_a_hello_sent_as_another_device_does_not_change_its_row(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    forged = Hello(
        client_id="b",
        profile="jetson-nano",
        num_samples=9,
        backend="keras",
        installed="ff" * 32,
        deploys=True,
    )
    h.clients["a"].transport.publish(
        TOPICS.client_status("b"), encode(forged, run=RUN, sender="a"), retain=True
    )

    while h.coordinator.pump(0.0):
        pass

    assert h.coordinator.fleet.devices["b"].profile == "generic-x86-64"
    row = next(r for r in h.coordinator.telemetry.ledger.rows() if r.id == "b")
    assert (row.profile, row.model) == ("generic-x86-64", None)


def test_bytes_sent_as_someone_else_on_a_devices_topic_are_not_put_on_its_row(
    harness: Callable[..., Harness],
) -> None:
    h = harness()

    def answer(announcement: Round, model: Model) -> None:
        payload = update_payload(model, random_delta(model, 1))
        forged = [encode(c, run=RUN, sender="b") for c in split(payload, max_chunk=1 << 20)]
        h.clients["a"].publish(announcement.round, forged)  # "b" speaking on a's topic
        h.clients["a"].send(announcement.round, payload)
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"sender": 1}
    rows = {r.id: r for r in h.coordinator.telemetry.ledger.rows()}
    assert (rows["a"].rejected, rows["a"].reported) == (0, 1)
    assert rows["a"].bytes_up == rows["b"].bytes_up  # its own update only, like b's
    assert h.coordinator.telemetry.ledger.events[-2].kind == "drop"


def test_only_devices_that_install_deployments_are_waited_for(
    harness: Callable[..., Harness],
) -> None:
    h = harness()  # the fake clients' hellos do not say they install deployments
    started = time.monotonic()

    missing = h.coordinator.deployments.await_installs({"generic-x86-64": "ab" * 32}, timeout=5.0)

    assert missing == [] and time.monotonic() - started < 1.0


def test_a_trimmed_snapshot_keeps_the_devices_of_the_round_in_progress(
    harness: Callable[..., Harness],
) -> None:
    ids = tuple(f"device-{i:04d}" for i in range(60))
    h = harness(ids, max_payload=4096, clients_per_round=3)
    h.coordinator.telemetry.round_started(
        1, ["device-0057", "device-0058", "device-0059"], deadline=0.0, bytes_down=1
    )

    snapshot = decode(h.broker.retained[TOPICS.telemetry]).message

    assert isinstance(snapshot, Snapshot)
    listed = [d.id for d in snapshot.devices]
    assert {"device-0057", "device-0058", "device-0059"} <= set(listed) and len(listed) < 60


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
            Failed(round=announcement.round, reason="MemoryError: "), run=RUN, sender="b"
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


def test_a_selection_from_a_huge_fleet_fits_in_a_few_bytes_and_every_device_computes_it(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: 20,000 devices online (hellos written straight into the coordinator's table)
    h = harness(clients_per_round=5000)
    hello = h.coordinator.fleet.devices["a"]
    fleet = [f"pi-{i:05d}" for i in range(20_000)]
    h.coordinator.fleet.devices.update({c: dataclasses.replace(hello, client_id=c) for c in fleet})

    # Execute
    drawn = h.coordinator.fleet.select(ROUND)
    again = h.coordinator.fleet.select(ROUND)
    selected, draw, cutoff = drawn.selected, drawn.draw, drawn.cutoff
    announcement = Round(
        round=ROUND,
        model_version=ROUND,
        deadline=0.0,
        draw=draw,
        cutoff=cutoff,
        model=Manifest(topic="t", size=1, chunks=1, sha256="0" * 64),
        local_epochs=1,
    )

    # Assert: exactly the sample size, the same set every device derives, reproducible per round
    assert len(selected) == 5000
    assert {c for c in [*fleet, "a", "b"] if announcement.selects(c)} == set(selected)
    assert again == drawn
    assert h.coordinator.fleet.select(ROUND + 1).selected != selected
    assert len(encode(announcement, run=RUN, sender="coordinator")) < 512


def test_a_device_that_joins_after_the_draw_and_is_drawn_is_accepted(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: every device selected (clients_per_round 0); "late" joins once the round is out
    h = harness(("a", "b"))

    def answer(announcement: Round, model: Model) -> None:
        if "late" in h.clients:
            return
        h.clients["late"] = FakeClient(h.broker, "late")  # it answers first, then a and b
        for client in reversed(h.clients.values()):
            client.send(announcement.round, update_payload(model, random_delta(model, 3)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert
    assert (result.selected, result.reported, result.rejected) == (3, 3, {})


def test_late_joiners_fill_the_round_up_to_its_devices_and_only_accepted_ones_count(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: 3 devices a round, 2 online at the draw; three late joiners answer: x with a
    # payload that does not decode, then y and z
    h = harness(("a", "b"), clients_per_round=3)

    def answer(announcement: Round, model: Model) -> None:
        if "x" in h.clients:
            return
        for late in ("x", "y", "z"):
            h.clients[late] = FakeClient(h.broker, late)
        h.clients["x"].send(announcement.round, b"not an update")
        for client in ("y", "z", "a", "b"):
            h.clients[client].send(
                announcement.round, update_payload(model, random_delta(model, 3))
            )

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert: y fills the round; x never counted as selected, z is one too many
    assert (result.selected, result.reported) == (3, 3)
    assert result.rejected["unselected"] == 1 and sum(result.rejected.values()) == 2
    assert "has its 3 devices" in h.coordinator.last_round["rejected"]["z"]


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_a_late_update_of_the_previous_round_counts_with_its_staleness_weight_or_not_at_all(
    harness: Callable[..., Harness], weight: float
) -> None:
    # Prepare: in round 2 only "a" answers (quorum 1 of 2); "b"'s round-2 update arrives during
    # round 3, before "a"'s round-3 update
    h = harness(quorum=0.5, staleness_weight=weight)
    sent: dict[str, object] = {}

    def answer(announcement: Round, model: Model) -> None:
        if announcement.round == ROUND:
            h.clients["a"].send(
                ROUND, update_payload(model, random_delta(model, 1), num_samples=30)
            )
            sent["model"], sent["b"] = model, random_delta(model, 2)
            return
        h.clients["b"].send(ROUND, update_payload(sent["model"], sent["b"], num_samples=10))  # type: ignore[arg-type]
        sent["a"] = random_delta(model, 3)
        h.clients["a"].send(
            ROUND + 1,
            update_payload(
                model,
                sent["a"],
                round_=ROUND + 1,  # type: ignore[arg-type]
                num_samples=30,
            ),
        )

    h.on_round(answer)
    _, first, _ = h.run_round()
    before = h.coordinator.pruner.model()

    # Execute
    result = h.coordinator.run_round(ROUND + 1)

    # Assert: FedAvg with b's samples times the weight; rejected as late without one
    after = h.coordinator.pruner.model()
    a, b = sent["a"], sent["b"]
    want = [
        w + (30 * da + weight * 10 * db) / (30 + weight * 10)
        for w, da, db in zip(before.weights, a, b, strict=True)
    ]  # type: ignore[call-overload]
    assert_weights(after, want)
    assert (first.late, first.reported) == (1, 1)
    assert (result.reported, result.stale) == (1, 1 if weight else 0)
    assert result.rejected == ({} if weight else {"round": 1})
    assert h.coordinator.last_round["stale"] == (["b"] if weight else [])


def test_a_redelivered_update_of_the_previous_round_is_ignored_and_does_not_answer_this_one(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: late updates count; "a"'s round-2 update arrives again (QoS 1) during round 3,
    # followed by a different round-2 update (rejected as a duplicate), then the round-3 updates
    h = harness(staleness_weight=0.5)
    sent: dict[str, bytes] = {}

    def answer(announcement: Round, model: Model) -> None:
        for i, client in enumerate(h.clients.values()):
            if announcement.round == ROUND:
                sent[client.id] = update_payload(model, random_delta(model, i))
            else:
                h.clients["a"].send(ROUND, sent["a"])
                h.clients["a"].send(ROUND, update_payload(model, random_delta(model, 9)))
            payload = update_payload(model, random_delta(model, 10 + i), round_=announcement.round)
            client.send(
                announcement.round, sent[client.id] if announcement.round == ROUND else payload
            )

    h.on_round(answer)
    h.run_round()
    h.clients["a"].notices()

    # Execute
    result = h.coordinator.run_round(ROUND + 1)

    # Assert: both round-3 updates count; the duplicate's notice names round 2, and so does the
    # verdict each copy of a judged round-2 payload gets again (sent twice each)
    notices = h.clients["a"].notices()
    assert (result.reported, result.rejected) == (2, {"duplicate": 1})
    assert [(n.round, n.accepted) for n in notices] == [
        (ROUND, True),
        (ROUND, False),
        (ROUND + 1, True),
        (ROUND, True),
        (ROUND, False),
    ]


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


def test_an_update_missing_a_chunk_is_never_counted_and_its_device_is_late(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: "b" sends the last of its two chunks only (the first was lost), twice (QoS 1)
    h = harness(round_timeout=1.0)
    sent: list[np.ndarray] = []

    def answer(announcement: Round, model: Model) -> None:
        sent.extend(random_delta(model, 1))
        h.clients["a"].send(announcement.round, update_payload(model, sent))
        chunks = h.clients["b"].chunks(
            update_payload(model, random_delta(model, 2)), max_chunk=12_000
        )
        assert len(chunks) == 2
        h.clients["b"].publish(announcement.round, [chunks[1], chunks[1]])

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the round ends at its deadline with a's update alone; b is late, nothing rejected
    assert (result.selected, result.reported, result.late, result.rejected) == (2, 1, 1, {})
    assert h.coordinator.last_round["late"] == ["b"]
    assert_weights(after, [w + d for w, d in zip(before.weights, sent, strict=True)])


def test_a_forced_codec_selects_only_devices_that_have_it_and_refuses_other_codecs(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: the run forces int8+zstd; "a" and "b" can, "old" speaks only float32; "b" sends
    # float16 anyway
    h = harness(("a", "b"), codec="int8+zstd")
    for name in ("a", "b"):
        h.clients[name] = FakeClient(h.broker, name, codecs=("f32", "f16", "int8", "zstd"))
    old = FakeClient(h.broker, "old")
    h.coordinator.pump(0.1)
    h.coordinator.pump(0.1)

    def answer(announcement: Round, model: Model) -> None:
        for name, codec in (("a", "int8+zstd"), ("b", "f16")):
            update = Update(round=ROUND, num_samples=100, deltas=random_delta(model, 1))
            h.clients[name].send(ROUND, encode_update(update, model.masks, Codec.parse(codec)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert
    assert (result.selected, result.reported, result.codecs) == (2, 1, {"int8+zstd": 1})
    assert result.rejected == {"codec": 1}
    assert "sent as f16; this run's codec is int8+zstd" in h.coordinator.last_round["rejected"]["b"]
    (notice,) = old.notices()
    assert (notice.round, notice.accepted) == (0, False)
    assert notice.reason == (
        "this run's codec int8+zstd needs int8, zstd, which this device lacks: it is not selected"
    )


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


def _claim(h: Harness, client_id: str, round_: int, payload: bytes, *, session: str = "") -> None:
    """``client_id``'s hello saying it resent ``payload`` for want of a notice."""
    claim = Unanswered(
        session=session or h.coordinator.telemetry.session,
        round=round_,
        sha256=sha256(payload),
        resends=1,
    )
    hello = Hello(
        client_id=client_id,
        profile="generic-x86-64",
        num_samples=100,
        backend="scripted",
        unanswered=claim,
    )
    h.clients[client_id].transport.publish(
        TOPICS.client_status(client_id), encode(hello, run=RUN, sender=client_id), retain=True
    )


def test_a_resent_update_is_answered_again_and_counted_once(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: "a" sends its update, then (no notice came) says so and sends it again
    h = harness()

    def answer(announcement: Round, model: Model) -> None:
        payload = update_payload(model, random_delta(model, 1))
        h.clients["a"].send(announcement.round, payload)
        _claim(h, "a", announcement.round, payload)
        h.clients["a"].send(announcement.round, payload)  # a new envelope: a resend
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert: one update from each, both copies answered; "a" was never overdue (its update was in)
    assert (result.reported, result.rejected, result.overdue) == (2, {}, 0)
    assert [n.accepted for n in h.clients["a"].notices()] == [True, True]
    assert h.coordinator.telemetry.snapshot().progress is None


def test_a_device_that_says_its_update_went_unanswered_is_overdue_until_it_arrives(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: "a" claims a resend before any of its update is here; a claim of another
    # session is stale
    h = harness(round_timeout=0.5)
    seen: list[list[str]] = []

    def answer(announcement: Round, model: Model) -> None:
        payload = update_payload(model, random_delta(model, 1))
        _claim(h, "a", announcement.round, payload)
        _claim(h, "b", announcement.round, payload, session="0000000000-older")

    h.on_round(answer)
    h.coordinator.observer.observers.append(Seen(h, seen))

    # Execute
    _, result, _ = h.run_round()

    # Assert: "a" overdue until the round closed without its update
    assert result.overdue == 1 and result.reported == 0
    assert ["a"] in seen


class Seen(Observer):
    """What the round's telemetry lists as overdue, each time a device is found overdue."""

    def __init__(self, h: Harness, seen: list[list[str]]) -> None:
        self.h, self.seen = h, seen

    def overdue(self, client_id: str, resends: int) -> None:
        progress = self.h.coordinator.telemetry.snapshot().progress
        self.seen.append([] if progress is None else list(progress.overdue))
