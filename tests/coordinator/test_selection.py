"""The device registry and selection (fleet.py) through the round loop: draws, late joiners, codecs,
and hellos that cannot speak for another device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from round_harness import ROUND, RUN, TOPICS, FakeClient, Harness, random_delta, update_payload

from fedprune.protocol.chunks import split
from fedprune.protocol.codec import Codec, Model, Update, encode_update
from fedprune.protocol.envelope import encode
from fedprune.protocol.messages import Hello, Manifest, Round


@pytest.mark.parametrize(
    ("announced", "exported"),
    [
        ("raspberry-pi-4", "raspberry-pi-4"),
        ("my-own-board", "generic-x86-64"),
        ("../../etc/passwd.toml", None),
        ("deploy/+/#", None),
    ],
)
def test_a_profile_in_a_hello_is_only_a_catalogue_name(
    harness: Callable[..., Harness], announced: str, exported: str | None
) -> None:
    # Prepare
    h = harness()
    hello = Hello(client_id="c", profile=announced, num_samples=5, backend="keras")

    # Execute
    h.clients["a"].transport.publish(TOPICS.client_status("c"), encode(hello, run=RUN, sender="c"))
    h.coordinator.pump(0)

    # Assert: never a path, never a topic; unknown names get the default profile's export
    assert h.coordinator.profiles.get(announced) == exported


def test_a_hello_sent_as_another_device_does_not_change_its_row(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    forged = Hello(
        client_id="b",
        profile="jetson-nano",
        num_samples=9,
        backend="keras",
        installed="ff" * 32,
        deploys=True,
    )
    h.clients["a"].transport.publish(
        TOPICS.client_status("b"), encode(forged, run=RUN, sender="a"), retain=True
    )

    while h.coordinator.pump(0.0):
        pass

    assert h.coordinator.fleet.devices["b"].profile == "generic-x86-64"
    row = next(r for r in h.coordinator.telemetry.ledger.rows() if r.id == "b")
    assert (row.profile, row.model) == ("generic-x86-64", None)


def test_bytes_sent_as_someone_else_on_a_devices_topic_are_not_put_on_its_row(
    harness: Callable[..., Harness],
) -> None:
    h = harness()

    def answer(announcement: Round, model: Model) -> None:
        payload = update_payload(model, random_delta(model, 1))
        forged = [encode(c, run=RUN, sender="b") for c in split(payload, max_chunk=1 << 20)]
        h.clients["a"].publish(announcement.round, forged)  # "b" speaking on a's topic
        h.clients["a"].send(announcement.round, payload)
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"sender": 1}
    rows = {r.id: r for r in h.coordinator.telemetry.ledger.rows()}
    assert (rows["a"].rejected, rows["a"].reported) == (0, 1)
    assert rows["a"].bytes_up == rows["b"].bytes_up  # its own update only, like b's
    assert h.coordinator.telemetry.ledger.events[-2].kind == "drop"


def test_a_selection_from_a_huge_fleet_fits_in_a_few_bytes_and_every_device_computes_it(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: 20,000 devices online (hellos written straight into the coordinator's table)
    h = harness(clients_per_round=5000)
    hello = h.coordinator.fleet.devices["a"]
    fleet = [f"pi-{i:05d}" for i in range(20_000)]
    h.coordinator.fleet.devices.update({c: dataclasses.replace(hello, client_id=c) for c in fleet})

    # Execute
    drawn = h.coordinator.fleet.select(ROUND)
    again = h.coordinator.fleet.select(ROUND)
    selected, draw, cutoff = drawn.selected, drawn.draw, drawn.cutoff
    announcement = Round(
        round=ROUND,
        model_version=ROUND,
        deadline=0.0,
        draw=draw,
        cutoff=cutoff,
        model=Manifest(topic="t", size=1, chunks=1, sha256="0" * 64),
        local_epochs=1,
    )

    # Assert: exactly the sample size, the same set every device derives, reproducible per round
    assert len(selected) == 5000
    assert {c for c in [*fleet, "a", "b"] if announcement.selects(c)} == set(selected)
    assert again == drawn
    assert h.coordinator.fleet.select(ROUND + 1).selected != selected
    assert len(encode(announcement, run=RUN, sender="coordinator")) < 512


def test_a_device_that_joins_after_the_draw_and_is_drawn_is_accepted(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: every device selected (clients_per_round 0); "late" joins once the round is out
    h = harness(("a", "b"))

    def answer(announcement: Round, model: Model) -> None:
        if "late" in h.clients:
            return
        h.clients["late"] = FakeClient(h.broker, "late")  # it answers first, then a and b
        for client in reversed(h.clients.values()):
            client.send(announcement.round, update_payload(model, random_delta(model, 3)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert
    assert (result.selected, result.reported, result.rejected) == (3, 3, {})


def test_late_joiners_fill_the_round_up_to_its_devices_and_only_accepted_ones_count(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: 3 devices a round, 2 online at the draw; three late joiners answer: x with a
    # payload that does not decode, then y and z
    h = harness(("a", "b"), clients_per_round=3)

    def answer(announcement: Round, model: Model) -> None:
        if "x" in h.clients:
            return
        for late in ("x", "y", "z"):
            h.clients[late] = FakeClient(h.broker, late)
        h.clients["x"].send(announcement.round, b"not an update")
        for client in ("y", "z", "a", "b"):
            h.clients[client].send(
                announcement.round, update_payload(model, random_delta(model, 3))
            )

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert: y fills the round; x never counted as selected, z is one too many
    assert (result.selected, result.reported) == (3, 3)
    assert result.rejected["unselected"] == 1 and sum(result.rejected.values()) == 2
    assert "has its 3 devices" in h.coordinator.last_round["rejected"]["z"]


def test_a_forced_codec_selects_only_devices_that_have_it_and_refuses_other_codecs(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: the run forces int8+zstd; "a" and "b" can, "old" speaks only float32; "b" sends
    # float16 anyway
    h = harness(("a", "b"), codec="int8+zstd")
    for name in ("a", "b"):
        h.clients[name] = FakeClient(h.broker, name, codecs=("f32", "f16", "int8", "zstd"))
    old = FakeClient(h.broker, "old")
    h.coordinator.pump(0.1)
    h.coordinator.pump(0.1)

    def answer(announcement: Round, model: Model) -> None:
        for name, codec in (("a", "int8+zstd"), ("b", "f16")):
            update = Update(round=ROUND, num_samples=100, deltas=random_delta(model, 1))
            h.clients[name].send(ROUND, encode_update(update, model.masks, Codec.parse(codec)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert
    assert (result.selected, result.reported, result.codecs) == (2, 1, {"int8+zstd": 1})
    assert result.rejected == {"codec": 1}
    assert "sent as f16; this run's codec is int8+zstd" in h.coordinator.last_round["rejected"]["b"]
    (notice,) = old.notices()
    assert (notice.round, notice.accepted) == (0, False)
    assert notice.reason == (
        "this run's codec int8+zstd needs int8, zstd, which this device lacks: it is not selected"
    )
