"""The transport interface: size limits, broker URLs, and giving up on an unreachable broker."""

from __future__ import annotations

import queue
import threading
import time

import pytest
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.protocol.errors import BrokerError, ConfigError, OversizeError
from fedprune.protocol.transport import BrokerUrl, Inbox, MqttTransport


def test_an_oversize_payload_is_refused_before_it_is_sent() -> None:
    # Prepare
    broker = MemoryBroker()
    transport = MemoryTransport(broker, max_payload=1024)

    # Execute
    with pytest.raises(
        OversizeError, match="payload of 1025 bytes on a/b exceeds the maximum 1024"
    ):
        transport.publish("a/b", b"x" * 1025)

    # Assert
    assert broker.log == []
    assert broker.retained == {}


def test_a_payload_of_exactly_the_maximum_is_sent() -> None:
    # Prepare
    broker = MemoryBroker()
    transport = MemoryTransport(broker, max_payload=1024)

    # Execute
    transport.publish("a/b", b"x" * 1024)

    # Assert
    assert broker.log == [("a/b", b"x" * 1024)]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://h:1", BrokerUrl(host="h", port=1, mqtt5=False)),
        ("mqtt5://h:2", BrokerUrl(host="h", port=2, mqtt5=True)),
        ("h:3", BrokerUrl(host="h", port=3, mqtt5=False)),
        ("mqtt://broker.local", BrokerUrl(host="broker.local", port=1883, mqtt5=False)),
        ("mqtts://broker.local", BrokerUrl(host="broker.local", port=8883, mqtt5=False, tls=True)),
        ("mqtts5://b:9", BrokerUrl(host="b", port=9, mqtt5=True, tls=True)),
    ],
)
def test_broker_url_accepts_mqtt_and_mqtt5_and_bare_host_port(
    url: str, expected: BrokerUrl
) -> None:
    # Execute
    parsed = BrokerUrl.parse(url)

    # Assert
    assert parsed == expected


def test_broker_url_prints_as_it_is_parsed() -> None:
    # Execute / Assert
    assert str(BrokerUrl.parse("mqtt5://10.0.0.2:8883")) == "mqtt5://10.0.0.2:8883"
    assert str(BrokerUrl.parse("pi.local:1884")) == "mqtt://pi.local:1884"
    assert str(BrokerUrl.parse("mqtts5://b")) == "mqtts5://b:8883"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://x", "scheme must be mqtt://, mqtts://, mqtt5:// or mqtts5://"),
        ("mqtt://h:port", "bad port"),
        ("mqtt://h:70000", "bad port"),
        ("mqtt://:1883", "no host"),
    ],
)
def test_broker_url_rejects_other_schemes_and_bad_ports(url: str, fragment: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=f"broker URL '{url}': {fragment}"):
        BrokerUrl.parse(url)


def test_an_unreachable_broker_is_a_broker_error_naming_the_url(free_port: int) -> None:
    # Prepare
    url = f"mqtt://127.0.0.1:{free_port}"
    started = time.monotonic()

    # Execute
    with pytest.raises(BrokerError) as caught:
        MqttTransport(url, client_id="pi-test", connect_attempts=2)

    # Assert
    assert str(caught.value).startswith(f"cannot reach the MQTT broker at {url} after 2 attempts")
    assert time.monotonic() - started < 3.0


def test_the_inbox_holds_at_most_its_limit_and_a_put_waits_for_room() -> None:
    # Prepare: room for 100 payload bytes, 80 taken
    inbox = Inbox(100)
    inbox.put(("t", b"x" * 80))
    waiting = threading.Thread(target=inbox.put, args=(("t", b"y" * 40),))

    # Execute: the second put waits until the first message is taken
    waiting.start()
    waiting.join(0.3)
    blocked = waiting.is_alive()
    first = inbox.get(timeout=1)
    waiting.join(5)

    # Assert
    assert blocked and not waiting.is_alive()
    assert first == ("t", b"x" * 80)
    assert inbox.get(timeout=1) == ("t", b"y" * 40)
    inbox.put(("t", b"z" * 500))  # alone in the queue: taken whatever its size
    assert len(inbox.get(timeout=1)[1]) == 500
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.05)


def test_a_put_waiting_for_room_goes_on_while_unbounded_and_drops_after_close() -> None:
    # Prepare: a full inbox
    inbox = Inbox(100)
    inbox.put(("t", b"x" * 80))
    unbounded = threading.Thread(target=inbox.put, args=(("t", b"y" * 40),))
    dropped = threading.Thread(target=inbox.put, args=(("t", b"z" * 40),))

    # Execute
    with inbox.unbounded():
        unbounded.start()
        unbounded.join(5)
    dropped.start()
    dropped.join(0.3)
    blocked = dropped.is_alive()
    inbox.close()
    dropped.join(5)

    # Assert
    assert not unbounded.is_alive()
    assert blocked and not dropped.is_alive()
    assert [inbox.get(timeout=1)[1][:1] for _ in range(2)] == [b"x", b"y"]
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.05)


def test_a_put_waits_for_room_no_longer_than_its_patience_at_a_time() -> None:
    # Prepare: a full inbox whose reader takes nothing; puts wait at most 0.2 s each
    inbox = Inbox(100, patience=0.2)
    inbox.put(("t", b"x" * 80))
    started = time.monotonic()

    # Execute: the network thread goes on, a message per slice
    for i in range(3):
        inbox.put(("t", bytes([i]) * 40))
    took = time.monotonic() - started

    # Assert
    assert 0.5 < took < 2.0
    assert inbox.overdrawn == 3
    assert [len(inbox.get(timeout=1)[1]) for _ in range(4)] == [80, 40, 40, 40]
