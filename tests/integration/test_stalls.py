"""A coordinator that stalls mid-round loses nothing (issue 20), on a real mosquitto.

Its MQTT session is kept on the broker across a dropped connection, and paho's network thread never
waits for the reader, so: a reader held up longer than the broker's keepalive grace while a burst
arrives, and a whole coordinator process stopped for a minute, each count every update exactly
once, and the round ends when the last one is in, not at its deadline.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tf_keras
from processes import coordinator as coordinator_command
from processes import litert, start_device

from fedprune.coordinator import models
from fedprune.coordinator.config import RunConfig, ScheduleConfig, ScheduleKind
from fedprune.coordinator.digits import write_demo_data
from fedprune.coordinator.observer import Observer
from fedprune.coordinator.parts import Parts
from fedprune.coordinator.pruning import Pruner
from fedprune.coordinator.rounds import Coordinator
from fedprune.protocol.chunks import Collector, split_to_fit
from fedprune.protocol.codec import Update, decode_model, encode_update
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import Chunk, Hello, Round
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import ConnectionEvent, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Burst:
    """``count`` devices on one MQTT connection: retained hellos, then, when the round is
    announced, a distinct valid update from each, as fast as the broker takes them."""

    def __init__(self, url: str, run: str, count: int) -> None:
        self.topics = Topics(run)
        self.run = run
        self.ids = [f"dev-{i:04d}" for i in range(count)]
        self.transport = MqttTransport(url, client_id=f"burst-{run}")
        self.sent = 0
        for device in self.ids:
            hello = Hello(
                client_id=device, profile="generic-x86-64", num_samples=10, backend="keras"
            )
            self.publish(self.topics.client_status(device), hello, device, retain=True)
        self.transport.subscribe(self.topics.round)
        self.transport.subscribe(self.topics.all_models)
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def publish(
        self,
        topic: str,
        message: Hello | Chunk,
        device: str,
        *,
        retain: bool = False,
        session: str = "",
    ) -> None:
        payload = encode(message, run=self.run, sender=device, session=session)
        self.transport.publish(topic, payload, retain=retain)

    def _answer(self) -> None:
        collector, models_, announced = Collector(), {}, None
        while announced is None or announced.model.sha256 not in models_:
            item = self.transport.get(60)
            assert item is not None, "no round announced within 60 s"
            message = decode(item[1]).message
            if isinstance(message, Round):
                announced = message
            elif isinstance(message, Chunk) and (whole := collector.add(message)) is not None:
                models_[message.sha256] = decode_model(whole)
        model = models_[announced.model.sha256]
        deltas = [np.full(w.shape, 1e-4, np.float32) for w in model.weights]
        for number, device in enumerate(self.ids):
            deltas[-1].flat[0] = number * 1e-6  # no two payloads alike
            update = Update(round=announced.round, num_samples=10, deltas=deltas)
            payload = encode_update(update, model.masks)
            for chunk in split_to_fit(payload, max_payload=self.transport.max_payload):
                topic = f"{self.topics.update(device, announced.round)}/{chunk.index}"
                self.publish(topic, chunk, device, session=announced.session)
            self.sent += 1
        self.transport.flush(timeout=60)

    def close(self) -> None:
        self._thread.join(60)
        self.transport.close()


class Connections(Observer):
    def __init__(self) -> None:
        self.events: list[ConnectionEvent] = []

    def connection(self, event: ConnectionEvent) -> None:
        self.events.append(event)


def test_a_reader_held_up_past_the_keepalive_grace_during_a_burst_loses_no_update(
    mosquitto: str,
) -> None:
    # Prepare: a coordinator with a 2 s keepalive (mosquitto drops a client silent for 3 s) and
    # 2,000 devices whose updates (about 72 MB, more than the 64 MiB that paho's network thread
    # used to hold before it stopped reading) arrive while the reader is held for 5 s
    devices, run = 2000, "stall"
    model: tf_keras.Model = models.build("mlp", seed=0)
    config = RunConfig(
        run=run,
        model="mlp",
        rounds=1,
        min_clients=devices,
        round_timeout=300.0,
        quorum=1.0,
        join_timeout=60.0,
        schedule=ScheduleConfig(kind=ScheduleKind.CONSTANT, target=0.5, begin_round=1),
    )
    transport = MqttTransport(
        mosquitto, client_id="fedprune-coordinator-stall", keepalive=2, persistent=True
    )
    pruner = Pruner(model, config.schedule)
    coordinator = Coordinator(Parts.build(transport, config, pruner), pruner, evaluate=lambda: None)
    connections = Connections()
    coordinator.observer.observers.append(connections)
    handle, held = coordinator.inbox.handle, threading.Event()

    def held_up(topic: str, payload: bytes) -> None:
        if not held.is_set() and coordinator.topics.parse_update(topic) is not None:
            held.set()
            time.sleep(5)  # the reader is busy; the burst goes on
        handle(topic, payload)

    coordinator.inbox.handle = held_up  # type: ignore[method-assign]
    burst = Burst(mosquitto, run, devices)

    # Execute
    try:
        coordinator.start()
        coordinator.wait_for_clients(coordinator.config.min_clients)
        result = coordinator.run_round(1)
    finally:
        burst.close()
        transport.close()

    # Assert: every update counted once, the round ended when the last was in, and the broker
    # never dropped the coordinator
    assert held.is_set()
    assert (result.reported, result.rejected, result.late) == (devices, {}, 0)
    assert burst.sent == devices
    assert result.seconds < 120
    assert connections.events == []


def test_a_coordinator_stopped_for_a_minute_mid_round_counts_every_update_once(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: three litert devices that would not resend for 5 minutes (only the kept session
    # can bring their updates), and a coordinator of three rounds
    paths, heldout = write_demo_data(tmp_path / "data", 3, alpha=0.5, seed=1)
    run_dir = tmp_path / "runs" / "paused"
    argv = coordinator_command(
        mosquitto,
        "-q",
        run="paused",
        out=tmp_path / "runs",
        heldout=heldout,
        rounds=3,
        min_clients=3,
        round_timeout=300,
        install_wait=0,
        begin_round=1,
        end_round=2,
    )
    coordinator = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    devices = [
        start_device(
            mosquitto, "paused", f"pi-{i}", path, *litert(i, tmp_path), "--resend-after", "300"
        )
        for i, path in enumerate(paths)
    ]
    watcher = MqttTransport(mosquitto, client_id="watcher")
    watcher.subscribe(Topics("paused").round)

    # Execute: hold the coordinator still for 60 s as soon as it announces round 2 (the
    # broker drops it after 45 s without a keepalive), while the devices train and send
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end and coordinator.poll() is None:
            item = watcher.get(0.5)
            if item and item[1] and getattr(decode(item[1]).message, "round", 0) == 2:
                break
        coordinator.send_signal(signal.SIGSTOP)
        time.sleep(60)
        coordinator.send_signal(signal.SIGCONT)
        _, err = coordinator.communicate(timeout=400)
    finally:
        watcher.close()
        for process in [coordinator, *devices]:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()

    # Assert: round 2 counted each device's update once and ended once they were in, well
    # before its 300 s deadline; the log says the connection was lost and the session kept
    assert coordinator.returncode == 0, err[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(line) for line in lines]
    second = rounds[1]
    assert (second["reported"], second["rejected"], second["late"]) == (3, {}, 0)
    assert 55 < second["seconds"] < 150
    assert "lost the connection to the MQTT broker" in err
    assert "the broker kept this client's session" in err
