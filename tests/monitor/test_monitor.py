"""``fedprune-monitor``: the watcher (in-memory broker), the terminal view, the CLI's errors."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
from memory_broker import MemoryBroker, MemoryTransport

from fedprune.monitor.cli import main
from fedprune.monitor.view import console, line, render
from fedprune.monitor.watcher import NoRun, Watcher
from fedprune.protocol.envelope import encode
from fedprune.protocol.messages import COORDINATOR, Offline, Phase, Snapshot, Status
from fedprune.protocol.signing import SigningKey, Trust
from fedprune.protocol.telemetry import DeviceRow, Event, Progress, RunInfo
from fedprune.protocol.topics import Topics

RUN = "watched"
TOPICS = Topics(RUN)
SNAPSHOT = Snapshot(
    run=RunInfo(
        name=RUN,
        session="s1",
        phase="training",
        round=4,
        rounds=10,
        deadline=1060.0,
        model_version=4,
        sparsity_target=0.8,
        sparsity=0.39,
        started=900.0,
        updated=1030.0,
        config={"model": "cnn"},
        devices_total=2,
    ),
    progress=Progress(
        round=4,
        started=1020.0,
        deadline=1060.0,
        selected=["pi-1", "pi-2"],
        reported=["pi-1"],
        rejected={"norm": 1},
        bytes_up=2048,
    ),
    rounds=[
        {
            "round": 3,
            "accuracy": 0.912,
            "client_accuracy": 0.9,
            "sparsity": 0.22,
            "reported": 2,
            "selected": 2,
            "bytes_up": 4096,
            "dense_bytes_up": 8192,
            "bytes_down": 4096,
            "dense_bytes_down": 8192,
            "rejected": {},
            "seconds": 1.25,
        }
    ],
    devices=[
        DeviceRow(
            id="pi-1",
            profile="raspberry-pi-4",
            trainer="litert",
            samples=120,
            online=True,
            joined=900.0,
            last_seen=1025.0,
            selected=4,
            reported=4,
        ),
        DeviceRow(
            id="pi-2",
            profile="raspberry-pi-4",
            trainer="litert",
            samples=80,
            online=False,
            joined=900.0,
            last_seen=1000.0,
            selected=4,
            reported=2,
            late=1,
            rejected=1,
            last_reason="norm: update norm 1e9 exceeds 1e4",
        ),
    ],
    events=[Event(time=1021.0, kind="reject", text="norm: update norm 1e9", device="pi-2")],
)


def _publish(broker: MemoryBroker, topic: str, payload: bytes) -> None:
    MemoryTransport(broker).publish(topic, payload, retain=True)


def test_a_watcher_reads_the_retained_snapshot_and_the_coordinators_status() -> None:
    broker = MemoryBroker()
    _publish(broker, TOPICS.telemetry, encode(SNAPSHOT, run=RUN, sender=COORDINATOR))
    status = Status(phase=Phase.TRAINING, round=4, rounds=10)
    _publish(broker, TOPICS.status, encode(status, run=RUN, sender=COORDINATOR))
    watcher = Watcher(MemoryTransport(broker), RUN)

    snapshot = watcher.wait(1.0)

    assert snapshot == SNAPSHOT and watcher.coordinator == "online"
    data = watcher.as_json()
    assert data["coordinator"] == "online"
    assert json.loads(json.dumps(data))["devices"][1]["last_reason"].startswith("norm")

    _publish(broker, TOPICS.status, encode(Offline(who=COORDINATOR), run=RUN, sender=COORDINATOR))
    assert watcher.poll(0.1) and watcher.coordinator == "offline"


def test_a_watcher_with_the_coordinators_key_drops_what_it_did_not_sign() -> None:
    broker = MemoryBroker()
    coordinator, stranger = SigningKey.generate(), SigningKey.generate()
    forged = dataclasses.replace(SNAPSHOT, devices=[])
    _publish(broker, TOPICS.telemetry, encode(forged, run=RUN, sender=COORDINATOR, signer=stranger))
    watcher = Watcher(
        MemoryTransport(broker), RUN, trust=Trust.of({COORDINATOR: coordinator.verify_key})
    )

    with pytest.raises(NoRun, match="no telemetry for run 'watched'"):
        watcher.wait(0.3)
    _publish(
        broker, TOPICS.telemetry, encode(SNAPSHOT, run=RUN, sender=COORDINATOR, signer=coordinator)
    )

    assert watcher.wait(1.0) == SNAPSHOT and watcher.dropped == 1


def test_a_snapshot_in_a_devices_name_is_ignored() -> None:
    broker = MemoryBroker()
    _publish(broker, TOPICS.telemetry, encode(SNAPSHOT, run=RUN, sender="pi-1"))

    with pytest.raises(NoRun):
        Watcher(MemoryTransport(broker), RUN).wait(0.3)


def test_the_terminal_view_shows_the_run_the_round_the_devices_and_the_events() -> None:
    out = console(record=True)
    out.print(render(SNAPSHOT, "online"))
    text = out.export_text()

    for expected in (
        "fedprune run watched (session s1)",
        "round 4/10",
        "1/2",
        "1 of 2 selected devices reported",
        "waiting for: pi-2",
        "pi-1",
        "off, 30 s ago",
        "norm: update norm 1e9",
        "0.912",
        "in 30 s",
        "reject pi-2",
    ):
        assert expected in text, expected
    assert line(SNAPSHOT, "online") == (
        "watched: training, round 4/10, coordinator online; round 3: accuracy 0.912, sparsity"
        " 0.22, 2/2 reported; 1/2 devices online"
    )


def test_an_autoencoders_rounds_show_their_auc_where_a_classifiers_show_accuracy() -> None:
    # Prepare: a reconstruction's round: no accuracy, the held-out AUC of its error
    rounds = [SNAPSHOT.rounds[0] | {"accuracy": None, "client_accuracy": None, "auc": 0.871}]
    snapshot = dataclasses.replace(SNAPSHOT, rounds=rounds)
    out = console(record=True)

    # Execute
    out.print(render(snapshot, "online"))

    # Assert
    assert "AUC 0.871" in out.export_text()
    assert "; round 3: AUC 0.871, sparsity 0.22" in line(snapshot, "online")


def test_updates_that_devices_say_they_sent_and_that_have_not_arrived_are_shown() -> None:
    # Prepare: pi-2 resent its update for want of a notice, and the round has not received it
    progress = dataclasses.replace(SNAPSHOT.progress, overdue=["pi-2"])
    snapshot = dataclasses.replace(SNAPSHOT, progress=progress)
    out = console(record=True)

    # Execute
    out.print(render(snapshot, "online"))
    text = out.export_text()

    # Assert
    assert "overdue: 1 update(s) that devices say they sent have not arrived" in text
    assert line(snapshot, "online").endswith("; 1/2 devices online; 1 update(s) overdue")
    assert "overdue" not in line(SNAPSHOT, "online")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_broker_is_one_line_and_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--broker", f"mqtt://127.0.0.1:{_free_port()}", "--once", "--json"])

    err = capsys.readouterr().err.splitlines()
    assert code == 3 and len(err) == 1
    assert err[0].startswith("fedprune-monitor: error: cannot reach the MQTT broker")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--json"], "--json and --svg go with --once"),
        (["--web", ":0", "--once"], "does not go with --once"),
        (["--run", "a/b"], "argument --run"),
    ],
)
def test_bad_flags_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_config_file_with_an_unknown_key_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "monitor.toml"
    config.write_text('broker = "mqtt://127.0.0.1:1"\ndata = "x.npz"\n')

    code = main(["--config", str(config), "--once"])

    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and "unknown key 'data'" in err[0]


def test_what_devices_send_is_shown_as_text_never_as_markup() -> None:
    hostile = dataclasses.replace(
        SNAPSHOT.devices[1],
        profile="[/x]",
        trainer="[i]x[/]",
        last_reason="[bold]norm[/]: [/]",
    )
    snapshot = dataclasses.replace(SNAPSHOT, devices=[SNAPSHOT.devices[0], hostile])
    out = console(record=True)

    out.print(render(snapshot, "online"))

    text = out.export_text()
    assert "[/x]" in text and "[i]x[/]" in text and "[bold]norm[/]" in text


def test_malformed_round_lines_are_left_out_not_fatal() -> None:
    rounds = [{"round": "[/x]"}, {"round": 2, "sparsity": "high"}, SNAPSHOT.rounds[0]]
    snapshot = dataclasses.replace(SNAPSHOT, rounds=rounds)
    out = console(record=True)

    out.print(render(snapshot, "online"))

    assert "0.912" in out.export_text()
    assert line(dataclasses.replace(snapshot, rounds=rounds[:1]), "online").startswith("watched")
