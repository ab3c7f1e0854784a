"""An edge client's resends (uplink.py): an update with no notice is sent again, doubling, and
never while the coordinator is away.
"""

from __future__ import annotations

import time

from client_harness import (
    CLIENT,
    ROUND,
    TOPICS,
    chunk_of,
    encode_message,
    make_client,
    publish_run,
    update_chunks,
)
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.edge_client.client import EdgeClient
from fedprune.edge_client.data import LocalData
from fedprune.edge_client.uplink import resend_wait
from fedprune.protocol.codec import (
    Model,
)
from fedprune.protocol.envelope import decode
from fedprune.protocol.messages import (
    Hello,
    Manifest,
    Notice,
    Offline,
    Phase,
    Round,
    Status,
    Unanswered,
)
from fedprune.protocol.transport import ConnectionChange, ConnectionEvent


def _copies(broker: MemoryBroker) -> list[str]:
    """The payload SHA-256 of each first chunk the device published: one per copy of its update."""
    return [chunk_of(p).sha256 for t, p in update_chunks(broker) if t.endswith("/0")]


def _claim(broker: MemoryBroker) -> Unanswered | None:
    hello = decode(broker.retained[TOPICS.client_status(CLIENT)]).message
    assert isinstance(hello, Hello)
    return hello.unanswered


def _resending_client(broker: MemoryBroker, data: LocalData, after: float) -> EdgeClient:
    client = make_client(broker, data)
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
    publish_run(
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
                super().route(TOPICS.inbox(CLIENT), encode_message(notice), False)

    broker = Answering()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
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
                super().route(TOPICS.status, encode_message(Offline(who="coordinator")), True)

    broker = Dropping()
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 60, duration=60.0)
    client = _resending_client(broker, data, 1.0)

    # Execute: away for 1.5 s, longer than the device waits; then back, and it waits 1 s from then
    client.start()
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        client.run(timeout=0.05)
    away = len(_copies(broker))
    back = Status(phase=Phase.TRAINING, round=ROUND, rounds=ROUND)
    MemoryTransport(broker).publish(TOPICS.status, encode_message(back), retain=True)
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
    publish_run(broker, model, selected=[CLIENT], deadline=time.time() + 120, duration=120.0)
    client = make_client(broker, data)
    client.run(timeout=0.3)

    # Execute: its connection drops and comes back (a broker restart)
    client.transport._events.append(
        ConnectionEvent(change=ConnectionChange.RESTORED, detail="reconnected after 3.0 s")
    )
    report = client.run(timeout=0.3)

    # Assert: sent again at once, without claiming it went unanswered
    assert len(_copies(broker)) == 2 and report.resent == 1
    assert _claim(broker) is None
