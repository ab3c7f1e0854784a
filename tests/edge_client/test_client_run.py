"""The run an edge client follows (client.py, run_follower.py): the coordinator's status and
sessions, its last will, runs a device cannot train, and what a waiting device says.
"""

from __future__ import annotations

import dataclasses
import json
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
    FinishingBroker,
    encode_message,
    make_client,
    publish_run,
    publish_spec,
)
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.deploy import DeploymentReceiver
from fedprune.edge_client.run_follower import ClientStats
from fedprune.edge_client.uplink import Identity
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.codec import (
    Model,
)
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.errors import ConfigError
from fedprune.protocol.messages import (
    Deployment,
    Failed,
    Manifest,
    Message,
    Notice,
    Offline,
    Phase,
    Status,
)
from fedprune.protocol.signing import SigningKey, Trust


def test_a_finished_status_of_an_earlier_run_does_not_end_a_new_client(data: LocalData) -> None:
    # Prepare: a retained FINISHED left by an earlier run of the same name
    broker = MemoryBroker()
    status = Status(phase=Phase.FINISHED, round=10, rounds=10)
    MemoryTransport(broker).publish(TOPICS.status, encode_message(status), retain=True)
    client = make_client(broker, data)

    # Execute
    report = client.run(timeout=1.0)

    # Assert: it waits for the run to start again
    assert report.finished is False
    assert report.rounds == []


def test_the_end_of_a_run_it_saw_makes_run_return_at_once(data: LocalData) -> None:
    # Prepare: the client is subscribed while the run goes from waiting to finished
    broker = MemoryBroker()
    client = make_client(broker, data)
    client.start()
    coordinator = MemoryTransport(broker)
    for phase in (Phase.WAITING, Phase.FINISHED):
        status = Status(phase=phase, round=0, rounds=10)
        coordinator.publish(TOPICS.status, encode_message(status), retain=True)
    started = time.monotonic()

    # Execute
    report = client.run(timeout=5)

    # Assert
    assert report.finished is True and report.aborted is False
    assert time.monotonic() - started < 1.0


def test_an_aborted_run_ends_the_client_as_aborted(data: LocalData) -> None:
    broker = MemoryBroker()
    status = Status(phase=Phase.ABORTED, round=0, rounds=10)
    MemoryTransport(broker).publish(TOPICS.status, encode_message(status), retain=True)

    report = make_client(broker, data).run(timeout=5)

    assert report.finished is True and report.aborted is True


def test_a_training_status_does_not_finish_the_client(data: LocalData) -> None:
    # Prepare
    client = make_client(MemoryBroker(), data)
    status = Status(phase=Phase.TRAINING, round=2, rounds=10)

    # Execute
    client.handle(TOPICS.status, encode_message(status))

    # Assert
    assert client.stats.finished is False


def test_a_rejected_notice_is_counted_and_an_accepted_one_is_not(data: LocalData) -> None:
    # Prepare
    client = make_client(MemoryBroker(), data)
    rejected = Notice(round=ROUND, accepted=False, reason="update norm 1e9 exceeds 100")
    accepted = Notice(round=ROUND + 1, accepted=True, reason="")

    # Execute
    client.handle(TOPICS.inbox(CLIENT), encode_message(rejected))
    client.handle(TOPICS.inbox(CLIENT), encode_message(accepted))

    # Assert
    assert client.stats.rejected == 1


def test_a_garbled_message_is_logged_and_ignored(
    data: LocalData, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    client = make_client(MemoryBroker(), data)

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
    publish_run(broker, model, selected=["pi-garage"], deadline=time.time() + 60)
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
    publish_spec(
        broker,
        artifact_error="layer 'bn' (BatchNormalization) is not supported by the litert trainer",
    )
    client = make_client(broker, data, backend="litert", max_payload=256 * 1024)

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
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    publish_spec(broker, artifact_error="layer 'bn' is not supported")
    client = make_client(broker, data, backend="litert", max_payload=256 * 1024)

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
    publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s1"
    )
    bad = dataclasses.replace(data, y=np.full_like(data.y, 40))

    # Execute / Assert: one line and exit 2 without --forever; a failed round with it
    with pytest.raises(ConfigError, match="local labels run from 0 to 40"):
        make_client(broker, bad).run(timeout=1.0)
    client = make_client(broker, bad)
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
    stranger.publish(TOPICS.status, encode_message(status), retain=True)
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


def test_a_new_coordinator_session_is_joined_and_its_rounds_trained_again(
    model: Model, data: LocalData
) -> None:
    # Prepare: the device trained round 3 of session s1; the coordinator restarts (session s2)
    broker = MemoryBroker()
    publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s1"
    )
    client = make_client(broker, data)
    client.run(timeout=0.5)
    assert client.stats.rounds == [ROUND]

    # Execute: the new session announces its own round 3
    status = Status(phase=Phase.TRAINING, round=ROUND, rounds=5, session="s2")
    MemoryTransport(broker).publish(TOPICS.status, encode_message(status), retain=True)
    publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s2"
    )
    client.run(timeout=0.5)

    # Assert: trained again, not skipped as "already done"
    assert client.stats.rounds == [ROUND, ROUND]


