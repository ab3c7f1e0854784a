"""The edge client's round loop, driven through an in-memory broker with a numpy trainer."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from memory_broker import MemoryBroker, MemoryTransport

from fedprune import device_profiles
from fedprune.edge_client import local_training, trainer
from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.run_follower import ClientStats
from fedprune.edge_client.trainer import EpochHook, Evaluation, Trainer
from fedprune.edge_client.uplink import Identity, resend_wait
from fedprune.protocol.chunks import Reassembler, sha256, split
from fedprune.protocol.codec import (
    Model,
    Residual,
    apply_delta,
    decode_update,
    encode_delta,
    encode_model,
)
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import (
    Chunk,
    Failed,
    Hello,
    Manifest,
    Message,
    Notice,
    Offline,
    Phase,
    Round,
    Spec,
    Status,
    Unanswered,
)
from fedprune.protocol.signing import SigningKey, Trust
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import ConnectionChange, ConnectionEvent

RUN = "kitchen-run"
CLIENT = "pi-kitchen"
ROUND = 3
VERSION = 7
TOPICS = Topics(RUN)


class AddOneTrainer(Trainer):
    """Adds 1.0 to every weight and keeps masked ones at zero; "evaluates" to fixed numbers."""

    def fit(
        self,
        model: Model,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        seed: int,
        on_epoch: EpochHook | None = None,
    ) -> list[np.ndarray]:
        for epoch in range(1, epochs + 1):
            if on_epoch is not None:
                on_epoch(epoch)
        return [
            (w + np.float32(1.0)) * (np.float32(1.0) if m is None else m)
            for w, m in zip(model.weights, model.masks, strict=True)
        ]

    def evaluate(self, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluation:
        return Evaluation(loss=0.25, accuracy=0.5, n=len(y))


class FinishingBroker(MemoryBroker):
    """Announces the end of the run once a client's last update chunk arrives, as a coordinator
    would; this lets ``EdgeClient.run`` return without waiting for a timeout."""

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        super().route(topic, payload, retain)
        if TOPICS.parse_update(topic) is None:
            return
        chunk = _chunk(payload)
        if chunk.index == chunk.count - 1:
            status = Status(phase=Phase.FINISHED, round=ROUND, rounds=ROUND)
            super().route(TOPICS.status, _encode(status), True)


def _encode(message: Message) -> bytes:
    return encode(message, run=RUN, sender="coordinator")


@pytest.fixture(autouse=True)
def fake_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(trainer.BACKENDS, "fake", f"{__name__}:AddOneTrainer")


@pytest.fixture
def model() -> Model:
    """A 20x30 kernel with 40% of it pruned and an unpruned bias; values are multiples of 0.5 so
    that ``w + 1 - w`` is exactly 1.0 in float32."""
    rng = np.random.default_rng(11)
    mask = (rng.random((20, 30)) > 0.4).astype(np.float32)
    kernel = (rng.integers(-8, 8, size=(20, 30)) * 0.5).astype(np.float32) * mask
    bias = (rng.integers(-8, 8, size=30) * 0.5).astype(np.float32)
    return Model(weights=[kernel, bias], masks=[mask, None])


@pytest.fixture
def data() -> LocalData:
    rng = np.random.default_rng(5)
    return LocalData(
        x=rng.normal(size=(24, 4)).astype(np.float32),
        y=rng.integers(0, 3, size=24),
        x_test=rng.normal(size=(6, 4)).astype(np.float32),
        y_test=rng.integers(0, 3, size=6),
    )


def _publish_run(
    broker: MemoryBroker,
    model: Model,
    *,
    selected: list[str],
    deadline: float,
    duration: float = 0.0,
    session: str = "",
    local_epochs: int = 1,
    codec: str = "",
) -> None:
    """What the coordinator leaves retained for a round: spec, model chunks, announcement."""
    coordinator = MemoryTransport(broker)
    spec = Spec(
        model_json="{}",
        input_shape=[4],
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.0,
        local_epochs=1,
        batch_size=8,
        codec=codec,
    )
    coordinator.publish(TOPICS.spec, _encode(spec), retain=True)
    payload = encode_model(model)
    chunks = list(split(payload, max_chunk=700))
    for chunk in chunks:
        coordinator.publish(f"{TOPICS.model(VERSION)}/{chunk.index}", _encode(chunk), retain=True)
    manifest = Manifest(
        topic=TOPICS.model(VERSION), size=len(payload), chunks=len(chunks), sha256=sha256(payload)
    )
    announcement = Round(
        round=ROUND,
        model_version=VERSION,
        deadline=deadline,
        selected=selected,
        model=manifest,
        local_epochs=local_epochs,
        duration=duration,
        session=session,
    )
    coordinator.publish(TOPICS.round, _encode(announcement), retain=True)
    coordinator.close()


def _client(broker: MemoryBroker, data: LocalData) -> EdgeClient:
    identity = Identity(
        run=RUN,
        client_id=CLIENT,
        profile="raspberry-pi-4",
        num_samples=data.num_samples,
        backend="fake",
    )
    return EdgeClient(MemoryTransport(broker, max_payload=1024), identity=identity, data=data)


def _chunk(payload: bytes) -> Chunk:
    chunk = decode(payload).message
    assert isinstance(chunk, Chunk)
    return chunk


def _update_chunks(broker: MemoryBroker) -> list[tuple[str, bytes]]:
    return [(t, p) for t, p in broker.log if TOPICS.parse_update(t) is not None]


def test_a_selected_client_sends_deltas_of_one_at_kept_positions_and_zero_where_pruned(
    model: Model, data: LocalData
) -> None:
    # Prepare
    broker = FinishingBroker()
    _publish_run(broker, model, selected=["pi-garage", CLIENT], deadline=time.time() + 60)
    client = _client(broker, data)

    # Execute
    report = client.run(timeout=10)

    # Assert
    sent = _update_chunks(broker)
    assert len(sent) > 1  # 1024-byte messages force the update into several chunks
    assert all(t.startswith(TOPICS.update(CLIENT, ROUND) + "/") for t, _ in sent)
    assembler = Reassembler(max_size=1 << 20)
    results = [assembler.add(_chunk(p)) for _, p in sent]
    assert results[-1] is not None
    update = decode_update(results[-1], model)
    kernel_mask = model.masks[0]
    assert kernel_mask is not None
    np.testing.assert_array_equal(update.deltas[0], np.where(kernel_mask == 1, 1.0, 0.0))
    np.testing.assert_array_equal(update.deltas[1], np.ones(30))
    assert (update.round, update.num_samples) == (ROUND, 24)
    assert {k: update.metrics[k] for k in ("loss", "accuracy", "n_eval")} == {
        "loss": 0.25,
        "accuracy": 0.5,
        "n_eval": 6.0,
    }
    assert update.metrics["train_seconds"] >= 0.0
    assert report.rounds == [ROUND]
    assert report.finished is True
    assert report.bytes_up == sum(len(p) for _, p in sent)


def test_a_client_announces_itself_with_a_retained_hello(data: LocalData) -> None:
    # Prepare
    broker = MemoryBroker()
    client = _client(broker, data)

    # Execute
    client.start()

    # Assert
    hello = decode(broker.retained[TOPICS.client_status(CLIENT)]).message
    assert hello == Hello(
        client_id=CLIENT,
        profile="raspberry-pi-4",
        num_samples=24,
        backend="fake",
        codecs=["f32", "f16", "int8", "int8sr", "topk", "zstd"],
    )


def test_a_client_not_selected_sends_nothing(model: Model, data: LocalData) -> None:
    # Prepare
    broker = MemoryBroker()
    _publish_run(broker, model, selected=["pi-garage"], deadline=time.time() + 60)
    client = _client(broker, data)

    # Execute
    report = client.run(timeout=0.2)

    # Assert
    assert _update_chunks(broker) == []
    assert [t for t, _ in broker.log if t.startswith(TOPICS.root + "/clients/")] == [
        TOPICS.client_status(CLIENT)  # only its hello
    ]
    assert (report.rounds, report.bytes_up) == ([], 0)


def test_a_round_is_timed_by_its_duration_not_by_comparing_clocks(
    model: Model, data: LocalData
) -> None:
    # The coordinator's clock is an hour behind this device's: its deadline looks long gone
    broker = FinishingBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() - 3600, duration=60.0)

    report = _client(broker, data).run(timeout=10)

    assert report.rounds == [ROUND] and len(_update_chunks(broker)) > 0


def test_a_device_that_runs_out_of_a_rounds_time_says_so_once(
    model: Model, data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 3600, duration=1e-6)

    with caplog.at_level(logging.WARNING, logger="fedprune.client"):
        report = _client(broker, data).run(timeout=0.3)

    assert report.rounds == [] and _update_chunks(broker) == []
    said = [r.getMessage() for r in caplog.records if "time ran out" in r.getMessage()]
    assert said == [
        f"round {ROUND}: its time ran out before this device could train (the round lasts 0 s)"
    ]


def test_a_round_whose_deadline_has_passed_is_skipped(model: Model, data: LocalData) -> None:
    # Prepare
    broker = MemoryBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() - 1)
    client = _client(broker, data)

    # Execute
    report = client.run(timeout=0.2)

    # Assert
    assert _update_chunks(broker) == []
    assert (report.rounds, report.bytes_up) == ([], 0)


def test_a_finished_status_of_an_earlier_run_does_not_end_a_new_client(data: LocalData) -> None:
    # Prepare: a retained FINISHED left by an earlier run of the same name
    broker = MemoryBroker()
    status = Status(phase=Phase.FINISHED, round=10, rounds=10)
    MemoryTransport(broker).publish(TOPICS.status, _encode(status), retain=True)
    client = _client(broker, data)

    # Execute
    report = client.run(timeout=1.0)

    # Assert: it waits for the run to start again
    assert report.finished is False
    assert report.rounds == []


def test_the_end_of_a_run_it_saw_makes_run_return_at_once(data: LocalData) -> None:
    # Prepare: the client is subscribed while the run goes from waiting to finished
    broker = MemoryBroker()
    client = _client(broker, data)
    client.start()
    coordinator = MemoryTransport(broker)
    for phase in (Phase.WAITING, Phase.FINISHED):
        status = Status(phase=phase, round=0, rounds=10)
        coordinator.publish(TOPICS.status, _encode(status), retain=True)
    started = time.monotonic()

    # Execute
    report = client.run(timeout=5)

    # Assert
    assert report.finished is True and report.aborted is False
    assert time.monotonic() - started < 1.0


def test_an_aborted_run_ends_the_client_as_aborted(data: LocalData) -> None:
    broker = MemoryBroker()
    status = Status(phase=Phase.ABORTED, round=0, rounds=10)
    MemoryTransport(broker).publish(TOPICS.status, _encode(status), retain=True)

    report = _client(broker, data).run(timeout=5)

    assert report.finished is True and report.aborted is True


def test_a_training_status_does_not_finish_the_client(data: LocalData) -> None:
    # Prepare
    client = _client(MemoryBroker(), data)
    status = Status(phase=Phase.TRAINING, round=2, rounds=10)

    # Execute
    client.handle(TOPICS.status, _encode(status))

    # Assert
    assert client.stats.finished is False


def test_a_rejected_notice_is_counted_and_an_accepted_one_is_not(data: LocalData) -> None:
    # Prepare
    client = _client(MemoryBroker(), data)
    rejected = Notice(round=ROUND, accepted=False, reason="update norm 1e9 exceeds 100")
    accepted = Notice(round=ROUND + 1, accepted=True, reason="")

    # Execute
    client.handle(TOPICS.inbox(CLIENT), _encode(rejected))
    client.handle(TOPICS.inbox(CLIENT), _encode(accepted))

    # Assert
    assert client.stats.rejected == 1


def test_a_garbled_message_is_logged_and_ignored(
    data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    client = _client(MemoryBroker(), data)

    # Execute
    with caplog.at_level(logging.WARNING, logger="fedprune.client"):
        client.handle(TOPICS.round, b"\xc1 not msgpack")
        client.handle(TOPICS.round, b"")  # a cleared retained message: silently skipped

    # Assert
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith(f"ignored a message on {TOPICS.round}: undecodable message")
    assert client.stats == ClientStats()


def test_a_waiting_client_says_what_it_waits_for_and_says_it_again_while_it_lasts(
    model: Model, data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: nobody on the broker yet; reports every 0.05 s instead of every 30 s
    broker = MemoryBroker()
    client = EdgeClient(
        MemoryTransport(broker),
        identity=Identity(
            run=RUN,
            client_id=CLIENT,
            profile="raspberry-pi-4",
            num_samples=data.num_samples,
            backend="fake",
        ),
        data=data,
        wait_report=0.05,
    )
    caplog.set_level(logging.INFO, logger="fedprune.client")

    # Execute: wait alone (the loop wakes every 0.5 s), then a round that selects another device
    client.run(timeout=1.3)
    alone = [r.getMessage() for r in caplog.records]
    caplog.clear()
    _publish_run(broker, model, selected=["pi-garage"], deadline=time.time() + 60)
    client.run(timeout=1.3)
    unselected = [r.getMessage() for r in caplog.records]

    # Assert: said at once, repeated while it lasts, and said anew when it changes
    coordinator = "the coordinator of run 'kitchen-run' (nothing from it on the broker yet)"
    assert alone[0] == f"waiting for {coordinator}"
    assert len(alone) >= 3
    assert all(line.startswith(f"still waiting for {coordinator} (") for line in alone[1:])
    selects = f"a round that selects this device (round {ROUND} does not)"
    assert unselected.count(f"waiting for {selects}") == 1
    assert any(line.startswith(f"still waiting for {selects} (") for line in unselected)


def test_a_litert_device_stops_with_one_line_when_its_run_has_no_training_artifact(
    data: LocalData,
) -> None:
    # Prepare: the coordinator could not build the artifact and says why in the Spec
    broker = MemoryBroker()
    spec = Spec(
        model_json="{}",
        input_shape=[4],
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.0,
        local_epochs=1,
        batch_size=8,
        artifact_error="layer 'bn' (BatchNormalization) is not supported by the litert trainer",
    )
    MemoryTransport(broker).publish(TOPICS.spec, _encode(spec), retain=True)
    identity = Identity(
        run=RUN,
        client_id=CLIENT,
        profile="raspberry-pi-4",
        num_samples=data.num_samples,
        backend="litert",
    )
    client = EdgeClient(MemoryTransport(broker), identity=identity, data=data)

    # Execute / Assert: a ConfigError, which the command prints as one line and exits 2 on
    with pytest.raises(ConfigError) as caught:
        client.run(timeout=5)
    assert str(caught.value) == (
        "this device's trainer (litert) cannot train run 'kitchen-run': layer 'bn'"
        " (BatchNormalization) is not supported by the litert trainer"
    )


def test_a_device_serving_forever_answers_a_run_it_cannot_train_with_failed_rounds(
    model: Model, data: LocalData
) -> None:
    # Prepare: a litert device, and a run whose Spec says it has no training artifact
    broker = MemoryBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    spec = Spec(
        model_json="{}",
        input_shape=[4],
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.0,
        local_epochs=1,
        batch_size=8,
        artifact_error="layer 'bn' is not supported",
    )
    MemoryTransport(broker).publish(TOPICS.spec, _encode(spec), retain=True)
    identity = Identity(
        run=RUN,
        client_id=CLIENT,
        profile="raspberry-pi-4",
        num_samples=data.num_samples,
        backend="litert",
    )
    client = EdgeClient(MemoryTransport(broker), identity=identity, data=data)

    # Execute: no ConfigError
    report = client.run(timeout=1.0, forever=True)

    # Assert: the round is answered as failed, once, with the reason
    failed = [decode(p).message for t, p in broker.log if t.endswith("/failed")]
    assert report.failed == 1 and len(failed) == 1
    assert isinstance(failed[0], Failed) and failed[0].reason == (
        "this device's trainer (litert) cannot train run 'kitchen-run': layer 'bn' is not supported"
    )
    assert client.waiting_for() == f"a run this device can train ({failed[0].reason})"


def test_a_device_serving_forever_whose_labels_do_not_fit_fails_the_round_and_waits(
    model: Model, data: LocalData
) -> None:
    # Prepare: labels up to 40 for a model of 30 classes
    broker = MemoryBroker()
    _publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s1"
    )
    bad = dataclasses.replace(data, y=np.full_like(data.y, 40))

    # Execute / Assert: one line and exit 2 without --forever; a failed round with it
    with pytest.raises(ConfigError, match="local labels run from 0 to 40"):
        _client(broker, bad).run(timeout=1.0)
    client = _client(broker, bad)
    report = client.run(timeout=1.0, forever=True)
    assert report.failed == 1
    assert (client.waiting_for() or "").startswith("a run this device can train (local labels")


def test_with_the_coordinator_key_a_forged_finished_status_is_dropped_and_counted(
    data: LocalData,
) -> None:
    # Prepare: a stranger leaves an unsigned FINISHED, then the real (signed) WAITING arrives
    key = SigningKey.generate()
    broker = MemoryBroker()
    stranger = MemoryTransport(broker)
    status = Status(phase=Phase.FINISHED, round=ROUND, rounds=ROUND)
    stranger.publish(TOPICS.status, _encode(status), retain=True)
    identity = Identity(
        run=RUN,
        client_id=CLIENT,
        profile="raspberry-pi-4",
        num_samples=data.num_samples,
        backend="fake",
    )
    client = EdgeClient(
        MemoryTransport(broker),
        identity=identity,
        data=data,
        trust=Trust.of({"coordinator": key.verify_key}),
    )

    # Execute
    client.start()
    client.handle(TOPICS.status, broker.retained[TOPICS.status])
    waiting = Status(phase=Phase.WAITING, round=0, rounds=ROUND)
    client.handle(TOPICS.status, encode(waiting, run=RUN, sender="coordinator", signer=key))

    # Assert: the forgery did not end the client; the genuine status was taken
    assert client.stats.dropped == 1
    assert client.stats.finished is False
    assert client.waiting_for() == f"run {RUN!r} to start its first round (coordinator waiting)"


def test_a_client_shows_what_it_does_when_that_changes(model: Model, data: LocalData) -> None:
    # Prepare
    broker = FinishingBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60)
    client = _client(broker, data)
    shown: list[str] = []
    client.show = shown.append

    # Execute
    report = client.run(timeout=10)

    # Assert: no repeats; training, then what it has done
    assert report.rounds == [ROUND]
    assert f"round {ROUND}: training 1 epoch(s) on 24 samples" in shown
    assert f"round {ROUND}: training, epoch 1 of 1" in shown
    assert shown[-1].startswith(f"1 round(s) done, {report.bytes_up:,} bytes sent; waiting for")
    assert all(a != b for a, b in zip(shown, shown[1:], strict=False))


def test_the_peak_memory_of_the_process_goes_with_each_update(
    model: Model, data: LocalData
) -> None:
    broker = FinishingBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60)

    _client(broker, data).run(timeout=10)

    sent = _update_chunks(broker)
    assembler = Reassembler(max_size=1 << 20)
    payload = [assembler.add(_chunk(p)) for _, p in sent][-1]
    assert payload is not None
    assert 10 < decode_update(payload, model).metrics["peak_memory_mb"] < 10_000


def test_long_local_training_says_how_far_it_is_in_the_log(
    model: Model,
    data: LocalData,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(local_training, "EPOCH_REPORT_SECONDS", 0.0)  # every epoch is "long"
    broker = FinishingBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60)
    identity = Identity(
        run=RUN,
        client_id=CLIENT,
        profile="raspberry-pi-4",
        num_samples=data.num_samples,
        backend="fake",
    )
    client = EdgeClient(
        MemoryTransport(broker, max_payload=1024), identity=identity, data=data, local_epochs=3
    )

    with caplog.at_level(logging.INFO, logger="fedprune.client"):
        client.run(timeout=10)

    said = [r.getMessage() for r in caplog.records if "epoch(s) done" in r.getMessage()]
    assert [m.split(" (")[0] for m in said] == [
        f"round {ROUND}: 1 of 3 epoch(s) done",
        f"round {ROUND}: 2 of 3 epoch(s) done",
    ]


def test_a_new_coordinator_session_is_joined_and_its_rounds_trained_again(
    model: Model, data: LocalData
) -> None:
    # Prepare: the device trained round 3 of session s1; the coordinator restarts (session s2)
    broker = MemoryBroker()
    _publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s1"
    )
    client = _client(broker, data)
    client.run(timeout=0.5)
    assert client.stats.rounds == [ROUND]

    # Execute: the new session announces its own round 3
    status = Status(phase=Phase.TRAINING, round=ROUND, rounds=5, session="s2")
    MemoryTransport(broker).publish(TOPICS.status, _encode(status), retain=True)
    _publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s2"
    )
    client.run(timeout=0.5)

    # Assert: trained again, not skipped as "already done"
    assert client.stats.rounds == [ROUND, ROUND]


def test_the_coordinators_last_will_is_said_and_waited_out(data: LocalData) -> None:
    broker = MemoryBroker()
    client = _client(broker, data)
    client.start()
    coordinator = MemoryTransport(broker)
    coordinator.publish(
        TOPICS.status, _encode(Status(phase=Phase.WAITING, round=0, rounds=5)), retain=True
    )
    coordinator.publish(TOPICS.status, _encode(Offline(who="coordinator")), retain=True)

    while (item := client.transport.get(0.1)) is not None:
        client.handle(*item)

    assert client.waiting_for() == (
        f"the coordinator of run {RUN!r} to come back (its connection dropped)"
    )
    coordinator.publish(
        TOPICS.status, _encode(Status(phase=Phase.WAITING, round=0, rounds=5)), retain=True
    )
    while (item := client.transport.get(0.1)) is not None:
        client.handle(*item)
    assert "to come back" not in (client.waiting_for() or "")


def test_a_message_of_an_earlier_session_is_ignored(model: Model, data: LocalData) -> None:
    broker = MemoryBroker()
    _publish_run(
        broker,
        model,
        selected=[CLIENT],
        deadline=time.time() + 60,
        duration=60.0,
        session="00000002-b",
    )
    client = _client(broker, data)
    client.run(timeout=0.5)

    old = Status(phase=Phase.FINISHED, round=5, rounds=5, session="00000001-a")  # a replay
    MemoryTransport(broker).publish(TOPICS.status, _encode(old), retain=True)
    client.run(timeout=0.3)

    assert client.stats.rounds == [ROUND] and not client.stats.finished


class BrokenTrainer(AddOneTrainer):
    def fit(
        self,
        model: Model,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        seed: int,
        on_epoch: EpochHook | None = None,
    ) -> list[np.ndarray]:
        raise RuntimeError("interpreter lost its tensors")


def test_a_training_that_raises_is_reported_as_a_failed_round_not_a_crash(
    model: Model, data: LocalData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_training, "make_trainer", lambda *a, **k: BrokenTrainer(a[1]))
    broker = MemoryBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)

    report = _client(broker, data).run(timeout=0.5)

    assert report.failed == 1 and _update_chunks(broker) == [
        (t, p) for t, p in broker.log if t.endswith("/failed")
    ]
    ((topic, payload),) = [(t, p) for t, p in broker.log if t.endswith("/failed")]
    assert topic == f"{TOPICS.update(CLIENT, ROUND)}/failed"
    message = decode(payload).message
    assert isinstance(message, Failed)
    assert (message.round, message.reason) == (ROUND, "RuntimeError: interpreter lost its tensors")


def test_a_device_that_serves_forever_trains_the_next_run_even_when_its_model_is_the_same(
    model: Model, data: LocalData
) -> None:
    # Prepare: a run of session s1 that finishes once the device's update arrives
    broker = FinishingBroker()
    _publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s1"
    )
    client = _client(broker, data)
    serving = threading.Thread(target=client.run, kwargs={"timeout": 8, "forever": True})

    # Execute: the same run started again (session s2) once the first one finished
    serving.start()
    end = time.monotonic() + 8
    while client.stats.rounds != [ROUND] and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.7)  # the device takes in the end of the run
    _publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s2"
    )
    while client.stats.rounds != [ROUND, ROUND] and time.monotonic() < end:
        time.sleep(0.05)
    serving.join()

    # Assert: both runs served by the one process, the same round number trained twice
    assert client.stats.rounds == [ROUND, ROUND]
    assert not client.stats.finished


def test_a_device_trains_no_more_epochs_than_its_profile_and_ignores_messages_over_its_limit(
    model: Model, data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the run asks 3 epochs; the Pi Zero profile allows 1 epoch, batches of 16 and
    # messages of 128 KiB
    profile = device_profiles.load("raspberry-pi-zero-2w")
    broker = FinishingBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, local_epochs=3)
    big = b"x" * (profile.max_payload_bytes + 1)  # waits, retained, in the device's inbox
    MemoryTransport(broker).publish(TOPICS.inbox(CLIENT), big, retain=True)
    identity = Identity(
        run=RUN,
        client_id=CLIENT,
        profile=profile.name,
        num_samples=data.num_samples,
        backend="fake",
        max_payload=profile.max_payload_bytes,
    )
    client = EdgeClient(
        MemoryTransport(broker, max_payload=1024), identity=identity, data=data, profile=profile
    )
    caplog.set_level(logging.WARNING, logger="fedprune.client")

    # Execute
    report = client.run(timeout=10)

    # Assert: what it did is in its update's metrics; the big message was ignored, with a line
    assembler = Reassembler(max_size=1 << 20)
    payload = [assembler.add(_chunk(p)) for _, p in _update_chunks(broker)][-1]
    assert payload is not None
    metrics = decode_update(payload, model).metrics
    assert (metrics["epochs"], metrics["batch_size"]) == (1.0, 8.0)  # the spec's 8 < 16
    assert report.oversize == 1
    assert any("over this profile's 131072-byte limit" in r.getMessage() for r in caplog.records)


def test_a_model_over_what_the_device_may_assemble_is_not_fetched_and_the_round_fails(
    data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: a 1 MB profile (256 KiB of model at most) and a 640 kB model
    profile = dataclasses.replace(device_profiles.load("raspberry-pi-zero-2w"), memory_mb=1)
    big = Model(weights=[np.ones((400, 400), np.float32)], masks=[None])
    broker = MemoryBroker()
    _publish_run(broker, big, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    client = EdgeClient(
        MemoryTransport(broker),
        data=data,
        profile=profile,
        identity=Identity(
            run=RUN,
            client_id=CLIENT,
            profile=profile.name,
            num_samples=data.num_samples,
            backend="fake",
        ),
    )

    # Execute
    report = client.run(timeout=1.0)

    # Assert: one line, one failed round, and no model chunk taken in
    failed = [decode(p).message for t, p in broker.log if t.endswith("/failed")]
    assert report.failed == 1 and len(failed) == 1
    assert isinstance(failed[0], Failed)
    assert failed[0].reason.startswith("the model of 640,")
    assert "over the 262,144 this device assembles at most" in failed[0].reason
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"round {ROUND}: {failed[0].reason}; told the coordinator"
    ]


@pytest.mark.parametrize(
    ("profile", "codec", "used"),
    [
        ("raspberry-pi-zero-2w", "", "int8+top0.1+zstd"),
        ("raspberry-pi-4", "", "int8"),
        ("raspberry-pi-zero-2w", "f16", "f16"),
    ],
)
def test_a_device_sends_in_the_runs_codec_else_in_its_profiles_with_error_feedback(
    model: Model, data: LocalData, profile: str, codec: str, used: str, tmp_path: Path
) -> None:
    # Prepare
    broker = FinishingBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, codec=codec)
    chosen = device_profiles.load(profile)
    identity = Identity(
        run=RUN, client_id=CLIENT, profile=profile, num_samples=data.num_samples, backend="fake"
    )
    client = EdgeClient(
        MemoryTransport(broker, max_payload=1024),
        identity=identity,
        data=data,
        profile=chosen,
        cache=tmp_path,
    )

    # Execute
    client.run(timeout=10)

    # Assert: the payload says its codec; what it did not send is kept for the next update
    assembler = Reassembler(max_size=1 << 20)
    payload = [assembler.add(_chunk(p)) for _, p in _update_chunks(broker)][-1]
    assert payload is not None
    update = decode_update(payload, model)
    assert update.codec == used
    kept = model.masks[0] == 1  # the fake trainer adds one to every kept weight
    residual = Residual.load(tmp_path / f"residual-{CLIENT}.npz")
    np.testing.assert_allclose(update.deltas[0][kept] + residual.values[0][kept], 1.0, atol=1e-6)


def test_a_device_that_lacks_the_runs_codec_says_what_to_install(
    data: LocalData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_training, "features", lambda: ["f32", "int8", "topk"])
    broker = MemoryBroker()
    spec = Spec(
        model_json="{}",
        input_shape=[4],
        optimizer="sgd",
        learning_rate=0.1,
        momentum=0.0,
        local_epochs=1,
        batch_size=8,
        codec="int8+top0.1+zstd",
    )
    MemoryTransport(broker).publish(TOPICS.spec, _encode(spec), retain=True)

    with pytest.raises(
        ConfigError,
        match=r"sends updates as int8\+top0.1\+zstd, which needs zstd"
        r" \(pip install 'fedprune\[edge,zstd\]'\)",
    ):
        _client(broker, data).run(timeout=5)


def _publish_next(broker: MemoryBroker, base: Model, new: Model, *, against: Model) -> Model:
    """Round ROUND + 1 of model version VERSION + 1: whole, as a coordinator rebuilds it from
    ``base`` and its int8 change, and as the change made ``against`` a model (``base``, or
    another to break it). Returns the whole model."""
    coordinator = MemoryTransport(broker)
    whole = apply_delta(base, encode_delta(base, new))
    manifests = {}
    for name, prefix, payload in (
        ("model", TOPICS.model(VERSION + 1), encode_model(whole)),
        ("delta", TOPICS.delta(VERSION + 1), encode_delta(against, new)),
    ):
        chunks = list(split(payload, max_chunk=700))
        for chunk in chunks:
            coordinator.publish(f"{prefix}/{chunk.index}", _encode(chunk), retain=True)
        manifests[name] = Manifest(
            topic=prefix, size=len(payload), chunks=len(chunks), sha256=sha256(payload)
        )
    announcement = Round(
        round=ROUND + 1,
        model_version=VERSION + 1,
        deadline=time.time() + 60,
        duration=60.0,
        selected=[CLIENT],
        local_epochs=1,
        base=sha256(encode_model(base)),
        **manifests,
    )
    coordinator.publish(TOPICS.round, _encode(announcement), retain=True)
    return whole


@pytest.mark.parametrize("broken", [False, True])
def test_a_device_that_holds_the_last_model_rebuilds_the_next_from_its_change(
    model: Model, data: LocalData, broken: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the device trained on ``model``; the next one differs a little wherever it keeps
    # weights (and its change is broken: made against another model)
    broker = MemoryBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    client = _client(broker, data)
    client.run(timeout=0.6)
    moved = [
        w + 0.3 * (1 if m is None else m) for w, m in zip(model.weights, model.masks, strict=True)
    ]
    new = Model(weights=moved, masks=model.masks)
    other = Model(weights=[w * 0 for w in model.weights], masks=model.masks)
    whole = _publish_next(broker, model, new, against=other if broken else model)

    # Execute
    client.run(timeout=0.6)

    # Assert: it trained the round on the new model either way, from the change when it was
    # good, else from the whole model, fetched after it
    assert client.stats.rounds == [ROUND, ROUND + 1]
    fetching = TOPICS.model(VERSION + 1) if broken else TOPICS.delta(VERSION + 1)
    assert f"{fetching}/+" in client.transport.patterns  # type: ignore[attr-defined]
    warned = any(
        "the model's change cannot be used (it does not give the round's model" in r.getMessage()
        for r in caplog.records
    )
    assert warned == broken
    payload = [p for t, p in broker.log if t.startswith(TOPICS.update(CLIENT, ROUND + 1))]
    assembler = Reassembler(max_size=1 << 20)
    update = decode_update([assembler.add(_chunk(p)) for p in payload][-1] or b"", whole)
    kept = model.masks[0] == 1
    np.testing.assert_allclose(update.deltas[0][kept], 1.0, rtol=1e-5)  # from the new weights


def _copies(broker: MemoryBroker) -> list[str]:
    """The payload SHA-256 of each first chunk the device published: one per copy of its update."""
    return [_chunk(p).sha256 for t, p in _update_chunks(broker) if t.endswith("/0")]


def _claim(broker: MemoryBroker) -> Unanswered | None:
    hello = decode(broker.retained[TOPICS.client_status(CLIENT)]).message
    assert isinstance(hello, Hello)
    return hello.unanswered


def _resending_client(broker: MemoryBroker, data: LocalData, after: float) -> EdgeClient:
    client = _client(broker, data)
    client.uplink.resend_after = after
    return client


def test_resending_waits_half_the_round_at_least_a_minute_doubling_each_time(model: Model) -> None:
    def announced(duration: float) -> Round:
        manifest = Manifest(topic="t", size=1, chunks=1, sha256="x")
        return Round(
            round=1,
            model_version=1,
            deadline=0.0,
            model=manifest,
            local_epochs=1,
            duration=duration,
        )

    assert resend_wait(announced(600.0), 0) == 300.0
    assert resend_wait(announced(600.0), 2) == 1200.0
    assert resend_wait(announced(30.0), 0) == 60.0
    assert resend_wait(announced(0.0), 1) == 120.0  # a coordinator older than protocol 1.5
    assert resend_wait(announced(600.0), 1, after=5.0) == 10.0


def test_an_update_without_a_notice_is_sent_again_and_the_hello_says_so(
    model: Model, data: LocalData
) -> None:
    # Prepare: nobody answers; the device resends after 0.2 s, then 0.4 s later
    broker = MemoryBroker()
    _publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s1"
    )
    client = _resending_client(broker, data, 0.2)

    # Execute
    report = client.run(timeout=1.0)

    # Assert: the same payload each time, two resends in the second, the hello names it
    copies = _copies(broker)
    assert len(copies) == 3 and len(set(copies)) == 1
    assert report.resent == 2
    assert _claim(broker) == Unanswered(session="s1", round=ROUND, sha256=copies[0], resends=2)


def test_a_notice_ends_the_resends_and_the_claim(model: Model, data: LocalData) -> None:
    # Prepare: the coordinator answers the first resend
    class Answering(MemoryBroker):
        def route(self, topic: str, payload: bytes, retain: bool) -> None:
            super().route(topic, payload, retain)
            if topic.endswith("/0") and len(_copies(self)) == 2:
                notice = Notice(round=ROUND, accepted=True, reason="")
                super().route(TOPICS.inbox(CLIENT), _encode(notice), False)

    broker = Answering()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    client = _resending_client(broker, data, 0.2)

    # Execute
    report = client.run(timeout=1.0)

    # Assert
    assert len(_copies(broker)) == 2 and report.resent == 1
    assert _claim(broker) is None


def test_no_resend_while_the_coordinators_last_will_says_it_is_away(
    model: Model, data: LocalData
) -> None:
    # Prepare: the coordinator's connection drops as the update goes out (its session keeps it)
    class Dropping(MemoryBroker):
        def route(self, topic: str, payload: bytes, retain: bool) -> None:
            super().route(topic, payload, retain)
            if topic.endswith("/0") and len(_copies(self)) == 1:
                super().route(TOPICS.status, _encode(Offline(who="coordinator")), True)

    broker = Dropping()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    client = _resending_client(broker, data, 1.0)

    # Execute: away for 1.5 s, longer than the device waits; then back, and it waits 1 s from then
    client.start()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        client.run(timeout=0.05)
    away = len(_copies(broker))
    back = Status(phase=Phase.TRAINING, round=ROUND, rounds=ROUND)
    MemoryTransport(broker).publish(TOPICS.status, _encode(back), retain=True)
    client.run(timeout=0.1)  # at most half a second
    soon = len(_copies(broker))
    client.run(timeout=1.5)

    # Assert
    assert (away, soon, len(_copies(broker))) == (1, 1, 2)


def test_a_device_whose_own_connection_came_back_resends_at_once(
    model: Model, data: LocalData
) -> None:
    # Prepare: a device that would wait a minute for its notice
    broker = MemoryBroker()
    _publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 120, duration=120.0)
    client = _client(broker, data)
    client.run(timeout=0.3)

    # Execute: its connection drops and comes back (a broker restart)
    client.transport._events.append(
        ConnectionEvent(change=ConnectionChange.RESTORED, detail="reconnected after 3.0 s")
    )
    report = client.run(timeout=0.3)

    # Assert: sent again at once, without claiming it went unanswered
    assert len(_copies(broker)) == 2 and report.resent == 1
    assert _claim(broker) is None
