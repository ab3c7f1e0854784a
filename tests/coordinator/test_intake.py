"""A round's update intake (intake.py) through the round loop: what is counted, what is rejected
and why, late, resent and redelivered updates, overdue claims.
"""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import numpy as np
import pytest
from global_model import MaskedModel
from round_harness import (
    ROUND,
    RUN,
    TOPICS,
    FakeClient,
    Harness,
    assert_weights,
    random_delta,
    update_payload,
)

from fedprune.coordinator.observer import Observer
from fedprune.coordinator.validation import Limits
from fedprune.protocol.chunks import sha256, split
from fedprune.protocol.codec import Model
from fedprune.protocol.envelope import encode
from fedprune.protocol.messages import Hello, Round, Unanswered
from fedprune.protocol.signing import SigningKey, Trust


def test_only_the_good_update_counts_and_rejections_are_counted_by_reason(
    harness: Callable[..., Harness],
) -> None:
    h = harness(("bad", "late", "good"), quorum=0.3)  # one report closes the round
    good: list[np.ndarray] = []

    def answer(announcement: Round, model: Model) -> None:
        nan = random_delta(model, 1)
        nan[0].flat[np.flatnonzero(model.masks[0])[0]] = np.nan
        h.clients["bad"].send(announcement.round, update_payload(model, nan))
        other = announcement.round + 1
        h.clients["late"].send(other, update_payload(model, random_delta(model, 2), round_=other))
        good.extend(random_delta(model, 3))
        h.clients["good"].send(announcement.round, update_payload(model, good))

    h.on_round(answer)

    before, result, after = h.run_round()

    assert result.rejected == {"nonfinite": 1, "round": 1}
    assert (result.selected, result.reported) == (3, 1)
    assert_weights(after, [w + d for w, d in zip(before.weights, good, strict=True)])
    for old, new in zip(before.masks, after.masks, strict=True):
        assert (old is None and new is None) or np.array_equal(old, new)
    assert [n.accepted for n in h.clients["good"].notices()] == [True]
    (notice,) = h.clients["bad"].notices()
    assert not notice.accepted and notice.reason.startswith("nonfinite")
    (notice,) = h.clients["late"].notices()
    assert not notice.accepted and notice.reason.startswith("round")


def test_update_in_protocol_version_2_is_rejected_once_as_version(
    harness: Callable[..., Harness],
) -> None:
    h = harness(quorum=0.5)

    def answer(announcement: Round, model: Model) -> None:
        messages = []
        for message in h.clients["a"].chunks(
            update_payload(model, random_delta(model, 1)), max_chunk=5000
        ):
            envelope = msgpack.unpackb(message)
            envelope["v"] = "2.0"
            messages.append(msgpack.packb(envelope))
        h.clients["a"].publish(announcement.round, messages)
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"version": 1}
    assert result.reported == 1


def test_oversize_update_is_rejected_once_however_many_chunks(
    harness: Callable[..., Harness],
) -> None:
    # A client that ignores the mask sends every value: twice the size of a sparse update.
    model = MaskedModel().model()
    sparse = len(update_payload(model, random_delta(model, 0)))
    h = harness(quorum=0.5, limits=Limits(max_update_bytes=sparse + 1024))

    def answer(announcement: Round, model: Model) -> None:
        dense = update_payload(model, random_delta(model, 1), masks=[None] * len(model.weights))
        assert len(dense) > sparse + 1024
        h.clients["a"].send(announcement.round, dense, max_chunk=8000)
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"oversize": 1}
    assert result.reported == 1


def test_update_for_another_round_is_rejected_once_however_many_chunks(
    harness: Callable[..., Harness],
) -> None:
    h = harness(quorum=0.5)

    def answer(announcement: Round, model: Model) -> None:
        stale = announcement.round - 1
        h.clients["a"].send(
            stale, update_payload(model, random_delta(model, 1), round_=stale), max_chunk=5000
        )
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"round": 1}
    assert result.reported == 1


