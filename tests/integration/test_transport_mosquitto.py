"""The transport against a real mosquitto, over MQTT 3.1.1 and MQTT 5."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from processes import demo

from fedprune.coordinator.broker import EmbeddedBroker
from fedprune.protocol.chunks import Reassembler, split
from fedprune.protocol.envelope import decode, encode
from fedprune.protocol.errors import OversizeError
from fedprune.protocol.messages import Chunk
from fedprune.protocol.transport import MqttTransport

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("scheme", ["mqtt", "mqtt5"])
def test_chunked_payload_and_retained_message_arrive_intact(mosquitto: str, scheme: str) -> None:
    # Prepare
    url = mosquitto.replace("mqtt://", f"{scheme}://")
    payload = os.urandom(300_000)
    sender = MqttTransport(url, client_id="sender", max_payload=64 * 1024)
    receiver = MqttTransport(url, client_id="receiver")
    receiver.subscribe("t/chunks/#")

    # Execute
    for chunk in split(payload, max_chunk=60_000):
        sender.publish(f"t/chunks/{chunk.index}", encode(chunk, run="r", sender="s"))
    sender.publish("t/retained", b"state", retain=True)
    assert sender.flush(timeout=10)
    late = MqttTransport(url, client_id="late")
    late.subscribe("t/retained")
    assembler = Reassembler(max_size=1_000_000)
    result = None
    while result is None and (item := receiver.get(timeout=5)) is not None:
        message = decode(item[1]).message
        assert isinstance(message, Chunk)
        result = assembler.add(message)
    retained = late.get(timeout=5)
    for transport in (sender, receiver, late):
        transport.close()

    # Assert
    assert result == payload
    assert retained == ("t/retained", b"state")


def test_a_full_inbox_does_not_hold_up_a_flush_a_subscribe_or_close(mosquitto: str) -> None:
    # Prepare: a reader that takes nothing while a burst fills its 100 kB inbox, so that paho's
    # network thread waits to hand over the next message
    reader = MqttTransport(mosquitto, client_id="reader", inbox_bytes=100_000)
    reader.subscribe("burst/#")
    sender = MqttTransport(mosquitto, client_id="sender")
    for i in range(40):
        sender.publish(f"burst/{i}", os.urandom(20_000))
    assert sender.flush(timeout=10)
    deadline = time.monotonic() + 10
    while reader.inbox._held < 100_000 // 2 and time.monotonic() < deadline:
        time.sleep(0.05)

    # Execute: the reader publishes and waits for the acknowledgement, subscribes, and quits
    started = time.monotonic()
    reader.publish("reply", b"done")
    acked = reader.flush(timeout=10)
    reader.subscribe("other")
    reader.close()
    took = time.monotonic() - started
    sender.close()

    # Assert
    assert acked
    assert took < 5
    assert reader.get(timeout=0.1) is not None  # what was received is still there to take


@pytest.mark.parametrize("scheme", ["mqtt", "mqtt5"])
def test_a_reader_stuck_past_the_keepalive_grace_is_not_dropped_and_loses_nothing(
    mosquitto: str, scheme: str
) -> None:
    # Prepare: a reader with a 2 s keepalive (mosquitto drops a client silent for 3 s) and a
    # 100 kB inbox that takes nothing for 6 s while 300 messages of 20 kB are published
    url = mosquitto.replace("mqtt://", f"{scheme}://")
    reader = MqttTransport(url, client_id="reader", keepalive=2, inbox_bytes=100_000)
    reader.subscribe("burst/#")
    sender = MqttTransport(url, client_id="sender")
    for i in range(300):
        sender.publish(f"burst/{i}", i.to_bytes(2, "big") + os.urandom(20_000))
    assert sender.flush(timeout=10)

    # Execute
    time.sleep(6)
    held = len(reader.inbox)
    numbers = [int.from_bytes(m[1][:2], "big") for m in iter(lambda: reader.get(2.0), None)]
    events = reader.connection_events()
    reader.close()
    sender.close()

    # Assert: the network thread went on answering the broker (a message taken in over the
    # bound every half second), so it was never dropped, and every message came, in order
    assert events == []
    assert held <= 100_000 // 20_000 + 6 / 0.5 + 2
    assert numbers == list(range(300))


def test_payload_over_the_broker_limit_is_refused_before_it_is_sent() -> None:
    # Prepare: over MQTT 3.1.1, mosquitto acknowledges and silently drops a message over
    # message_size_limit; paho 2.2 itself would resend an oversize publish forever
    with EmbeddedBroker("mosquitto", message_size_limit=10_000) as broker:
        sender = MqttTransport(broker.url, client_id="sender", max_payload=10_000)
        receiver = MqttTransport(broker.url, client_id="receiver")
        receiver.subscribe("t/#")

        # Execute
        with pytest.raises(OversizeError, match="20000 bytes"):
            sender.publish("t/big", b"x" * 20_000)
        sender.publish("t/small", b"y" * 9_000)
        received = receiver.get(timeout=5)
        sender.close()
        receiver.close()

    # Assert: only the small one went out
    assert received == ("t/small", b"y" * 9_000)


@pytest.mark.slow
def test_a_short_run_works_over_mqtt5(mosquitto: str, tmp_path: Path) -> None:
    url = mosquitto.replace("mqtt://", "mqtt5://")
    command = demo(
        url, out=tmp_path, run="v5", clients=2, rounds=3, begin_round=1, end_round=2, target=0.5
    )

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr[-3000:]
    last = (tmp_path / "v5" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"reported": 2' in last


@pytest.mark.parametrize("scheme", ["mqtt", "mqtt5"])
def test_a_retained_update_is_dropped_and_cleared_and_live_ones_still_come(
    mosquitto: str, scheme: str
) -> None:
    # Prepare: a device (or whoever holds its bundle) leaves an update chunk retained
    url = mosquitto.replace("mqtt://", f"{scheme}://")
    topic = "fedprune/v1/r/clients/pi-1/update/1/0"
    device = MqttTransport(url, client_id="pi-1")
    device.publish(topic, b"kept for every later session", retain=True)
    assert device.flush(timeout=5)

    # Execute: a coordinator subscribes to the update topics without retained messages
    coordinator = MqttTransport(url, client_id="coordinator")
    coordinator.subscribe("fedprune/v1/r/clients/+/update/#", retained=False)
    stale = coordinator.get(timeout=1.0)
    assert coordinator.flush(timeout=5)
    later = MqttTransport(url, client_id="later")
    later.subscribe("fedprune/v1/r/clients/+/update/#")
    device.publish(topic, b"live")
    device.flush(timeout=5)

    # Assert: not handed over, cleared from the broker (a later subscriber finds nothing
    # retained), and a live update still arrives
    assert stale is None and coordinator.stale_retained == 1
    assert later.get(timeout=2.0) == (topic, b"live")
    assert coordinator.get(timeout=5.0) == (topic, b"live")
    for transport in (device, coordinator, later):
        transport.close()