def test_the_coordinators_last_will_is_said_and_waited_out(data: LocalData) -> None:
    broker = MemoryBroker()
    client = make_client(broker, data)
    client.start()
    coordinator = MemoryTransport(broker)
    coordinator.publish(
        TOPICS.status, encode_message(Status(phase=Phase.WAITING, round=0, rounds=5)), retain=True
    )
    coordinator.publish(TOPICS.status, encode_message(Offline(who="coordinator")), retain=True)

    while (item := client.transport.get(0.1)) is not None:
        client.handle(*item)

    assert client.waiting_for() == (
        f"the coordinator of run {RUN!r} to come back (its connection dropped)"
    )
    coordinator.publish(
        TOPICS.status, encode_message(Status(phase=Phase.WAITING, round=0, rounds=5)), retain=True
    )
    while (item := client.transport.get(0.1)) is not None:
        client.handle(*item)
    assert "to come back" not in (client.waiting_for() or "")


def test_a_message_of_an_earlier_session_is_ignored(model: Model, data: LocalData) -> None:
    broker = MemoryBroker()
    publish_run(
        broker,
        model,
        selected=[CLIENT],
        deadline=time.time() + 60,
        duration=60.0,
        session="00000002-b",
    )
    client = make_client(broker, data)
    client.run(timeout=0.5)

    old = Status(phase=Phase.FINISHED, round=5, rounds=5, session="00000001-a")  # a replay
    MemoryTransport(broker).publish(TOPICS.status, encode_message(old), retain=True)
    client.run(timeout=0.3)

    assert client.stats.rounds == [ROUND] and not client.stats.finished


def test_a_device_that_serves_forever_trains_the_next_run_even_when_its_model_is_the_same(
    model: Model, data: LocalData
) -> None:
    # Prepare: a run of session s1 that finishes once the device's update arrives
    broker = FinishingBroker()
    publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s1"
    )
    client = make_client(broker, data)
    serving = threading.Thread(target=client.run, kwargs={"timeout": 8, "forever": True})

    # Execute: the same run started again (session s2) once the first one finished
    serving.start()
    end = time.monotonic() + 8
    while client.stats.rounds != [ROUND] and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.7)  # the device takes in the end of the run
    publish_run(
        broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0, session="s2"
    )
    while client.stats.rounds != [ROUND, ROUND] and time.monotonic() < end:
        time.sleep(0.05)
    serving.join()

    # Assert: both runs served by the one process, the same round number trained twice
    assert client.stats.rounds == [ROUND, ROUND]
    assert not client.stats.finished


@pytest.mark.parametrize("made_for", [RUN, "another-run"])
def test_a_signed_deployment_is_installed_only_in_the_run_it_was_made_for(
    models: Path, data: LocalData, tmp_path: Path, made_for: str
) -> None:
    # Prepare: the coordinator's genuine signed deployment of run `made_for`, left retained on
    # this run's deployment topic (anyone on an open broker can replay it there), for a device
    # that joins afterwards
    key = SigningKey.generate()
    broker = MemoryBroker()
    tflite = (models / "int8" / "model.tflite").read_bytes()
    chunks = list(split(tflite, max_chunk=4096))
    manifest = Manifest(topic="t", size=len(tflite), chunks=len(chunks), sha256=sha256(tflite))
    export = json.dumps({"sha256": sha256(tflite), "precision": "int8"})
    deployment = Deployment(
        profile="raspberry-pi-4", model=manifest, precision="int8", accuracy=0.9, export_json=export
    )
    prefix = TOPICS.deploy("raspberry-pi-4")
    replayer = MemoryTransport(broker)
    for chunk in chunks:
        signed = encode(chunk, run=made_for, sender="coordinator", signer=key)
        replayer.publish(f"{prefix}/chunks/{chunk.index}", signed, retain=True)
    signed = encode(deployment, run=made_for, sender="coordinator", signer=key)
    replayer.publish(prefix, signed, retain=True)
    with np.load(models / "digits.npz") as npz:
        receiver = DeploymentReceiver(tmp_path / "installed", sample=npz["x"][:4])
    trust = Trust.of({"coordinator": key.verify_key})
    client = make_client(broker, data, max_payload=256 * 1024, trust=trust, deploy=receiver)

    # Execute
    client.start()
    while (item := client.transport.get(0)) is not None:
        client.handle(*item)

    # Assert: installed in its own run; another run's is refused, every message counted
    if made_for == RUN:
        assert receiver.installed_sha256 == sha256(tflite)
        assert client.stats.replayed == 0
    else:
        assert receiver.installed_sha256 is None
        assert not (tmp_path / "installed").exists()
        assert client.stats.replayed == len(chunks) + 1
        assert client.stats.dropped == 0  # genuine signatures: a replay, not a forgery


def test_a_message_of_an_earlier_coordinator_session_is_refused_as_a_replay(
    data: LocalData,
) -> None:
    # Prepare: the device follows session "0002-b"; session "0001-a"'s genuine FINISHED comes again
    key = SigningKey.generate()
    broker = MemoryBroker()
    client = make_client(broker, data, trust=Trust.of({"coordinator": key.verify_key}))

    def signed(message: Message, session: str) -> bytes:
        return encode(message, run=RUN, sender="coordinator", signer=key, session=session)

    client.handle(TOPICS.status, signed(Status(phase=Phase.WAITING, round=0, rounds=3), "0002-b"))

    # Execute
    client.handle(TOPICS.status, signed(Status(phase=Phase.FINISHED, round=3, rounds=3), "0001-a"))

    # Assert: refused and counted, the run goes on
    assert client.stats.replayed == 1
    assert client.stats.finished is False
    assert client.following.session == "0002-b"
