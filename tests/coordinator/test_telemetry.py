"""The device ledger and the telemetry snapshots built from the round loop's hooks."""

from __future__ import annotations

import numpy as np

from fedprune.coordinator.config import RunConfig
from fedprune.coordinator.ledger import EVENTS, TEXT, Ledger
from fedprune.coordinator.result import RoundResult
from fedprune.coordinator.telemetry import Telemetry
from fedprune.protocol.codec import Update
from fedprune.protocol.messages import Hello, Phase, Snapshot
from fedprune.protocol.transport import ConnectionChange, ConnectionEvent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hello(client_id: str, installed: str | None = None) -> Hello:
    return Hello(
        client_id=client_id,
        profile="raspberry-pi-4",
        num_samples=120,
        backend="litert",
        installed=installed,
    )


def _update(**metrics: float) -> Update:
    return Update(round=1, num_samples=10, deltas=[np.zeros(2, np.float32)], metrics=metrics)


def _result(round_: int, accuracy: float | None = 0.9) -> RoundResult:
    return RoundResult(
        round=round_,
        accuracy=accuracy,
        loss=0.3,
        client_accuracy=0.8,
        client_loss=0.4,
        sparsity=0.5,
        bytes_up=100,
        bytes_down=200,
        dense_bytes_up=400,
        dense_bytes_down=400,
        selected=2,
        reported=1,
        rejected={"norm": 1},
        seconds=1.5,
    )


def test_ledger_follows_a_device_through_a_round() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock)

    ledger.hello(_hello("pi-1"))
    ledger.selected(["pi-1", "stranger"], bytes_down=5000)
    clock.now += 3
    ledger.received("pi-1", 700)
    ledger.received("stranger", 99)  # never said hello: not in the ledger
    ledger.accepted(
        "pi-1", _update(train_seconds=0.25, peak_memory_mb=71.5, accuracy=0.9, n_eval=20)
    )

    (row,) = ledger.rows()
    assert (row.id, row.profile, row.trainer, row.samples, row.online) == (
        "pi-1",
        "raspberry-pi-4",
        "litert",
        120,
        True,
    )
    assert (row.selected, row.reported, row.bytes_up, row.bytes_down) == (1, 1, 700, 5000)
    assert (row.train_seconds, row.peak_memory_mb, row.accuracy) == (0.25, 71.5, 0.9)
    assert (row.joined, row.last_seen) == (1000.0, 1003.0)


def test_ledger_counts_rejections_lateness_and_departures_with_events() -> None:
    ledger = Ledger(clock=Clock())
    ledger.hello(_hello("pi-1"))

    ledger.rejected("pi-1", "norm", "update norm 1e9 exceeds 1e4")
    ledger.late(["pi-1"], 4)
    ledger.left("pi-1")
    ledger.hello(_hello("pi-1"))

    (row,) = ledger.rows()
    assert (row.rejected, row.last_reason, row.late, row.online) == (
        1,
        "norm: update norm 1e9 exceeds 1e4",
        1,
        True,
    )
    kinds = [(e.kind, e.device, e.text) for e in ledger.events]
    assert kinds == [
        ("join", "pi-1", "raspberry-pi-4, 120 samples, litert"),
        ("reject", "pi-1", "norm: update norm 1e9 exceeds 1e4"),
        ("late", "pi-1", "no update for round 4 when it closed"),
        ("leave", "pi-1", "went offline"),
        ("join", "pi-1", "back online"),
    ]


def test_ledger_shows_the_installed_model_with_its_export_accuracy() -> None:
    ledger = Ledger(clock=Clock())
    ledger.hello(_hello("pi-1"))
    ledger.deployed("ab" * 32, 0.9711)

    ledger.hello(_hello("pi-1", installed="ab" * 32))

    (row,) = ledger.rows()
    assert (row.model, row.model_accuracy) == ("ab" * 32, 0.9711)
    assert ledger.events[-1].kind == "install"


def test_a_full_ledger_forgets_the_longest_gone_device_and_keeps_online_ones() -> None:
    clock = Clock()
    ledger = Ledger(clock=clock, max_devices=3)
    for name in ("a", "b", "c"):
        clock.now += 1
        ledger.hello(_hello(name))
    ledger.left("b")
    clock.now += 1
    ledger.left("a")

    ledger.hello(_hello("d"))  # replaces b, gone first
    ledger.hello(_hello("e"))  # replaces a
    ledger.hello(_hello("f"))  # nobody offline: not listed

    assert [row.id for row in ledger.rows()] == ["c", "d", "e"]


def test_long_texts_from_devices_are_cut() -> None:
    ledger = Ledger(clock=Clock())
    ledger.hello(Hello(client_id="pi-1", profile="p" * 5000, num_samples=1, backend="litert"))

    ledger.rejected("pi-1", "norm", "x" * 5000)

    (row,) = ledger.rows()
    assert len(row.profile) == TEXT and len(row.last_reason) == TEXT
    assert all(len(e.text) <= TEXT for e in ledger.events)