def test_unselected_client_is_rejected(harness: Callable[..., Harness]) -> None:
    h = harness(clients_per_round=1)

    def answer(announcement: Round, model: Model) -> None:
        (chosen,) = [c for c in h.clients if announcement.selects(c)]
        other = next(c for c in h.clients if c != chosen)
        h.clients[other].send(announcement.round, update_payload(model, random_delta(model, 1)))
        h.clients[chosen].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    _, result, _ = h.run_round()

    assert result.rejected == {"unselected": 1}
    assert (result.selected, result.reported) == (1, 1)


def test_redelivered_chunks_are_ignored_and_not_counted(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    deltas: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        deltas["a"], deltas["b"] = random_delta(model, 1), random_delta(model, 2)
        first, second = h.clients["a"].chunks(
            update_payload(model, deltas["a"], num_samples=30), max_chunk=12_000
        )
        # QoS 1: a chunk redelivered while assembling, and again after the update was accepted.
        h.clients["a"].publish(announcement.round, [first, first, second, second, first])
        h.clients["b"].send(announcement.round, update_payload(model, deltas["b"], num_samples=10))

    h.on_round(answer)

    before, result, after = h.run_round()

    assert result.rejected == {}
    assert result.reported == 2
    want = [
        w + (30 * a + 10 * b) / 40
        for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)
    assert [n.accepted for n in h.clients["a"].notices()] == [True]


def test_second_different_update_from_a_client_is_rejected_as_duplicate(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    deltas: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        deltas["a"], deltas["b"] = random_delta(model, 1), random_delta(model, 2)
        h.clients["a"].send(announcement.round, update_payload(model, deltas["a"]))
        h.clients["a"].send(
            announcement.round, update_payload(model, random_delta(model, 9, scale=1.0))
        )
        h.clients["b"].send(announcement.round, update_payload(model, deltas["b"]))

    h.on_round(answer)

    before, result, after = h.run_round()

    assert result.rejected == {"duplicate": 1}
    assert result.reported == 2
    want = [
        w + (a + b) / 2 for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)


def test_a_forged_payload_on_a_device_topic_does_not_cost_the_device_its_update(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: someone else publishes, as "a" and on a's topic, a garbage payload and the first
    # chunk of a made-up one before a's genuine update arrives (an open broker, no ACL)
    h = harness()
    deltas: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        forged = FakeClient.chunks(h.clients["a"], b"\xc1 garbage that is not an update")
        squatted = FakeClient.chunks(h.clients["a"], b"x" * 50_000, max_chunk=10_000)[:1]
        h.clients["a"].publish(announcement.round, forged + squatted)
        deltas["a"], deltas["b"] = random_delta(model, 1), random_delta(model, 2)
        h.clients["a"].send(
            announcement.round, update_payload(model, deltas["a"]), max_chunk=12_000
        )
        h.clients["b"].send(announcement.round, update_payload(model, deltas["b"]))

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the garbage is rejected once; a's own update counts
    assert result.rejected == {"decode": 1}
    assert result.reported == 2
    want = [
        w + (a + b) / 2 for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)


def test_a_device_cannot_claim_more_samples_than_its_hello_declared(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: both said hello with 100 samples; "a" then claims 10,000,000 to dominate FedAvg
    h = harness()

    def answer(announcement: Round, model: Model) -> None:
        h.clients["a"].send(
            announcement.round, update_payload(model, random_delta(model, 1), num_samples=10**7)
        )
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert
    assert result.rejected == {"samples": 1}
    assert result.reported == 1
    (notice,) = h.clients["a"].notices()
    assert notice.reason == "samples: num_samples 10000000 not in 1..100"


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (Limits(max_update_bytes=60_000, max_payloads_per_device=2), "a has 2 updates in assembly"),
        (
            Limits(max_update_bytes=60_000, max_pending_bytes=60_000, max_payloads_per_device=9),
            "updates in assembly hold 90,000 bytes > 60,000",
        ),
    ],
    ids=["per-device", "in-total"],
)
def test_payloads_in_assembly_are_bounded_per_device_and_in_total(
    harness: Callable[..., Harness], limits: Limits, reason: str
) -> None:
    # Prepare: after b's update, "a" starts three 50 kB payloads and never finishes them
    h = harness(limits=limits, round_timeout=0.5)

    def answer(announcement: Round, model: Model) -> None:
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))
        for filler in (b"x", b"y", b"z"):
            first = FakeClient.chunks(h.clients["a"], filler * 50_000, max_chunk=30_000)[:1]
            h.clients["a"].publish(announcement.round, first)

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert: the third start is refused; b's update counted
    assert result.rejected == {"oversize": 1}
    assert result.reported == 1
    (notice,) = h.clients["a"].notices()
    assert notice.reason.startswith(f"oversize: {reason}")


