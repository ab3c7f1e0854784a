"""Signed messages replayed out of their context on an open mosquitto (issue 22): a genuine
deployment of one run, copied onto another run's topics, is not installed by that run's devices,
not even by one that joins later and finds it retained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from fedprune.coordinator.downlink import Downlink
from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.deploy import DeploymentReceiver
from fedprune.edge_client.uplink import Identity
from fedprune.protocol.chunks import sha256
from fedprune.protocol.messages import Hello
from fedprune.protocol.signing import SigningKey, Trust
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROFILE = "raspberry-pi-4"


def _tflite() -> bytes:
    """A small classifier, as an export is: 8 inputs, 3 class scores."""
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [tf_keras.layers.Input((8,)), tf_keras.layers.Dense(3, activation="softmax")]
    )
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def _deploy(url: str, run: str, key: SigningKey, tflite: bytes) -> None:
    """Run ``run``'s coordinator deploys ``tflite`` to the profile, as at the end of a run."""
    transport = MqttTransport(url, client_id=f"coordinator-{run}")
    downlink = Downlink(transport, Topics(run), signer=key, session="0000000001-0a")
    device = Hello(client_id="pi-1", profile=PROFILE, num_samples=10, backend="litert")
    export = json.dumps({"sha256": sha256(tflite), "precision": "float32"})
    downlink.deploy(
        PROFILE,
        tflite,
        [device],
        limit=64 * 1024,
        precision="float32",
        accuracy=0.9,
        export_json=export,
    )
    assert transport.flush(timeout=10)
    transport.close()


def _replay(url: str, source: str, target: str) -> int:
    """Copy ``source``'s retained deployment messages, byte for byte, onto ``target``'s topics
    (anyone can on an open broker); how many."""
    copier = MqttTransport(url, client_id="replayer")
    src, dst = Topics(source), Topics(target)
    copier.subscribe(f"{src.deploy(PROFILE)}/#")
    copier.subscribe(src.deploy(PROFILE))
    copied = 0
    while (item := copier.get(timeout=2.0)) is not None:
        topic, payload = item
        copier.publish(dst.root + topic.removeprefix(src.root), payload, retain=True)
        copied += 1
    assert copier.flush(timeout=10)
    copier.close()
    return copied


@pytest.mark.parametrize("deployed_by", ["garden", "kitchen"])
def test_a_deployment_replayed_from_another_run_is_not_installed_by_a_device_joining_later(
    mosquitto: str, tmp_path: Path, deployed_by: str
) -> None:
    # Prepare: one coordinator key for both runs (one provisioned fleet); run "kitchen"'s device
    # starts after the deployment is retained: run "kitchen"'s own, or run "garden"'s copied
    key = SigningKey.generate()
    tflite = _tflite()
    _deploy(mosquitto, deployed_by, key, tflite)
    if deployed_by != "kitchen":
        assert _replay(mosquitto, deployed_by, "kitchen") >= 2  # the deployment and its chunks
    rng = np.random.default_rng(0)
    data = LocalData(
        x=rng.normal(size=(6, 8)).astype(np.float32),
        y=rng.integers(0, 3, size=6),
        x_test=rng.normal(size=(2, 8)).astype(np.float32),
        y_test=rng.integers(0, 3, size=2),
    )
    receiver = DeploymentReceiver(tmp_path / "installed", sample=data.x[:2])
    identity = Identity(
        run="kitchen", client_id="pi-1", profile=PROFILE, num_samples=6, backend="litert"
    )
    transport = MqttTransport(mosquitto, client_id="pi-1")
    client = EdgeClient(
        transport,
        identity=identity,
        data=data,
        trust=Trust.of({"coordinator": key.verify_key}),
        deploy=receiver,
    )

    # Execute
    try:
        stats = client.run(timeout=4.0)
    finally:
        transport.close()

    # Assert: its own run's deployment is installed; the other run's is refused and counted
    if deployed_by == "kitchen":
        assert receiver.installed_sha256 == sha256(tflite)
        assert stats.replayed == 0
    else:
        assert receiver.installed_sha256 is None
        assert stats.replayed >= 2 and stats.dropped == 0
