"""The edge client's rounds, driven through an in-memory broker with a numpy trainer: what it
trains and sends, in which codec, within its profile's bounds and its round's time.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from client_harness import (
    CLIENT,
    ROUND,
    RUN,
    TOPICS,
    VERSION,
    AddOneTrainer,
    FinishingBroker,
    chunk_of,
    encode_message,
    make_client,
    publish_run,
    publish_spec,
    update_chunks,
)
from memory_broker import MemoryBroker, MemoryTransport

from fedprune import device_profiles
from fedprune.edge_client import local_training
from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.trainer import EpochHook
from fedprune.edge_client.uplink import Identity
from fedprune.protocol.chunks import Reassembler, sha256, split
from fedprune.protocol.codec import (
    Model,
    Residual,
    apply_delta,
    decode_update,
    encode_delta,
    encode_model,
)
from fedprune.protocol.envelope import decode
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import (
    Failed,
    Hello,
    Manifest,
    Round,
)


def test_a_selected_client_sends_deltas_of_one_at_kept_positions_and_zero_where_pruned(
    model: Model, data: LocalData
) -> None:
    # Prepare
    broker = FinishingBroker()
    publish_run(broker, model, selected=["pi-garage", CLIENT], deadline=time.time() + 60)
    client = make_client(broker, data)

    # Execute
    report = client.run(timeout=10)

    # Assert
    sent = update_chunks(broker)
    assert len(sent) > 1  # 1024-byte messages force the update into several chunks
    assert all(t.startswith(TOPICS.update(CLIENT, ROUND) + "/") for t, _ in sent)
    assembler = Reassembler(max_size=1 << 20)
    results = [assembler.add(chunk_of(p)) for _, p in sent]
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
    client = make_client(broker, data)

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
        training=["prox", "schedule", "scaffold"],  # the local training rules it follows
    )


def test_a_client_not_selected_sends_nothing(model: Model, data: LocalData) -> None:
    # Prepare
    broker = MemoryBroker()
    publish_run(broker, model, selected=["pi-garage"], deadline=time.time() + 60)
    client = make_client(broker, data)

    # Execute
    report = client.run(timeout=0.2)

    # Assert
    assert update_chunks(broker) == []
    assert [t for t, _ in broker.log if t.startswith(TOPICS.root + "/clients/")] == [
        TOPICS.client_status(CLIENT)  # only its hello
    ]
    assert (report.rounds, report.bytes_up) == ([], 0)


def test_a_client_asked_to_stop_leaves_its_loop_within_a_step(
    model: Model, data: LocalData
) -> None:
    # Prepare: a run that would keep the device waiting for a minute; a stop request (what
    # SIGTERM sets) arrives from another thread a moment later
    broker = MemoryBroker()
    publish_run(broker, model, selected=["pi-garage"], deadline=time.time() + 60)
    client = make_client(broker, data)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()

    # Execute
    started = time.monotonic()
    report = client.run(timeout=60, stop=stop)

    # Assert: it left after its current step (the loop waits 0.5 s for a message), not at the end
    assert time.monotonic() - started < 2
    assert not report.finished


def test_a_round_is_timed_by_its_duration_not_by_comparing_clocks(
    model: Model, data: LocalData
) -> None:
    # The coordinator's clock is an hour behind this device's: its deadline looks long gone
    broker = FinishingBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() - 3600, duration=60.0)

    report = make_client(broker, data).run(timeout=10)

    assert report.rounds == [ROUND] and len(update_chunks(broker)) > 0


def test_a_device_that_runs_out_of_a_rounds_time_says_so_once(
    model: Model, data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    broker = MemoryBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 3600, duration=1e-6)

    with caplog.at_level(logging.WARNING, logger="fedprune.client"):
        report = make_client(broker, data).run(timeout=0.3)

    assert report.rounds == [] and update_chunks(broker) == []
    said = [r.getMessage() for r in caplog.records if "time ran out" in r.getMessage()]
    assert said == [
        f"round {ROUND}: its time ran out before this device could train (the round lasts 0 s)"
    ]


def test_a_round_whose_deadline_has_passed_is_skipped(model: Model, data: LocalData) -> None:
    # Prepare
    broker = MemoryBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() - 1)
    client = make_client(broker, data)

    # Execute
    report = client.run(timeout=0.2)

    # Assert
    assert update_chunks(broker) == []
    assert (report.rounds, report.bytes_up) == ([], 0)


def test_a_client_shows_what_it_does_when_that_changes(model: Model, data: LocalData) -> None:
    # Prepare
    broker = FinishingBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60)
    client = make_client(broker, data)
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
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60)

    make_client(broker, data).run(timeout=10)

    sent = update_chunks(broker)
    assembler = Reassembler(max_size=1 << 20)
    payload = [assembler.add(chunk_of(p)) for _, p in sent][-1]
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
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60)
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
        learning_rate: float | None = None,
        correction: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        raise RuntimeError("interpreter lost its tensors")


def test_a_training_that_raises_is_reported_as_a_failed_round_not_a_crash(
    model: Model, data: LocalData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_training, "make_trainer", lambda *a, **k: BrokenTrainer(a[1]))
    broker = MemoryBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)

    report = make_client(broker, data).run(timeout=0.5)

    assert report.failed == 1 and update_chunks(broker) == [
        (t, p) for t, p in broker.log if t.endswith("/failed")
    ]
    ((topic, payload),) = [(t, p) for t, p in broker.log if t.endswith("/failed")]
    assert topic == f"{TOPICS.update(CLIENT, ROUND)}/failed"
    message = decode(payload).message
    assert isinstance(message, Failed)
    assert (message.round, message.reason) == (ROUND, "RuntimeError: interpreter lost its tensors")


def test_a_device_trains_no_more_epochs_than_its_profile_and_ignores_messages_over_its_limit(
    model: Model, data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the run asks 3 epochs; the Pi Zero profile allows 1 epoch, batches of 16 and
    # messages of 128 KiB
    profile = device_profiles.load("raspberry-pi-zero-2w")
    broker = FinishingBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, local_epochs=3)
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
    payload = [assembler.add(chunk_of(p)) for _, p in update_chunks(broker)][-1]
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
    publish_run(broker, big, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
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
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, codec=codec)
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
    payload = [assembler.add(chunk_of(p)) for _, p in update_chunks(broker)][-1]
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
    publish_spec(broker, codec="int8+top0.1+zstd")

    with pytest.raises(
        ConfigError,
        match=r"sends updates as int8\+top0.1\+zstd, which needs zstd"
        r" \(pip install 'fedprune\[edge,zstd\]'\)",
    ):
        make_client(broker, data).run(timeout=5)


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
            coordinator.publish(f"{prefix}/{chunk.index}", encode_message(chunk), retain=True)
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
    coordinator.publish(TOPICS.round, encode_message(announcement), retain=True)
    return whole


@pytest.mark.parametrize("broken", [False, True])
def test_a_device_that_holds_the_last_model_rebuilds_the_next_from_its_change(
    model: Model, data: LocalData, broken: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: the device trained on ``model``; the next one differs a little wherever it keeps
    # weights (and its change is broken: made against another model)
    broker = MemoryBroker()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    client = make_client(broker, data)
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
    update = decode_update([assembler.add(chunk_of(p)) for p in payload][-1] or b"", whole)
    kept = model.masks[0] == 1
    np.testing.assert_allclose(update.deltas[0][kept], 1.0, rtol=1e-5)  # from the new weights