def test_with_device_keys_an_unsigned_update_in_a_devices_name_is_dropped_and_its_own_counts(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: the coordinator knows a's and b's verify keys; someone without a key sends an
    # update on a's topic, as a, before a's own signed one
    h = harness()
    keys = {name: SigningKey.generate() for name in ("a", "b")}
    h.coordinator.intake.trust = Trust.of({name: key.verify_key for name, key in keys.items()})
    deltas: dict[str, list[np.ndarray]] = {}

    def signed(name: str, payload: bytes) -> list[bytes]:
        chunks = split(payload, max_chunk=1 << 20)
        session = h.clients[name].session  # the coordinator session it answers (protocol 1.10)
        return [encode(c, run=RUN, sender=name, signer=keys[name], session=session) for c in chunks]

    def answer(announcement: Round, model: Model) -> None:
        forged = update_payload(model, random_delta(model, 9, scale=1.0), num_samples=100)
        h.clients["a"].send(announcement.round, forged)
        for name, seed in (("a", 1), ("b", 2)):
            deltas[name] = random_delta(model, seed)
            h.clients[name].publish(
                announcement.round, signed(name, update_payload(model, deltas[name]))
            )

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the forgery is counted, never reaches a's state; a's and b's updates count
    assert result.rejected == {"signature": 1}
    assert result.reported == 2
    want = [
        w + (a + b) / 2 for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)
    assert h.coordinator.intake.dropped == 1


@pytest.mark.parametrize(
    ("run", "session"), [(RUN, "0000000001-0ld5e55n"), ("another-run", "")], ids=["session", "run"]
)
def test_a_devices_signed_update_replayed_from_another_session_or_run_is_dropped(
    harness: Callable[..., Harness], run: str, session: str
) -> None:
    # Prepare: a's genuine signed update of an earlier coordinator session (or of another run,
    # for this session) is replayed on a's topic before a's own update of this session
    h = harness()
    keys = {name: SigningKey.generate() for name in ("a", "b")}
    h.coordinator.intake.trust = Trust.of({name: key.verify_key for name, key in keys.items()})
    deltas: dict[str, list[np.ndarray]] = {}

    def signed(name: str, payload: bytes, *, run: str = RUN, session: str = "") -> list[bytes]:
        session = session or h.clients[name].session
        chunks = split(payload, max_chunk=1 << 20)
        return [encode(c, run=run, sender=name, signer=keys[name], session=session) for c in chunks]

    def answer(announcement: Round, model: Model) -> None:
        old = update_payload(model, random_delta(model, 9, scale=1.0))
        h.clients["a"].publish(announcement.round, signed("a", old, run=run, session=session))
        for name, seed in (("a", 1), ("b", 2)):
            deltas[name] = random_delta(model, seed)
            payload = update_payload(model, deltas[name])
            h.clients[name].publish(announcement.round, signed(name, payload))

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the replay is counted as such and is not a mark on a's row; a's and b's count
    assert result.rejected == {"replay": 1}
    assert result.reported == 2
    want = [
        w + (a + b) / 2 for w, a, b in zip(before.weights, deltas["a"], deltas["b"], strict=True)
    ]
    assert_weights(after, want)
    rows = {r.id: r for r in h.coordinator.telemetry.ledger.rows()}
    assert (rows["a"].rejected, rows["a"].reported) == (0, 1)


@pytest.mark.parametrize("cap", [3.0, 0.0], ids=["capped", "off"])
def test_no_update_weighs_more_than_the_cap_times_the_median_declared_claim(
    harness: Callable[..., Harness], cap: float
) -> None:
    # Prepare: a and b declare 100 samples; c (a stolen bundle) declares and claims 10,000,000
    h = harness(("a", "b", "c"), weight_cap=cap)
    big = Hello(client_id="c", profile="generic-x86-64", num_samples=10_000_000, backend="x")
    h.clients["c"].transport.publish(
        TOPICS.client_status("c"), encode(big, run=RUN, sender="c"), retain=True
    )
    deltas: dict[str, list[np.ndarray]] = {}

    def answer(announcement: Round, model: Model) -> None:
        for name, seed, claim in (("a", 1, 100), ("b", 2, 100), ("c", 3, 10_000_000)):
            deltas[name] = random_delta(model, seed)
            payload = update_payload(model, deltas[name], num_samples=claim)
            h.clients[name].send(announcement.round, payload)

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: capped, c weighs 3 x the median declared claim (300), not 10,000,000
    weights = {"a": 100.0, "b": 100.0, "c": 300.0 if cap else 10_000_000.0}
    total = sum(weights.values())
    want = [
        w + sum(weights[n] * deltas[n][i] for n in weights) / total
        for i, w in enumerate(before.weights)
    ]
    assert_weights(after, want)
    assert result.capped == (1 if cap else 0)


@pytest.mark.parametrize("weight", [0.5, 0.0])
def test_a_late_update_of_the_previous_round_counts_with_its_staleness_weight_or_not_at_all(
    harness: Callable[..., Harness], weight: float
) -> None:
    # Prepare: in round 2 only "a" answers (quorum 1 of 2); "b"'s round-2 update arrives during
    # round 3, before "a"'s round-3 update
    h = harness(quorum=0.5, staleness_weight=weight)
    sent: dict[str, object] = {}

    def answer(announcement: Round, model: Model) -> None:
        if announcement.round == ROUND:
            h.clients["a"].send(
                ROUND, update_payload(model, random_delta(model, 1), num_samples=30)
            )
            sent["model"], sent["b"] = model, random_delta(model, 2)
            return
        h.clients["b"].send(ROUND, update_payload(sent["model"], sent["b"], num_samples=10))  # type: ignore[arg-type]
        sent["a"] = random_delta(model, 3)
        h.clients["a"].send(
            ROUND + 1,
            update_payload(
                model,
                sent["a"],
                round_=ROUND + 1,  # type: ignore[arg-type]
                num_samples=30,
            ),
        )

    h.on_round(answer)
    _, first, _ = h.run_round()
    before = h.coordinator.pruner.model()

    # Execute
    result = h.coordinator.run_round(ROUND + 1)

    # Assert: FedAvg with b's samples times the weight; rejected as late without one
    after = h.coordinator.pruner.model()
    a, b = sent["a"], sent["b"]
    want = [
        w + (30 * da + weight * 10 * db) / (30 + weight * 10)
        for w, da, db in zip(before.weights, a, b, strict=True)
    ]  # type: ignore[call-overload]
    assert_weights(after, want)
    assert (first.late, first.reported) == (1, 1)
    assert (result.reported, result.stale) == (1, 1 if weight else 0)
    assert result.rejected == ({} if weight else {"round": 1})
    assert h.coordinator.last_round["stale"] == (["b"] if weight else [])


def test_a_redelivered_update_of_the_previous_round_is_ignored_and_does_not_answer_this_one(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: late updates count; "a"'s round-2 update arrives again (QoS 1) during round 3,
    # followed by a different round-2 update (rejected as a duplicate), then the round-3 updates
    h = harness(staleness_weight=0.5)
    sent: dict[str, bytes] = {}

    def answer(announcement: Round, model: Model) -> None:
        for i, client in enumerate(h.clients.values()):
            if announcement.round == ROUND:
                sent[client.id] = update_payload(model, random_delta(model, i))
            else:
                h.clients["a"].send(ROUND, sent["a"])
                h.clients["a"].send(ROUND, update_payload(model, random_delta(model, 9)))
            payload = update_payload(model, random_delta(model, 10 + i), round_=announcement.round)
            client.send(
                announcement.round, sent[client.id] if announcement.round == ROUND else payload
            )

    h.on_round(answer)
    h.run_round()
    h.clients["a"].notices()

    # Execute
    result = h.coordinator.run_round(ROUND + 1)

    # Assert: both round-3 updates count; the duplicate's notice names round 2, and so does the
    # verdict each copy of a judged round-2 payload gets again (sent twice each)
    notices = h.clients["a"].notices()
    assert (result.reported, result.rejected) == (2, {"duplicate": 1})
    assert [(n.round, n.accepted) for n in notices] == [
        (ROUND, True),
        (ROUND, False),
        (ROUND + 1, True),
        (ROUND, True),
        (ROUND, False),
    ]


def test_an_update_missing_a_chunk_is_never_counted_and_its_device_is_late(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: "b" sends the last of its two chunks only (the first was lost), twice (QoS 1)
    h = harness(round_timeout=1.0)
    sent: list[np.ndarray] = []

    def answer(announcement: Round, model: Model) -> None:
        sent.extend(random_delta(model, 1))
        h.clients["a"].send(announcement.round, update_payload(model, sent))
        chunks = h.clients["b"].chunks(
            update_payload(model, random_delta(model, 2)), max_chunk=12_000
        )
        assert len(chunks) == 2
        h.clients["b"].publish(announcement.round, [chunks[1], chunks[1]])

    h.on_round(answer)

    # Execute
    before, result, after = h.run_round()

    # Assert: the round ends at its deadline with a's update alone; b is late, nothing rejected
    assert (result.selected, result.reported, result.late, result.rejected) == (2, 1, 1, {})
    assert h.coordinator.last_round["late"] == ["b"]
    assert_weights(after, [w + d for w, d in zip(before.weights, sent, strict=True)])


def _claim(h: Harness, client_id: str, round_: int, payload: bytes, *, session: str = "") -> None:
    """``client_id``'s hello saying it resent ``payload`` for want of a notice."""
    claim = Unanswered(
        session=session or h.coordinator.telemetry.session,
        round=round_,
        sha256=sha256(payload),
        resends=1,
    )
    hello = Hello(
        client_id=client_id,
        profile="generic-x86-64",
        num_samples=100,
        backend="scripted",
        unanswered=claim,
    )
    h.clients[client_id].transport.publish(
        TOPICS.client_status(client_id), encode(hello, run=RUN, sender=client_id), retain=True
    )


def test_a_resent_update_is_answered_again_and_counted_once(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: "a" sends its update, then (no notice came) says so and sends it again
    h = harness()

    def answer(announcement: Round, model: Model) -> None:
        payload = update_payload(model, random_delta(model, 1))
        h.clients["a"].send(announcement.round, payload)
        _claim(h, "a", announcement.round, payload)
        h.clients["a"].send(announcement.round, payload)  # a new envelope: a resend
        h.clients["b"].send(announcement.round, update_payload(model, random_delta(model, 2)))

    h.on_round(answer)

    # Execute
    _, result, _ = h.run_round()

    # Assert: one update from each, both copies answered; "a" was never overdue (its update was in)
    assert (result.reported, result.rejected, result.overdue) == (2, {}, 0)
    assert [n.accepted for n in h.clients["a"].notices()] == [True, True]
    assert h.coordinator.telemetry.snapshot().progress is None


def test_a_device_that_says_its_update_went_unanswered_is_overdue_until_it_arrives(
    harness: Callable[..., Harness],
) -> None:
    # Prepare: "a" claims a resend before any of its update is here; a claim of another
    # session is stale
    h = harness(round_timeout=0.5)
    seen: list[list[str]] = []

    def answer(announcement: Round, model: Model) -> None:
        payload = update_payload(model, random_delta(model, 1))
        _claim(h, "a", announcement.round, payload)
        _claim(h, "b", announcement.round, payload, session="0000000000-older")

    h.on_round(answer)
    h.coordinator.observer.observers.append(Seen(h, seen))

    # Execute
    _, result, _ = h.run_round()

    # Assert: "a" overdue until the round closed without its update
    assert result.overdue == 1 and result.reported == 0
    assert ["a"] in seen


class Seen(Observer):
    """What the round's telemetry lists as overdue, each time a device is found overdue."""

    def __init__(self, h: Harness, seen: list[list[str]]) -> None:
        self.h, self.seen = h, seen

    def overdue(self, client_id: str, resends: int) -> None:
        progress = self.h.coordinator.telemetry.snapshot().progress
        self.seen.append([] if progress is None else list(progress.overdue))
