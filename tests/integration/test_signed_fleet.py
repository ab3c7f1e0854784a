"""Signed messages end to end on an open broker (no TLS, no ACL): a stranger who can publish
anything cannot speak for the coordinator or for a device (issue 9, the second layer)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fedprune.coordinator import digits
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.messages import Chunk, Deployment, Manifest, Phase, Round, Status
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
RUN = "signed"


class Stranger(threading.Thread):
    """Waits for round 1, then forges, none of it signed: from the 'coordinator' a retained
    FINISHED status, a round, a model chunk and a deployment (a model of its own for the
    devices' profile); from 'pi-1', on pi-1's topic, an update chunk."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.topics = Topics(RUN)
        self.transport = MqttTransport(url, client_id="stranger")
        self.transport.subscribe(self.topics.round)
        self.forged = threading.Event()

    def run(self) -> None:
        while not self.forged.is_set():
            item = self.transport.get(timeout=0.5)
            if item is None or not item[1]:
                continue
            announcement = decode(item[1]).message
            if not isinstance(announcement, Round):
                continue
            finished = Status(phase=Phase.FINISHED, round=9, rounds=9)
            self.transport.publish(
                self.topics.status, encode(finished, run=RUN, sender="coordinator"), retain=True
            )
            fake = Round(
                round=announcement.round,
                model_version=99,
                deadline=announcement.deadline,
                draw=announcement.draw,
                cutoff=announcement.cutoff,
                model=announcement.model,
                local_epochs=1,
            )
            self.transport.publish(self.topics.round, encode(fake, run=RUN, sender="coordinator"))
            chunk = Chunk(index=0, count=1, size=4, sha256="0" * 64, data=b"evil")
            self.transport.publish(
                f"{self.topics.update('pi-1', announcement.round)}/0",
                encode(chunk, run=RUN, sender="pi-1"),
            )
            self.transport.publish(
                f"{announcement.model.topic}/0", encode(chunk, run=RUN, sender="coordinator")
            )
            model = b"a tflite file of the stranger's"
            prefix = f"{self.topics.deploy('raspberry-pi-4')}/chunks"
            (evil,) = split(model, max_chunk=1 << 20)
            self.transport.publish(
                f"{prefix}/0", encode(evil, run=RUN, sender="coordinator"), retain=True
            )
            manifest = Manifest(topic=prefix, size=len(model), chunks=1, sha256=sha256(model))
            deployment = Deployment(
                profile="raspberry-pi-4",
                model=manifest,
                precision="float32",
                accuracy=1.0,
                export_json="{}",
            )
            self.transport.publish(
                self.topics.deploy("raspberry-pi-4"),
                encode(deployment, run=RUN, sender="coordinator"),
                retain=True,
            )
            self.transport.flush(timeout=5)
            self.forged.set()


def test_forgeries_on_an_open_broker_are_dropped_and_the_run_is_unharmed(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: keys from fedprune-provision; the broker here is open (no TLS, no ACL)
    fleet = tmp_path / "fleet"
    provisioned = subprocess.run(
        [
            BIN / "fedprune-provision",
            "init",
            fleet,
            "--host",
            "127.0.0.1",
            "--devices",
            "2",
            "--prefix",
            "pi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert provisioned.returncode == 0, provisioned.stderr
    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    stranger = Stranger(mosquitto)
    stranger.start()
    coordinator = subprocess.Popen(
        [
            BIN / "fedprune-coordinator",
            "--broker",
            mosquitto,
            "--run",
            RUN,
            "--min-clients",
            "2",
            "--rounds",
            "3",
            "--begin-round",
            "1",
            "--end-round",
            "2",
            "--heldout",
            heldout,
            "--out",
            tmp_path / "runs",
            "--signing-key",
            fleet / "coordinator/signing.key",
            "--device-keys",
            fleet / "coordinator/device-keys",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Execute
    devices = [
        subprocess.Popen(
            [
                BIN / "fedprune-client",
                "--broker",
                mosquitto,
                "--run",
                RUN,
                "--id",
                f"pi-{i}",
                "--data",
                data,
                "--profile",
                "raspberry-pi-4",
                "--models",
                tmp_path / f"m-{i}",
                "--cache",
                tmp_path / "cache",
                "--signing-key",
                fleet / f"devices/pi-{i}/signing.key",
                "--coordinator-key",
                fleet / f"devices/pi-{i}/coordinator.pub",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, data in zip((1, 2), paths, strict=True)
    ]
    logs = [device.communicate(timeout=300)[0] for device in devices]
    _, err = coordinator.communicate(timeout=300)
    stranger.join(timeout=5)

    # Assert: every round had both devices; the forged update was dropped as unsigned; the
    # devices dropped the forged status and round and ended normally
    assert stranger.forged.is_set()
    assert coordinator.returncode == 0, err[-3000:]
    assert [d.returncode for d in devices] == [0, 0], "\n".join(log[-2000:] for log in logs)
    rounds = [json.loads(line) for line in (tmp_path / "runs" / RUN / "metrics.jsonl").open()]
    assert [r["reported"] for r in rounds] == [2, 2, 2]
    assert sum(r["rejected"].get("signature", 0) for r in rounds) == 1
    assert all("unsigned message from 'coordinator'" in log for log in logs)
    exported = (tmp_path / "runs" / RUN / "export" / "raspberry-pi-4" / "model.tflite").read_bytes()
    for i in (1, 2):  # each installed the coordinator's export, not the stranger's file
        assert (tmp_path / f"m-{i}" / "raspberry-pi-4" / "model.tflite").read_bytes() == exported