def test_ledger_keeps_only_the_latest_events() -> None:
    ledger = Ledger(clock=Clock())

    for i in range(EVENTS + 5):
        ledger.event("round", f"round {i}")

    assert len(ledger.events) == EVENTS
    assert ledger.events[0].text == "round 5"


def _telemetry(clock: Clock, sent: list[Snapshot]) -> Telemetry:
    return Telemetry(
        RunConfig(run="t", rounds=12, min_clients=1), publish=sent.append, interval=0.5, clock=clock
    )


def test_snapshots_are_sent_at_most_every_interval_but_at_once_at_a_round_boundary() -> None:
    clock, sent = Clock(), []
    telemetry = _telemetry(clock, sent)
    telemetry.round_started(1, ["pi-1"], deadline=1060.0, bytes_down=10)  # at once
    assert len(sent) == 1

    telemetry.hello(_hello("pi-1"))
    telemetry.received("pi-1", 100)
    telemetry.tick()  # less than 0.5 s since the last: not yet
    clock.now += 0.6
    telemetry.tick()
    telemetry.tick()  # nothing new since

    assert len(sent) == 2
    progress = sent[-1].progress
    assert progress is not None and (progress.round, progress.bytes_up) == (1, 100)
    assert [d.id for d in sent[-1].devices] == ["pi-1"]


def test_a_snapshot_tells_the_run_the_round_in_progress_and_the_last_rounds() -> None:
    clock, sent = Clock(), []
    telemetry = _telemetry(clock, sent)
    telemetry.phase(Phase.TRAINING, 1)
    telemetry.hello(_hello("pi-1"))
    telemetry.round_started(1, ["pi-1", "pi-2"], deadline=1060.0, bytes_down=10)
    telemetry.accepted("pi-1", _update())
    telemetry.rejected("pi-2", "norm", "too large")
    telemetry.rejected("pi-2", "signature", "not signed")

    during = telemetry.snapshot()
    telemetry.round_ended(_result(1), late=["pi-2"])
    after = telemetry.snapshot()

    assert (during.run.name, during.run.phase, during.run.round, during.run.rounds) == (
        "t",
        "training",
        1,
        12,
    )
    assert during.run.deadline == 1060.0 and during.run.devices_total == 1
    assert during.progress is not None
    assert during.progress.reported == ["pi-1"]
    assert during.progress.rejected == {"norm": 1, "signature": 1}
    assert after.progress is None and after.run.deadline is None
    assert after.rounds == [_result(1).to_dict()] and after.run.sparsity == 0.5
    assert [e.kind for e in after.events][-4:] == ["reject", "drop", "late", "round"]


def test_a_forged_message_is_an_event_not_a_mark_on_the_device() -> None:
    telemetry = _telemetry(Clock(), [])
    telemetry.hello(_hello("pi-1"))

    telemetry.rejected("pi-1", "signature", "not signed by pi-1's key")

    (row,) = telemetry.snapshot().devices
    assert (row.rejected, row.last_reason) == (0, "")
    assert telemetry.snapshot().events[-1].kind == "drop"


def test_stages_between_phases_show_in_the_snapshot() -> None:
    clock, sent = Clock(), []
    telemetry = _telemetry(clock, sent)

    telemetry.stage("exporting")

    assert sent[-1].run.phase == "exporting"
    assert sent[-1].events[-1].text == "exporting at round 0"


def test_listeners_get_every_snapshot_that_is_published() -> None:
    sent: list[Snapshot] = []
    heard: list[Snapshot] = []
    telemetry = _telemetry(Clock(), sent)
    telemetry.listeners.append(heard.append)

    telemetry.phase(Phase.WAITING, 0)
    telemetry.phase(Phase.TRAINING, 1)

    assert heard == sent and len(sent) == 2


def test_overdue_updates_are_in_the_round_until_they_arrive_and_connection_changes_are_events() -> (
    None
):
    # Prepare: pi-1 and pi-2 say they resent an update that has not arrived
    telemetry = _telemetry(Clock(), [])
    telemetry.round_started(1, ["pi-1", "pi-2", "pi-3"], deadline=1060.0, bytes_down=10)
    telemetry.overdue("pi-1", 1)
    telemetry.overdue("pi-2", 1)
    telemetry.overdue("pi-2", 2)

    # Execute: pi-1's update arrives; a forged message on pi-2's topic changes nothing
    before = telemetry.snapshot()
    telemetry.accepted("pi-1", _update())
    telemetry.rejected("pi-2", "signature", "not signed")
    telemetry.connection(
        ConnectionEvent(change=ConnectionChange.LOST, detail="lost the connection (timeout)")
    )
    after = telemetry.snapshot()

    # Assert
    assert before.progress is not None and before.progress.overdue == ["pi-1", "pi-2"]
    assert after.progress is not None and after.progress.overdue == ["pi-2"]
    assert [(e.kind, e.text) for e in after.events if e.kind in ("overdue", "broker")] == [
        (
            "overdue",
            "round 1: 1 update(s) that devices say they sent have not arrived; they resend them",
        ),
        ("broker", "lost the connection (timeout)"),
    ]
