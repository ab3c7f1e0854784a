"""The round's telemetry on the broker (telemetry.py) as the round loop feeds it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from round_harness import ROUND, TOPICS, Harness, random_delta, update_payload

from fedprune.protocol.codec import Model
from fedprune.protocol.envelope import decode
from fedprune.protocol.messages import Round, Snapshot


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
